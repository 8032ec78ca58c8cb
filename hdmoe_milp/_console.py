"""Entry point of the ``hdmoe-milp`` console script.

Loading the command (numpy, pandas, OR-Tools) takes about a second; Ctrl-C in that time ends the
command as Ctrl-C later does (one line, exit status 130), not with a traceback of the imports.
"""

from __future__ import annotations

import sys
import time


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is Ctrl-C: a KeyboardInterrupt, or the ImportError into which a C extension
    turns one that arrives while it initialises (matplotlib's ``_path``: "initialization failed")."""
    return isinstance(exc, KeyboardInterrupt) or (
        isinstance(exc, ImportError) and isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt))


def main(argv: list[str] | None = None) -> int:
    """Load :mod:`hdmoe_milp.cli` and run it; exit status 130 if interrupted while loading, or by an
    import a command makes (the command itself answers a plain KeyboardInterrupt)."""
    started = time.time()  # before the imports: a solve's whole-model time counts them
    try:
        from .cli import main as run

        return run(argv, started=started)
    except (KeyboardInterrupt, ImportError) as exc:
        if not interrupted(exc):
            raise
        print("hdmoe-milp: interrupted", file=sys.stderr)
        return 130
