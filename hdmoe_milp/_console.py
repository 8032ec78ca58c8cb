"""Entry point of the ``hdmoe-milp`` console script.

Loading the command (numpy, pandas, OR-Tools) takes about a second; Ctrl-C in that time ends the
command as Ctrl-C later does (one line, exit status 130), not with a traceback of the imports.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Load :mod:`hdmoe_milp.cli` and run it; exit status 130 if interrupted while loading."""
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        print("hdmoe-milp: interrupted", file=sys.stderr)
        return 130
    return run(argv)
