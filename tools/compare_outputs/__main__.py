"""`python -m tools.compare_outputs ...` from the repository root (see tools/README.md)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
