"""``python -m reattention_core.cli``: the ``reattention`` command (`reattention_core.app.cli`)."""

from __future__ import annotations

import sys

from reattention_core.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
