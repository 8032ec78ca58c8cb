"""The package's one error type for bad input."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: names the offending field, what was given, and how to fix it.

    The CLI turns this into one line on stderr and exit status 2.
    """

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        msg = f"{field}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


def check_choice(field: str, value: str, allowed: list[str] | tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise an InputError listing them."""
    if value not in allowed:
        raise InputError(field, f"unknown value {value!r}", "allowed: " + ", ".join(sorted(allowed)))
    return value
