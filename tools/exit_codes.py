"""The README's exit-code table, generated from `hpsearch.errors.ExitCode` (each code's one meaning), the same
table `hpsearch --help` ends with.

    python tools/exit_codes.py            # print the table
    python tools/exit_codes.py --write    # put it in README.md, between the exit-codes markers
    python tools/exit_codes.py --check    # exit 1 when README.md's table is not the enum's (tests/cli)
"""

from __future__ import annotations

import sys

import _generated

from hpsearch.cli import exit_codes_markdown


def main(argv: list[str] | None = None) -> int:
    return _generated.main(argv, description=__doc__.splitlines()[0], name="exit-codes", tool="exit_codes.py",
                           path=_generated.ROOT / "README.md", render=exit_codes_markdown)


if __name__ == "__main__":
    sys.exit(main())
