"""The fault suite (issue 33): real faults against the prefix cache and the server, on the CPU.

* `kill9`: a process prefilling into a cache folder is SIGKILLed at seeded moments, some inside
  the page-write path; a fresh process must answer from the folder as a cold run does.
* `fullfs`: the cache folder and the offload spill folder on a really full filesystem (a small
  tmpfs, or ``RLIMIT_FSIZE`` where mounting is refused).
* `load`: ``reattention serve`` on a tiny checkpoint under 32 concurrent ``openai`` clients with
  seeded disconnects, malformed bodies and oversize prompts.
* ``test_hostile_files.py`` and ``test_fuzz.py``: crafted cache files and fuzzed input.

``python -m tests.faults.report`` runs the first three at full size and prints the figures the
README's "Reliability" section quotes; the tests run shorter, seeded versions and assert the
invariants (no wrong answer, no lost page, no 5xx).
"""
