"""`python -m hpsearch`: the `hpsearch` command; forked workers run its `main` too (workers/_forkserver.py)."""

from __future__ import annotations

import sys

from hpsearch.cli import main

if __name__ == "__main__":
    sys.exit(main())
