"""The package's one error type for bad input."""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


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


def as_written(exc: InputError, names: dict[str, str]) -> InputError:
    """``exc`` naming the field as the user wrote it (``names``: field -> e.g. the CLI flag), or
    ``exc`` itself when ``names`` has no entry for its field."""
    flag = names.get(exc.field)
    return exc if flag is None else InputError(flag, exc.problem, exc.fix)


def check_choice(field: str, value: Any, allowed: list[str] | tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed`` (a string), else raise an InputError listing them."""
    fix = "allowed: " + ", ".join(sorted(allowed))
    if not isinstance(value, str):
        raise InputError(field, f"must be a string, got {shown(value)}", fix)
    if value not in allowed:
        raise InputError(field, f"unknown value {value!r}", fix)
    return value


# --- a small typed loader ---------------------------------------------------------------------------
#
# Instance files, plan files and traces are read with these few checkers rather than with a schema
# library such as pydantic. The reasons: the files are small and flat (a handful of TOML keys, a few
# lists of numbers per plan layer), so a dozen lines of checks cover them; the messages must name the
# key exactly as the user wrote it (``[workload].batch``, ``plan.json layer 3: shares``) and say the
# fix, which a generic schema's error report does not do without as much code again; pydantic coerces
# by default (``True`` -> 1, ``1.7`` -> 1 for an int in lax mode), the opposite of what we want;
# and the package keeps its dependency list short (no compiled validation core to install).


def expect_int(field: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
               why: str = "") -> int:
    """``value`` as an int if it is an integer (a Python or numpy integer, not a bool, not a float) in
    ``minimum..maximum`` (either end open when None), else an InputError naming ``field`` whose fix
    gives the range and ``why`` (what the number counts)."""
    if minimum is not None and maximum is not None:
        span = f" in {minimum}..{maximum}"
    else:
        span = f" >= {minimum}" if minimum is not None else f" <= {maximum}" if maximum is not None else ""
    fix = f"give a whole number{span}" + (f" ({why})" if why else "")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():  # 4.0: right value, wrong type
            raise InputError(field, f"must be an integer, got the float {shown(value)}",
                             f"write {int(value)} without the decimal point (a whole number{span}"
                             + (f": {why})" if why else ")"))
        raise InputError(field, f"must be a whole number, got {shown(value)}", fix)
    v = int(value)
    if minimum is not None and v < minimum:
        raise InputError(field, f"must be >= {minimum}, got {shown(v)}", fix)
    if maximum is not None and v > maximum:
        raise InputError(field, f"must be <= {maximum}, got {shown(v)}", fix)
    return v


MAX_CONTEXT_LEN = 10**8  # KV-cache tokens: ten times the longest context windows of today's models
MAX_TIME_LIMIT_S = 1e6  # seconds per layer (11.6 days): longer limits overflow backends' own timers (SCIP: 1e20)
MAX_WORK_LIMIT = 1e6  # deterministic seconds per layer, for the same reason
MAX_HOP_LATENCY_NS = 1e9  # one second per hop: beyond any network on a chip, and keeps every cost finite
DRAM_BW_GBPS_RANGE = (1e-6, 1e9)  # GB/s per node: outside it the roofline leaves float range or is meaningless
MAX_THREADS = 1024  # solver threads per layer: the backends hold 32-bit counts, and no machine here has more cores
MAX_BATCHES = 10**6  # batches of one replay: hours of work already; each keeps its latencies in memory
MAX_NODES = 2**31 - 1  # nodes of a mesh: far beyond any chip; the [D, D] hop-count matrix's size fits int64
MAX_EXPERTS = 2**20  # experts per MoE layer: the largest published layer (PEER's 1,048,576); arrays are [E, D]
MAX_LAYERS = 10**5  # MoE layers of one model: ~1000 times today's deepest; plans, traces and work are per layer
MAX_BATCH = 1e9  # tokens per batch: far beyond any decode batch, and well inside float range in every cost


def shown(value: Any) -> str:
    """``repr(value)`` cut to 60 characters, for messages; a whole number too long to print (Python
    refuses to write ints of more than 4300 digits) by its size."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(int(value)) >= 10**60:
        return f"a whole number of about {int(abs(int(value)).bit_length() * 0.30103) + 1} digits"
    return f"{value!r:.60}"


def check_real(field_name: str, value: Any, *, positive: bool = False, minimum: float | None = None,
               integer: bool = False, maximum: float | None = None) -> float:
    """``value`` as a float if it is a finite real number (not a bool) in range, else an InputError
    naming ``field_name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a whole number" if integer else "a number"
        raise InputError(field_name, f"must be {kind}, got {shown(value)}", f"write {kind} without quotes")
    if isinstance(value, numbers.Integral) and abs(int(value)) >= 2**63:
        limit = f"<= {maximum:g}" if maximum is not None and int(value) > 0 else (
            f">= {minimum:g}" if minimum is not None and int(value) < 0 else "of fewer than 19 digits")
        raise InputError(field_name, f"is out of range, got {shown(value)}", f"give a number {limit}")
    v = float(value)
    if not np.isfinite(v):
        raise InputError(field_name, f"must be finite, got {value!r}", "give a finite number")
    if integer and v != int(v):
        raise InputError(field_name, f"must be a whole number, got {value!r}", "drop the fraction")
    if positive and v <= 0:
        raise InputError(field_name, f"must be positive, got {value!r}", "give a number > 0")
    if minimum is not None and v < minimum:
        raise InputError(field_name, f"must be >= {minimum:g}, got {value!r}", f"give a number >= {minimum:g}")
    if maximum is not None and v > maximum:
        raise InputError(field_name, f"must be <= {maximum:g}, got {value!r}", f"give a number <= {maximum:g}")
    return v


MAX_SEED = 2**63 - 1  # numpy, CP-SAT (reduced to its 31 bits) and every derived seed take it exactly


def check_seed(seed: Any, field_name: str = "seed") -> int:
    """``seed`` as an int if it is a whole number in 0..:data:`MAX_SEED` (not a bool), else an
    InputError. Integers are taken exactly (never through a float, which rounds above 2**53); a float
    is accepted only where it is whole and exact."""
    fix = f"give a whole number in 0..{MAX_SEED}"
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Real):
        raise InputError(field_name, f"must be a whole number, got {seed!r:.60}", fix)
    if isinstance(seed, numbers.Integral):
        v = int(seed)
    else:
        f = float(seed)
        if not np.isfinite(f) or f != int(f):
            raise InputError(field_name, f"must be a whole number, got {seed!r}", fix)
        if abs(f) > 2**53:
            raise InputError(field_name, f"{seed!r} is a float, which cannot hold every whole number this large",
                             "write the seed as an integer (digits only, no exponent or decimal point)")
        v = int(f)
    if not 0 <= v <= MAX_SEED:
        raise InputError(field_name, f"is out of range, got {shown(v)}", fix)
    return v


def expect_instance(field: str, value: Any, kind: type | tuple[type, ...], fix: str = "", *,
                    optional: bool = False) -> Any:
    """``value`` if it is an instance of ``kind`` (or None with ``optional``), else an InputError
    naming ``field`` and the type given."""
    if (value is None and optional) or isinstance(value, kind):
        return value
    kinds = kind if isinstance(kind, tuple) else (kind,)
    want = " or ".join(k.__name__ for k in kinds) + (" or None" if optional else "")
    raise InputError(field, f"must be {want}, got {type(value).__name__} {value!r:.60}", fix)


def expect_path(field: str, value: Any, fix: str = "give a file name, e.g. 'plan.json'") -> Path:
    """``value`` as a Path if it is a non-empty str or os.PathLike, else an InputError naming ``field``."""
    if isinstance(value, Path) or (isinstance(value, str) and value.strip()):
        return Path(value)
    if hasattr(value, "__fspath__") and not isinstance(value, bytes):
        return Path(value)
    raise InputError(field, f"must be the path of a file, got {value!r:.60}", fix)


def expect_str(field: str, value: Any, example: str = "") -> str:
    """``value`` if it is a string, else an InputError."""
    if not isinstance(value, str):
        raise InputError(field, f"must be a string, got {value!r}", f"quote it, e.g. {example}" if example else
                         "quote it")
    return value


def _rows(field: str, value: Any, width: int | None) -> list[list[Any]]:
    if not isinstance(value, list):
        raise InputError(field, f"must be a list of rows, got {type(value).__name__}")
    for i, row in enumerate(value):
        if not isinstance(row, list):
            raise InputError(field, f"row {i} must be a list, got {type(row).__name__}")
        if width is None:
            width = len(row)
        if len(row) != width:
            raise InputError(field, f"row {i} has {len(row)} entries, row 0 has {width}",
                             "every row needs the same number of entries")
    return value


def int_matrix(field: str, value: Any, *, width: int | None = None) -> np.ndarray:
    """A list of equally long lists of integers (no bools, no floats, within int64) as an int64 array."""
    rows = _rows(field, value, width)
    for i, row in enumerate(rows):
        for x in row:
            if type(x) is not int:
                if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                    whole = isinstance(x, float) and x.is_integer()  # 4.0: the right value as a float
                    kind = "an integer" if whole else "a whole number"
                    raise InputError(field, f"row {i} holds {x!r}, not {kind}",
                                     "ids are integers" + (", written without a decimal point" if whole else ""))
            if not _I64_MIN <= x <= _I64_MAX:
                raise InputError(field, f"row {i} holds {x}, out of range", "ids are small non-negative integers")
    a = np.array(rows, dtype=np.int64)
    return a.reshape(len(rows), width if width is not None else (len(rows[0]) if rows else 0))


def real_matrix(field: str, value: Any, *, width: int | None = None) -> np.ndarray:
    """A list of equally long lists of finite real numbers (no bools) as a float array."""
    rows = _rows(field, value, width)
    shape = (len(rows), len(rows[0]) if rows else 0)
    if all(type(x) is float or type(x) is int for row in rows for x in row):  # plain JSON numbers: at C speed
        try:
            arr = np.array(rows, dtype=float)
        except (OverflowError, ValueError):  # an int too large for a float: the loop below names it
            arr = None
        if arr is not None and np.isfinite(arr).all():
            return arr.reshape(shape)
    for i, row in enumerate(rows):
        for x in row:
            if isinstance(x, bool) or not isinstance(x, numbers.Real) or not _finite_float(x):
                raise InputError(field, f"row {i} holds {shown(x)}, not a finite number",
                                 "write finite numbers, e.g. 0.25")
    return np.array(rows, dtype=float).reshape(shape)


def unique_keys(field: str) -> Any:
    """A ``json.loads`` ``object_pairs_hook`` that refuses a key repeated in one object (JSON keeps the
    last silently), naming ``field``."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise InputError(field, f"key {k!r} appears twice in one object", "give each key once")
            out[k] = v
        return out

    return hook


def json_int(field: str, source: str) -> Any:
    """A ``json.loads`` ``parse_int`` that refuses an integer too long to read (Python refuses over 4,300
    digits with a message naming no file), naming ``field`` and ``source`` (the file)."""

    def parse(text: str) -> int:
        digits = len(text.lstrip("-"))
        if digits > 4000:
            raise InputError(field, f"{source} holds a whole number of {digits:,} digits",
                             "write the small numbers it holds: expert ids, counts and sizes")
        return int(text)

    return parse


def _finite_float(x: numbers.Real) -> bool:
    """Whether ``x`` is a finite float (an integer too large for a float is not)."""
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def int_vector(field: str, value: Any) -> np.ndarray:
    """A list of integers as an int64 array (see :func:`int_matrix`)."""
    return _vector(field, value, int_matrix)


def real_vector(field: str, value: Any) -> np.ndarray:
    """A list of finite real numbers as a float array."""
    return _vector(field, value, real_matrix)


def _vector(field: str, value: Any, as_matrix: Any) -> np.ndarray:
    """One row of ``as_matrix``, with its messages speaking of a list rather than of row 0."""
    if not isinstance(value, list):
        raise InputError(field, f"must be a list, got {type(value).__name__}")
    try:
        return as_matrix(field, [value]).reshape(-1)
    except InputError as exc:
        raise InputError(field, exc.problem.replace("row 0 holds", "holds"), exc.fix) from None


def check_file(field: str, path: str | Path, fix: str) -> Path:
    """``path`` as a Path if it is an existing regular file, else an InputError saying what it is."""
    p = expect_path(field, path, fix)
    if not p.is_file():
        what = ("is a directory" if p.is_dir() else "is not a regular file" if p.exists() else "file not found")
        raise InputError(field, f"{what}: {p}", fix)
    return p


def freeze_arrays(obj: Any) -> None:
    """Replace every numpy array field of the frozen dataclass ``obj`` by a read-only copy, so that a
    result cannot change under its other users (a frozen dataclass freezes its fields, not their
    contents). Call from ``__post_init__``."""
    for name, value in vars(obj).items():
        if isinstance(value, np.ndarray):
            arr = np.array(value)
            arr.setflags(write=False)
            object.__setattr__(obj, name, arr)
