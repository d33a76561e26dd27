"""Applications on the engine: the command line, questions over files, the OpenAI-compatible server."""
