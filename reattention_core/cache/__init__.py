"""The prefix cache: prefilled pages kept in memory and on disk, keyed by an engine fingerprint."""
