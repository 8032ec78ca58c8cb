"""The one placement type every strategy returns and the evaluator scores.

Per MoE layer, a :class:`LayerPlacement` lists *copies* of experts. Copy ``r`` holds expert
``expert_of[r]``; ``shares[r, c]`` is the fraction of that expert's weights (its intermediate
dimension, hence its FLOPs per token) held by node ``c``; each row sums to 1 (a copy is a whole
expert). Without replication there is exactly one copy per expert, in expert order. With
replication, ``token_fraction[r]`` is the share of the expert's tokens served by copy ``r``
(summing to 1 over the copies of an expert).
"""

from __future__ import annotations

import json
import numbers
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .errors import (
    MAX_EXPERTS,
    MAX_NODES,
    InputError,
    check_file,
    check_real,
    expect_int,
    expect_path,
    expect_str,
    int_vector,
    json_int,
    real_matrix,
    real_vector,
    unique_keys,
)

_TOL = 1e-6
# /2 adds package_version and the problem/solver record in meta; /3 (0.8.4) the model's sizes in that
# record (meta.problem.model_dims), which a /2 reader would refuse as an unknown key
PLAN_FORMAT = "hdmoe_milp.placement/3"
_READABLE = ("hdmoe_milp.placement/1", "hdmoe_milp.placement/2", PLAN_FORMAT)


# the keys of a plan file (to_dict); meta holds everything else
_PLAN_KEYS = {"format", "package_version", "strategy", "num_nodes", "num_experts", "meta", "layers"}


def _overwrite_fix(field: str) -> str:
    """How to replace an existing output named ``field``: the CLI's flag, or the Python keyword."""
    return f"{'pass --force' if field.startswith('--') else 'pass force=True'} to overwrite it, or write elsewhere"


def _link_new(tmp: str, p: Path, field: str) -> bool:
    """Put the written ``tmp`` at ``p`` only if nothing is there (a hard link fails on an existing
    name, atomically: a file that appeared since the command checked is not replaced), then drop
    ``tmp``. False where the file system has no hard links (the caller renames instead)."""
    try:
        os.link(tmp, p)
    except FileExistsError:
        raise InputError(field, f"{p} already exists (it appeared while this command ran)",
                         _overwrite_fix(field)) from None
    except OSError:
        return False
    Path(tmp).unlink(missing_ok=True)
    return True


def write_atomic(path: str | Path, text: str | bytes, *, force: bool = True, field: str = "out") -> None:
    """Write ``text`` (a str, or bytes) to ``path`` through a temporary file in the same folder
    (fsync, then rename), so an interrupted write never leaves a partial file where ``path`` was.
    ``force=False``: refuse (an InputError naming ``field``) to replace an existing file."""
    p = expect_path(field, path)
    if not p.parent.is_dir():
        raise InputError(field, f"folder {p.parent} does not exist", "create it or write elsewhere")
    if p.is_dir():
        raise InputError(field, f"{p} is a directory", "give a file name")
    if p.exists() and not p.is_file():  # a device, a socket, a pipe: a rename would replace it
        raise InputError(field, f"{p} is not a regular file", "give the path of a file")
    if not force and (p.exists() or p.is_symlink()):
        raise InputError(field, f"{p} already exists", _overwrite_fix(field))
    if p.is_symlink():  # write through the link: the file it names is replaced, the link stays
        p = Path(os.path.realpath(p))
        if not p.parent.is_dir():
            raise InputError(field, f"the link points into {p.parent}, which does not exist",
                             "fix the link or write elsewhere")
        if p.exists() and not p.is_file():
            raise InputError(field, f"the link points to {p}, which is not a regular file", "give the path of a file")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        raise InputError(field, f"cannot write in {p.parent}: {exc.strerror}", "write elsewhere") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a plan file is as readable as any other
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if force or not _link_new(tmp, p, field):
            os.replace(tmp, p)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise InputError(field, f"cannot write {p}: {exc.strerror}", "write elsewhere") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _numbers(field: str, value: Any, shape: str) -> np.ndarray:
    """``value`` as a numpy array of real numbers (ints or floats; not text, bools, or ragged rows)."""
    try:
        a = np.asarray(value)
    except (TypeError, ValueError):
        a = None
    if a is None or a.dtype.kind not in "iuf":
        got = type(value).__name__ + ("" if a is None else f" of {a.dtype}")
        raise InputError(field, f"must be an array of numbers {shape}, got {got}",
                         "give a numpy array or equally long lists of numbers")
    return a.astype(float) if a.dtype.kind == "f" else a


@dataclass(frozen=True)
class LayerPlacement:
    """Copies of the experts of one layer. Shapes: ``shares [R, D]``, ``expert_of [R]``,
    ``token_fraction [R]``."""

    shares: np.ndarray
    expert_of: np.ndarray
    token_fraction: np.ndarray
    num_experts: int

    def __eq__(self, other: object) -> bool:
        """Same layout: equal shares, copy owners and token fractions (exactly)."""
        if not isinstance(other, LayerPlacement):
            return NotImplemented
        return self.num_experts == other.num_experts and all(
            np.array_equal(getattr(self, n), getattr(other, n)) for n in ("shares", "expert_of", "token_fraction"))

    def __hash__(self) -> int:
        return hash((self.num_experts, self.shares.shape, self.shares.tobytes(), self.expert_of.tobytes(),
                     self.token_fraction.tobytes()))

    def __repr__(self) -> str:
        return (f"LayerPlacement({self.num_experts} experts, {self.num_copies} copies on {self.num_nodes} nodes, "
                f"{int((self.shares > 0).sum())} shards)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_experts", expect_int("placement.num_experts", self.num_experts, minimum=1))
        s = _numbers("placement.shares", self.shares, "[copies, nodes]").astype(float)
        eo_raw = _numbers("placement.expert_of", self.expert_of, "[copies]")
        if eo_raw.dtype.kind not in "iu" and not (eo_raw.dtype.kind == "f" and np.all(eo_raw == np.round(eo_raw))):
            raise InputError("placement.expert_of", f"must be whole expert ids, got dtype {eo_raw.dtype}",
                             "give integer ids")
        eo = eo_raw.astype(np.int64)
        tf = _numbers("placement.token_fraction", self.token_fraction, "[copies]").astype(float)
        if s.ndim != 2 or s.shape[0] == 0:
            raise InputError("placement.shares", f"must be a non-empty [copies, nodes] array, got shape {s.shape}")
        if eo.shape != (s.shape[0],) or tf.shape != (s.shape[0],):
            raise InputError("placement", "expert_of and token_fraction need one entry per copy (row of shares)")
        if not np.all(np.isfinite(s)) or np.any(s < -_TOL):
            raise InputError("placement.shares", "must be finite and non-negative", "shares are fractions in [0, 1]")
        rows = s.sum(axis=1)
        bad = np.flatnonzero(np.abs(rows - 1.0) > _TOL)
        if bad.size:
            raise InputError(
                "placement.shares",
                f"copy {int(bad[0])} (expert {int(eo[bad[0]])}) sums to {rows[bad[0]]:.6g}, not 1",
                "each copy must hold the whole expert: its shares over nodes sum to 1",
            )
        if eo.min() < 0 or eo.max() >= self.num_experts:
            raise InputError("placement.expert_of", f"expert ids must lie in 0..{self.num_experts - 1}")
        missing = np.setdiff1d(np.arange(self.num_experts), eo)
        if missing.size:
            raise InputError("placement", f"expert {int(missing[0])} has no copy", "every expert must be placed")
        if not np.all(np.isfinite(tf)) or np.any(tf < -_TOL):
            raise InputError("placement.token_fraction", "must be finite and non-negative")
        tot = np.bincount(eo, weights=tf, minlength=self.num_experts)
        badt = np.flatnonzero(np.abs(tot - 1.0) > _TOL)
        if badt.size:
            raise InputError(
                "placement.token_fraction",
                f"expert {int(badt[0])}'s copies serve {tot[badt[0]]:.6g} of its tokens, not 1",
                "the token fractions of an expert's copies must sum to 1",
            )
        s = np.clip(s, 0.0, None)
        for name, arr in (("shares", s), ("expert_of", eo), ("token_fraction", np.clip(tf, 0, None))):
            arr = np.array(arr)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @classmethod
    def from_shares(cls, shares: np.ndarray) -> LayerPlacement:
        """One copy per expert: ``shares [E, D]``."""
        s = _numbers("placement.shares", shares, "[experts, nodes]").astype(float)
        if s.ndim != 2:
            raise InputError("placement.shares", f"must be [experts, nodes], got shape {s.shape}")
        E = s.shape[0]
        return cls(s, np.arange(E), np.ones(E), E)

    @property
    def num_nodes(self) -> int:
        return self.shares.shape[1]

    @property
    def num_copies(self) -> int:
        return self.shares.shape[0]

    @property
    def is_replicated(self) -> bool:
        return self.num_copies != self.num_experts

    def expert_shares(self) -> np.ndarray:
        """``[E, D]`` share of each expert's token work done by each node (copies weighted by tokens)."""
        out = np.zeros((self.num_experts, self.num_nodes))
        np.add.at(out, self.expert_of, self.shares * self.token_fraction[:, None])
        return out

    def weight_copies_per_node(self) -> np.ndarray:
        """``[D]`` expert-weight volume stored on each node, in units of one expert."""
        return self.shares.sum(axis=0)


@dataclass(frozen=True)
class Placement:
    """A placement of every MoE layer of a model on ``num_nodes`` nodes: the one type every strategy
    returns and the evaluator scores.

    ``layers``: one :class:`LayerPlacement` per MoE layer (each: ``shares [copies, D]``, the share
    of a copy's weights and work on each node, rows summing to 1; ``expert_of [copies]``;
    ``token_fraction [copies]``, each expert's copies summing to 1). ``strategy``: the name it was
    made by. ``meta``: what it was made for and with (the problem's record, the solver's settings),
    kept in plan files and left out of ``==``. Save with :meth:`save`, read with :meth:`load`."""

    layers: tuple[LayerPlacement, ...]
    strategy: str = "custom"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __repr__(self) -> str:
        made = self.meta.get("problem") if isinstance(self.meta.get("problem"), dict) else {}
        what = ", ".join(f"{made[k]}" for k in ("model", "hw_point", "mesh") if made.get(k))
        return (f"Placement({self.strategy!r}: {self.num_layers} layers of {self.num_experts} experts on "
                f"{self.num_nodes} nodes" + (f", made for {what}" if what else "") + ")")

    def __post_init__(self) -> None:
        if not isinstance(self.layers, (tuple, list)) or not all(isinstance(lp, LayerPlacement) for lp in self.layers):
            raise InputError("placement.layers", f"must be a tuple of LayerPlacement, got {type(self.layers).__name__}",
                             "use Placement.from_shares(shares [layers, E, D]) or LayerPlacement.from_shares")
        object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.strategy, str) or not self.strategy.strip():
            raise InputError("placement.strategy", f"must be a non-empty name, got {self.strategy!r}",
                             "name the strategy that made it, e.g. 'custom'")
        if not isinstance(self.meta, dict):
            raise InputError("placement.meta", f"must be a dict, got {type(self.meta).__name__}",
                             "give a dict or leave it out")
        if not self.layers:
            raise InputError("placement", "has no layers")
        d = {lp.num_nodes for lp in self.layers}
        e = {lp.num_experts for lp in self.layers}
        if len(d) != 1 or len(e) != 1:
            raise InputError("placement", "all layers must use the same number of nodes and experts")

    @classmethod
    def from_shares(cls, shares: list[np.ndarray] | np.ndarray, strategy: str = "custom", **meta: Any) -> Placement:
        """One copy per expert in every layer: ``shares [layers, E, D]``."""
        if isinstance(shares, (str, bytes, dict)) or not isinstance(shares, (list, tuple, np.ndarray)):
            raise InputError("placement.shares", f"must be one [experts, nodes] share matrix per layer, got "
                             f"{type(shares).__name__}", "give a list of [E, D] arrays or one [layers, E, D] array")
        return cls(tuple(LayerPlacement.from_shares(s) for s in shares), strategy, dict(meta))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_nodes(self) -> int:
        return self.layers[0].num_nodes

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts

    def memory_bytes_per_node(self, expert_bytes: float) -> np.ndarray:
        """``[D]`` bytes of routed-expert weights stored on each node, summed over layers, for experts
        of ``expert_bytes`` bytes each (``model.expert_weight_bytes()``)."""
        if isinstance(expert_bytes, bool) or not isinstance(expert_bytes, numbers.Real):
            raise InputError("expert_bytes", f"must be a number of bytes, got {type(expert_bytes).__name__}",
                             "give model.expert_weight_bytes()")
        expert_bytes = check_real("expert_bytes", expert_bytes, minimum=0.0)
        return expert_bytes * np.sum([lp.weight_copies_per_node() for lp in self.layers], axis=0)

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "package_version": __version__,
            "strategy": self.strategy,
            "num_nodes": self.num_nodes,
            "num_experts": self.num_experts,
            "meta": self.meta,
            "layers": [
                {
                    "shares": lp.shares.tolist(),
                    "expert_of": lp.expert_of.tolist(),
                    "token_fraction": lp.token_fraction.tolist(),
                }
                for lp in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "plan") -> Placement:
        """A placement from its JSON form; every value is type-checked first (``source`` names the
        file in errors, e.g. ``plan.json layer 3: shares``)."""
        if not isinstance(d, dict):
            raise InputError(source, "is not a placement file (expected a JSON object)", "write it with Placement.save")
        fmt = d.get("format")
        if fmt is not None and fmt not in _READABLE:
            raise InputError(source, f"has format {fmt!r}, this version reads {', '.join(_READABLE)}",
                             "write it again with this version")
        unknown = sorted(set(d) - _PLAN_KEYS, key=str)
        if unknown:  # a misspelt key would be ignored silently
            raise InputError(source, f"has unknown key(s) {unknown[:5]}", "allowed: " + ", ".join(sorted(_PLAN_KEYS))
                             + "; put your own notes under meta")
        if "package_version" in d:  # informational, but a number or a list there is a damaged file
            expect_str(f"{source} package_version", d["package_version"], f'"{__version__}"')
        for key in ("num_experts", "layers"):
            if key not in d:
                raise InputError(f"{source} {key}", "is missing", "write the plan with Placement.save")
        E = expect_int(f"{source} num_experts", d["num_experts"], minimum=1, maximum=MAX_EXPERTS,
                       why="experts per layer")
        D = expect_int(f"{source} num_nodes", d["num_nodes"], minimum=1, maximum=MAX_NODES,
                       why="nodes of the mesh") if "num_nodes" in d else None
        strategy = expect_str(f"{source} strategy", d.get("strategy", "custom"), '"cb"')
        if not strategy.strip():
            raise InputError(f"{source} strategy", "is empty", 'name the strategy that made the plan, e.g. "cb"')
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise InputError(f"{source} meta", f"must be an object, got {type(meta).__name__}")
        raw_layers = d["layers"]
        if not isinstance(raw_layers, list) or not raw_layers:
            raise InputError(f"{source} layers", "must be a non-empty list of layers", "one entry per MoE layer")
        layers = []
        for li, ld in enumerate(raw_layers):
            where = f"{source} layer {li}"
            if not isinstance(ld, dict):
                raise InputError(where, f"must be an object, got {type(ld).__name__}",
                                 "each layer has shares, expert_of and token_fraction")
            extra = sorted(set(ld) - {"shares", "expert_of", "token_fraction"}, key=str)
            if extra:
                raise InputError(where, f"has unknown key(s) {extra[:5]}", "each layer has shares, expert_of and "
                                 "token_fraction only")
            for key in ("shares", "expert_of", "token_fraction"):
                if key not in ld:
                    raise InputError(f"{where}: {key}", "is missing", "each layer has shares, expert_of and "
                                     "token_fraction")
            try:
                layers.append(LayerPlacement(
                    real_matrix(f"{where}: shares", ld["shares"]),
                    int_vector(f"{where}: expert_of", ld["expert_of"]),
                    real_vector(f"{where}: token_fraction", ld["token_fraction"]),
                    E,
                ))
            except InputError as exc:
                if exc.field.startswith(where):
                    raise
                raise InputError(f"{where}: {exc.field}", exc.problem, exc.fix) from None
        try:
            plan = cls(tuple(layers), strategy, dict(meta))
        except InputError as exc:
            raise InputError(f"{source}: {exc.field}", exc.problem, exc.fix) from None
        if D is not None and plan.num_nodes != D:
            raise InputError(f"{source} num_nodes", f"is {D}, but the layers' shares have {plan.num_nodes} columns "
                             "(one per node)", "write the plan again with Placement.save, or correct num_nodes")
        return plan

    def save(self, path: str | Path, *, force: bool = True, field: str = "path") -> None:
        """Write the placement as JSON atomically: a temporary file in the same folder, fsync, then
        rename, so an interrupted write never leaves a partial file nor destroys the previous one.
        ``force=False`` refuses to replace an existing file. ``field``: the name errors give ``path``
        (the CLI passes its flag)."""
        p = expect_path(field, path)
        if p.is_dir():  # said as the CLI says it, before the suffix (a folder has none)
            raise InputError(field, f"{p} is a directory", "give a file name ending in .json")
        if p.suffix.lower() != ".json":  # load_plan and the CLI read .json plan files
            raise InputError(field, f"{p.name}: a plan file is JSON", "end the name in .json")
        try:
            text = json.dumps(self.to_dict())
        except (TypeError, ValueError) as exc:  # meta the caller filled with objects JSON cannot hold
            raise InputError("meta", f"cannot be written as JSON: {exc}",
                             "keep meta to strings, numbers, lists and dicts") from None
        write_atomic(path, text, force=force, field=field)

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        p = check_file("plan", path, "give the path of a plan .json file")
        try:
            d = json.loads(p.read_bytes().decode("utf-8-sig"), object_pairs_hook=unique_keys(f"plan {p.name}"),
                           parse_int=json_int("plan", str(p)))
        except InputError:
            raise
        except (ValueError, RecursionError) as exc:  # JSON and UTF-8 errors, ints too long to read
            raise InputError("plan", f"{p} is not a JSON plan file: {exc}", "write it with Placement.save") from None
        except OSError as exc:
            raise InputError("plan", f"cannot read {p}: {exc}") from None
        return cls.from_dict(d, f"plan {p.name}")
