"""Routing traces, workload statistics and batches.

A :class:`Trace` holds, per MoE layer, the top-k expert ids of every token (``[tokens, k]``).
A :class:`Workload` is what the evaluator scores: per layer, a list of *flows* (a token, or a group
of identical tokens) with their expert ids and a token count. It comes either from observed tokens
(:func:`sample_batch`, one flow per token) or from expected statistics (:func:`expected_workload`,
one flow per distinct expert set, weight ``f_g * B``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import (
    MAX_BATCH,
    MAX_EXPERTS,
    InputError,
    check_choice,
    check_file,
    check_real,
    check_seed,
    expect_instance,
    expect_int,
    int_matrix,
    json_int,
    shown,
    unique_keys,
)

BATCHING = ("expected", "random", "contiguous")


@dataclass(frozen=True)
class Trace:
    """Per-layer routing: ``layers[l]`` is an int array ``[tokens_l, top_k]`` of expert ids."""

    layers: tuple[np.ndarray, ...]
    num_experts: int
    top_k: int
    name: str = "trace"
    path: str | None = None  # the file it was read from (absolute), if any
    sha256: str | None = None  # of that file's bytes

    def __repr__(self) -> str:
        return (f"Trace({self.name!r}: {len(self.layers)} layers, {self.num_tokens()} tokens, top-{self.top_k} of "
                f"{self.num_experts} experts)")

    def __post_init__(self) -> None:
        layers = self.layers
        if isinstance(layers, np.ndarray) and layers.ndim == 3:  # [layers, tokens, top_k] in one array
            layers = tuple(layers)
        if not isinstance(layers, (tuple, list)):
            what = f"a {layers.ndim}-D array" if isinstance(layers, np.ndarray) else type(layers).__name__
            raise InputError("trace", f"layers must be a tuple of per-layer arrays [tokens, top_k], got {what}",
                             "e.g. Trace((ids_layer0, ids_layer1), num_experts, top_k); wrap one layer as (ids,)")
        object.__setattr__(self, "layers", tuple(layers))
        if len(self.layers) == 0:
            raise InputError("trace", "has no layers", "a trace needs at least one MoE layer")
        E = expect_int("trace.num_experts", self.num_experts, minimum=1, maximum=MAX_EXPERTS, why="experts per layer")
        k = expect_int("trace.top_k", self.top_k, minimum=1, maximum=E, why="experts per token, at most num_experts")
        object.__setattr__(self, "num_experts", E)
        object.__setattr__(self, "top_k", k)
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError("trace.name", f"must be a non-empty string, got {shown(self.name)}",
                             "e.g. name='my-trace'")
        for fld in ("path", "sha256"):
            if getattr(self, fld) is not None and not isinstance(getattr(self, fld), str):
                raise InputError(f"trace.{fld}", f"must be a string or None, got {shown(getattr(self, fld))}",
                                 "leave it out for a trace built in memory")
        for li, a in enumerate(self.layers):
            if not isinstance(a, np.ndarray) or a.dtype.kind not in "iu":
                raise InputError(f"trace layer {li}", "must be an integer numpy array [tokens, top_k] of expert ids",
                                 "e.g. np.asarray(ids, dtype=np.int64)")
            if a.ndim != 2:
                raise InputError(f"trace layer {li}", f"must be a 2-D array [tokens, top_k], got shape {a.shape}",
                                 "one row of top_k expert ids per token")
            if a.shape[0] == 0:
                raise InputError(f"trace layer {li}", "is empty", "every layer needs at least one token")
            if a.shape[1] != self.top_k:
                raise InputError(
                    f"trace layer {li}", f"has {a.shape[1]} experts per token, expected top_k={self.top_k}",
                    "check the model's top-k or the trace file",
                )
            if a.min() < 0 or a.max() >= self.num_experts:
                bad = (a < 0) | (a >= self.num_experts)
                row = int(np.argmax(bad.any(axis=1)))
                raise InputError(
                    f"trace layer {li}",
                    f"token {row} routes to expert {int(a[row][bad[row]][0])}, out of range (ids seen: "
                    f"{int(a.min())} to {int(a.max())})",
                    f"ids must lie in 0..{self.num_experts - 1}",
                )
            srt = np.sort(a, axis=1)
            if np.any(srt[:, 1:] == srt[:, :-1]):
                raise InputError(f"trace layer {li}", "a token lists the same expert twice", "top-k ids are distinct")
            if a.shape[0] != self.layers[0].shape[0]:  # expected and sampled batches would see different tokens
                raise InputError(f"trace layer {li}", f"has {a.shape[0]} tokens, layer 0 has {self.layers[0].shape[0]}",
                                 "every token passes through every MoE layer: give each layer the same tokens, "
                                 "in the same order")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def num_tokens(self) -> int:
        """Tokens of the trace (every layer has them all)."""
        return self.layers[0].shape[0]

    def frequencies(self) -> np.ndarray:
        """``[layers, E]`` f_i: fraction of tokens routed to expert i (each row sums to top_k)."""
        return np.stack([np.bincount(a.ravel(), minlength=self.num_experts) / a.shape[0] for a in self.layers])

    def coactivation(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Distinct sorted expert sets of a layer and their frequencies f_g (summing to 1)."""
        layer = expect_int("layer", layer, minimum=0, maximum=len(self.layers) - 1, why="MoE layers of the trace")
        uniq, counts = np.unique(np.sort(self.layers[layer], axis=1), axis=0, return_counts=True)
        return uniq, counts / counts.sum()

    def slice_tokens(self, start: int, stop: int, name: str | None = None) -> Trace:
        """Tokens ``start`` (inclusive) to ``stop`` (exclusive) of every layer, as a trace."""
        n = self.num_tokens()
        start = expect_int("start", start, minimum=0, maximum=max(n - 1, 0), why="token index")
        stop = expect_int("stop", stop, minimum=start + 1, maximum=n, why="token index past the last one kept")
        return Trace(tuple(a[start:stop] for a in self.layers), self.num_experts, self.top_k, name or self.name)


def check_window(field_name: str, batch: float, batching: str, trace: Trace, fix: str) -> None:
    """An InputError naming ``field_name`` if contiguous batches of ``batch`` tokens do not fit in
    ``trace`` (a window would wrap round and repeat tokens)."""
    if batching == "contiguous" and batch > trace.num_tokens():
        raise InputError(field_name, f"a contiguous window of {batch:g} tokens is longer than the trace "
                         f"({trace.num_tokens()} tokens)", fix)


class TraceShapeError(InputError):
    """A readable trace whose routing does not fit the model it was loaded for. ``what`` says how
    (``"routes 2 experts per token"``, ``"names expert 70"``); ``top_k`` is the trace's experts per
    token, ``max_id`` its largest expert id and ``num_layers`` its number of MoE layers."""

    def __init__(self, field: str, what: str, num_experts: int, model_top_k: int, top_k: int, max_id: int,
                 num_layers: int | None = None) -> None:
        super().__init__(field, f"{what}, but the model has top_k={model_top_k} of {num_experts} experts",
                         f"give a trace of a model with top_k={model_top_k} and {num_experts} experts, or choose "
                         "the trace's model")
        self.what = what
        self.top_k = top_k
        self.max_id = max_id
        self.num_layers = num_layers


def _check_fits(p: Path, layers: tuple[np.ndarray, ...], num_experts: int, top_k: int) -> None:
    """A :class:`TraceShapeError` if the trace routes another number of experts per token, or names
    an expert beyond ``num_experts``: most likely a trace of another model."""
    widths = {a.shape[1] for a in layers if a.ndim == 2}
    ids = [int(a.max()) for a in layers if a.ndim == 2 and a.size]
    k, max_id = (widths.pop() if len(widths) == 1 else None), max(ids, default=-1)
    if k is None or k == top_k and max_id < num_experts:
        return  # ragged or fitting: Trace's own checks name the layer
    what, field = f"routes {k} experts per token", f"trace {p.name}"
    if k == top_k:  # the first layer naming an expert beyond the model's
        li = next(i for i, a in enumerate(layers) if a.size and int(a.max()) >= num_experts)
        what, field = f"names expert {int(layers[li].max())}", f"trace {p.name} layer {li}"
    raise TraceShapeError(field, what, num_experts, top_k, k, max_id, len(layers))


def load_trace(path: str | Path, num_experts: int, top_k: int, max_tokens: int | None = None) -> Trace:
    """Load a routing trace.

    Formats: HD-MoE JSON ``{"<layer>": [[e1..ek], ...]}`` (``.json`` or ``.json.gz``; layer keys
    exactly ``"0"`` .. ``"L-1"``, ids whole numbers) and token-major integer arrays
    ``topk_ids [tokens, layers, k]`` in ``.npz``. Anything else is one :class:`InputError` naming the
    file (and the layer); a trace whose width or expert ids do not fit ``top_k`` / ``num_experts``
    (another model's) raises its subclass :class:`TraceShapeError`.
    """
    p = check_file("trace", path, "give the path of a .json, .json.gz or .npz trace")
    expect_int("num_experts", num_experts, minimum=1, maximum=MAX_EXPERTS, why="experts per layer")
    expect_int("top_k", top_k, minimum=1, maximum=int(num_experts), why="experts per token, of num_experts")
    if max_tokens is not None:
        expect_int("max_tokens", max_tokens, minimum=1)
    name = p.name.split(".")[0]
    try:
        data = p.read_bytes()
        lower = p.name.lower()  # TRACE.JSON.GZ as well
        _check_signature(p, lower, data)
        if lower.endswith(".npz"):
            layers = _npz_layers(p, data)
        elif lower.endswith(".json") or lower.endswith(".json.gz"):
            layers = _json_layers(p, data)
        else:
            raise InputError("trace", f"unsupported file type {p.name}", "use .json, .json.gz or .npz")
    except InputError:
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError, OverflowError, RecursionError, zlib.error,
            zipfile.BadZipFile, NotImplementedError, RuntimeError,  # zipfile: unsupported method, encrypted
            MemoryError) as exc:  # an .npz header claiming a shape far larger than its data
        raise InputError("trace", f"cannot read {p}: {type(exc).__name__}: {exc}",
                         "give an uncorrupted .json, .json.gz or .npz trace") from None
    if max_tokens is not None:
        layers = tuple(a[:max_tokens] for a in layers)
    _check_fits(p, layers, num_experts, top_k)
    sha = hashlib.sha256(data).hexdigest()
    try:
        return Trace(layers, num_experts, top_k, name, str(p.resolve()), sha)
    except InputError as exc:
        inner = exc.field.removeprefix("trace").strip()
        raise InputError(f"trace {p.name}" + (f" {inner}" if inner else ""), exc.problem, exc.fix) from None


def _check_signature(p: Path, lower: str, data: bytes) -> None:
    """A file whose first bytes say it is another format than its name (a gzip file named .json, an
    .npz named .json.gz) is refused with the name it needs, not with a decoding error."""
    kind = ("gzip" if data.startswith(b"\x1f\x8b") else "npz" if data.startswith(b"PK\x03\x04") else None)
    named = "npz" if lower.endswith(".npz") else "gzip" if lower.endswith(".gz") else "json"
    if kind is None or kind == named or not lower.endswith((".npz", ".json", ".json.gz")):
        return
    what = {"gzip": "gzip-compressed (a .json.gz trace)", "npz": "a zip archive (an .npz trace)"}[kind]
    want = {"gzip": ".json.gz", "npz": ".npz"}[kind]
    suffix = next(x for x in (".npz", ".json.gz", ".json") if lower.endswith(x))
    raise InputError("trace", f"{p.name} is {what}, but its name ends in {suffix}",
                     f"rename it to end in {want}")


def _npz_layers(p: Path, data: bytes) -> tuple[np.ndarray, ...]:
    # not "starts with PK": numpy reads a short or broken zip as a pickle, and says so
    if not data.startswith(b"PK\x03\x04") or not zipfile.is_zipfile(io.BytesIO(data)):
        if data.startswith(b"PK\x03\x04"):  # a zip that starts right but does not end: cut short
            raise InputError("trace", f"{p} is a truncated or corrupt .npz archive ({len(data)} bytes: its end, "
                             "the zip directory, is missing or broken)", "copy or save the file again")
        raise InputError("trace", f"{p} is not an .npz archive", "save it with numpy.savez(path, topk_ids=...)")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        if "topk_ids" not in z.files:
            raise InputError("trace", f"{p} has no 'topk_ids' array", "expected topk_ids [tokens, layers, k]")
        try:
            ids = np.asarray(z["topk_ids"])
        except ValueError as exc:  # object (pickled) arrays are never loaded
            raise InputError("trace", f"{p}: topk_ids is not a plain integer array ({exc.__class__.__name__})",
                             "store expert ids as an integer array") from None
    if ids.ndim != 3:
        raise InputError("trace", f"{p}: topk_ids must be [tokens, layers, k], got shape {ids.shape}",
                         "save one row of k expert ids per token and layer, e.g. shape (4096, 26, 6)")
    if ids.dtype.kind not in "iu":
        raise InputError("trace", f"{p}: topk_ids must hold integers, got dtype {ids.dtype}",
                         "store expert ids as an integer array")
    if ids.shape[1] == 0:
        raise InputError("trace", f"{p} has no layers", "topk_ids is [tokens, layers, k] with layers >= 1")
    if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max:
        raise InputError("trace", f"{p}: expert id {ids.max()} out of range", "ids are expert numbers 0, 1, ...")
    return tuple(np.ascontiguousarray(ids[:, li, :]).astype(np.int64) for li in range(ids.shape[1]))


def _json_layers(p: Path, data: bytes) -> tuple[np.ndarray, ...]:
    if p.name.lower().endswith(".gz"):
        data = gzip.decompress(data)
    raw = json.loads(data.decode("utf-8-sig"), object_pairs_hook=unique_keys(f"trace {p.name}"),
                     parse_int=json_int("trace", str(p)))
    if not isinstance(raw, dict) or not raw:
        raise InputError("trace", f"{p} must hold a non-empty object {{layer: [[experts]...]}}",
                         'e.g. {"0": [[3, 5], [1, 2]], "1": [...]}')
    if "expert_counts" in raw:  # OLMoE's published counts: a histogram per layer, no tokens
        raise InputError("trace", f"{p} holds per-expert counts (expert_counts), not a routing trace",
                         "a trace lists each token's top-k expert ids per layer; leave --trace out for the "
                         "synthetic trace, whose OLMoE profile comes from these counts")
    if "layers" in raw and "format" in raw:  # a plan file given where a trace goes
        raise InputError("trace", f"{p} is a plan file (a placement), not a routing trace",
                         "give a plan with --plan (evaluate, replay) or as plot's file; a trace lists each "
                         "token's top-k expert ids per layer")
    want = [str(i) for i in range(len(raw))]
    if sorted(raw) != sorted(want):
        if all(k.isdigit() and len(k) < 19 and str(int(k)) == k for k in raw):  # plain numbers: name the gap
            low, top = min(int(k) for k in raw), max(int(k) for k in raw)
            # n distinct numbers that are not 0..n-1 leave a gap below n
            gaps = ", ".join(repr(str(i)) for i in range(len(raw)) if str(i) not in raw)
            problem = f"layer keys lack {gaps:.60} (they run \"{low}\"..\"{top}\")"
            if low == 1 and top == len(raw):
                problem += ", numbered from 1"
        else:
            problem = (f"layer keys must be exactly \"0\"..\"{len(raw) - 1}\", "
                       f"got {sorted(set(raw) - set(want), key=str)[:3]}")
        raise InputError("trace", f"{p}: {problem}", "number the layers 0, 1, ... without gaps")
    layers = []
    for k in want:
        rows = raw[k]
        field = f"trace {p.name} layer {k}"
        if not isinstance(rows, list) or not rows:
            what = "is empty" if isinstance(rows, list) else f"must be a list of tokens, got {type(rows).__name__}"
            raise InputError(field, what, "every layer is a non-empty list of [expert ids]")
        layers.append(int_matrix(field, rows))
    return tuple(layers)


@dataclass(frozen=True)
class LayerRouting:
    """Flows of one layer: ``experts [F, k]`` ids and ``weight [F]`` tokens per flow."""

    experts: np.ndarray
    weight: np.ndarray


@dataclass(frozen=True)
class Workload:
    """What the evaluator scores: per-layer flows for a batch of ``batch_size`` tokens.

    ``kind`` is ``"observed"`` (each flow is real tokens) or ``"expected"`` (frequencies x B).
    """

    layers: tuple[LayerRouting, ...]
    num_experts: int
    top_k: int
    batch_size: float
    kind: str

    def __repr__(self) -> str:
        flows = sum(len(lr.weight) for lr in self.layers)
        return (f"Workload({self.kind}, batch {self.batch_size:g}, {len(self.layers)} layers, {flows} flows, "
                f"top-{self.top_k} of {self.num_experts} experts)")

    def __post_init__(self) -> None:
        E = expect_int("workload.num_experts", self.num_experts, minimum=1, maximum=MAX_EXPERTS,
                       why="experts per layer")
        k = expect_int("workload.top_k", self.top_k, minimum=1, maximum=E, why="experts per token")
        check_real("workload.batch_size", self.batch_size, positive=True)
        check_choice("workload.kind", self.kind, ("observed", "expected"))
        if not isinstance(self.layers, tuple) or not all(isinstance(lr, LayerRouting) for lr in self.layers):
            raise InputError("workload.layers", "must be a tuple of LayerRouting, one per MoE layer",
                             "build it with hm.expected_workload or hm.sample_batch")
        for li, lr in enumerate(self.layers):
            ids, w = np.asarray(lr.experts), np.asarray(lr.weight)
            where = f"workload.layers[{li}]"
            if ids.ndim != 2 or ids.shape[1] != k or not np.issubdtype(ids.dtype, np.integer):
                raise InputError(f"{where}.experts", f"must be whole expert ids of shape [flows, {k}], got "
                                 f"{ids.dtype} {ids.shape}", "one row of top-k expert ids per flow")
            if ids.size and (ids.min() < 0 or ids.max() >= E):
                raise InputError(f"{where}.experts", f"ids must lie in 0..{E - 1}", "use ids of this model's experts")
            if w.shape != (ids.shape[0],) or not np.all(np.isfinite(w)) or np.any(w < 0):
                raise InputError(f"{where}.weight", "must be finite, non-negative and one per flow",
                                 "give each flow's tokens")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def expert_loads(self) -> np.ndarray:
        """``[layers, E]`` tokens routed to each expert in this batch."""
        return np.stack(
            [
                np.bincount(lr.experts.ravel(), weights=np.repeat(lr.weight, self.top_k), minlength=self.num_experts)
                for lr in self.layers
            ]
        )


def physical_memory_bytes() -> int | None:
    """The machine's physical memory (None where ``os.sysconf`` cannot tell)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


# peak bytes per observed token, per MoE layer, per (top_k + 1): measured with tracemalloc on
# `evaluate` of random batches (about 110 bytes per token and layer at top-2), rounded up
_BYTES_PER_TOKEN_SLOT = 40


def observed_bytes(tokens: float, layers: int, top_k: int) -> float:
    """Estimated peak memory of scoring one observed batch of ``tokens`` tokens."""
    return float(tokens) * layers * (top_k + 1) * _BYTES_PER_TOKEN_SLOT


def check_observed_memory(field: str, tokens: float, layers: int, top_k: int) -> None:
    """Refuse up front (an InputError with the estimate and the limit) an observed batch whose memory
    estimate exceeds the machine's physical memory."""
    limit = physical_memory_bytes()
    need = observed_bytes(tokens, layers, top_k)
    if limit is not None and need > limit:
        fix = ("use fewer synthetic tokens (the default is enough for statistics)" if "synthetic_tokens" in field
               else "lower the batch size")
        raise InputError(field, f"{tokens:g} observed tokens need about {need / 1e9:.3g} GB, more than this "
                         f"machine's {limit / 1e9:.3g} GB of memory", fix)


def check_batch(batch: float, *, whole: bool = False) -> float:
    """``batch`` as a float if it is a real number (not a bool) in 1..:data:`MAX_BATCH` tokens
    (a whole number with ``whole``: an observed batch), else an InputError naming ``batch``."""
    return check_real("batch", batch, minimum=1, maximum=MAX_BATCH, integer=whole)


def _check_trace(trace: Trace) -> Trace:
    return expect_instance("trace", trace, Trace, "load one with hm.load_trace(path, num_experts, top_k)")


def _check_mode(mode: str, field: str = "mode") -> str:
    """``mode`` if it is ``random`` or ``contiguous`` (an observed batch), else an InputError."""
    if not isinstance(mode, str):
        raise InputError(field, f"must be 'random' or 'contiguous', got {mode!r:.60}", "quote it, e.g. 'random'")
    return check_choice(field, mode, ("random", "contiguous"))


def _seed(seed: int) -> int:
    """``seed`` checked by :func:`check_seed`; None is refused (it would draw unseeded randomness)."""
    if seed is None:
        raise InputError("seed", "is None, but batches are always drawn from a seed",
                         "give a whole number in 0..2**63-1, or leave it out for the default 0")
    return check_seed(seed)


def _window_fix(trace: Trace, field: str) -> str:
    return (f"give batch <= {trace.num_tokens()} (the trace's length in tokens) or {field}='random', which "
            "draws tokens at random")


def expected_workload(trace: Trace, batch: float) -> Workload:
    """Expected batch of ``batch`` tokens (a real number in 1..:data:`~hdmoe_milp.errors.MAX_BATCH`):
    one flow per distinct expert set g with weight f_g * B."""
    _check_trace(trace)
    b = check_batch(batch)
    layers = []
    for li in range(trace.num_layers):
        g, fg = trace.coactivation(li)
        layers.append(LayerRouting(g, fg * b))
    return _derived(tuple(layers), trace.num_experts, trace.top_k, b, "expected")


def sample_batch(trace: Trace, batch: int, mode: str = "random", seed: int = 0) -> Workload:
    """A batch of ``batch`` observed tokens (a whole number >= 1).

    ``random``: tokens drawn without replacement from the whole trace (many concurrent requests;
    with replacement only when ``batch`` exceeds the trace's length); ``contiguous``: a window of
    consecutive tokens (one conversation), at most the trace's length (a longer window would repeat
    tokens and is refused). The same token rows are used in every layer, so cross-layer structure is
    kept. Always seeded: ``seed`` is a whole number in 0..2**63-1, default 0 (None is refused rather
    than drawing unseeded randomness); the same seed gives the same batch.
    """
    _check_trace(trace)
    b = int(check_batch(batch, whole=True))
    _check_mode(mode)
    rng = np.random.default_rng(_seed(seed))
    n = trace.num_tokens()
    check_window("batch", b, mode, trace, _window_fix(trace, "mode"))
    check_observed_memory("batch", b, trace.num_layers, trace.top_k)
    if mode == "random":
        idx = rng.choice(n, size=b, replace=b > n)
    else:
        start = int(rng.integers(0, n - b + 1))
        idx = start + np.arange(b)
    return _observed(trace, idx)


def _observed(trace: Trace, idx: np.ndarray) -> Workload:
    """The observed batch made of token rows ``idx`` (the same rows in every layer)."""
    layers = tuple(LayerRouting(a[idx], np.ones(len(idx))) for a in trace.layers)
    return _derived(layers, trace.num_experts, trace.top_k, float(len(idx)), "observed")


def _derived(layers: tuple[LayerRouting, ...], num_experts: int, top_k: int, batch_size: float,
             kind: str) -> Workload:
    """A Workload of flows this module derived from a checked Trace (ids in range, weights it
    computed): ``Workload``'s per-flow checks, run once per replayed batch, are skipped."""
    wl = object.__new__(Workload)
    for name, v in (("layers", layers), ("num_experts", num_experts), ("top_k", top_k),
                    ("batch_size", batch_size), ("kind", kind)):
        object.__setattr__(wl, name, v)
    return wl


def iter_batches(trace: Trace, batch: int, mode: str = "random", seed: int = 0,
                 count: int | None = None) -> Iterator[Workload]:
    """An iterator over ``count`` (None: endless) successive observed batches of ``batch`` tokens,
    its arguments checked on the call. ``random``:
    each drawn as by :func:`sample_batch` from one generator seeded by ``seed`` (default 0; None is
    refused); ``contiguous``: consecutive windows from the trace's first token, cycling round the
    trace (a window no longer than the trace, so no batch repeats a token); ``seed`` does not move
    them (unlike :func:`sample_batch`, whose one contiguous window starts at a seeded token)."""
    _check_trace(trace)
    b = int(check_batch(batch, whole=True))
    _check_mode(mode)
    rng = np.random.default_rng(_seed(seed))
    if count is not None:
        count = expect_int("count", count, minimum=0)
    n = trace.num_tokens()
    check_window("batch", b, mode, trace, _window_fix(trace, "mode"))
    check_observed_memory("batch", b, trace.num_layers, trace.top_k)

    def batches() -> Iterator[Workload]:  # checked above, when called, not at the first batch
        i = 0
        while count is None or i < count:
            if mode == "contiguous":
                start = (i * b) % n
                idx = (start + np.arange(b)) % n
            else:
                idx = rng.choice(n, size=b, replace=b > n)
            yield _observed(trace, idx)
            i += 1

    return batches()


# --- statistics -------------------------------------------------------------------------------


def load_imbalance(loads: np.ndarray) -> np.ndarray:
    """max/mean of the last axis (1.0 = perfectly balanced)."""
    loads = np.asarray(loads, dtype=float)
    mean = loads.mean(axis=-1)
    return np.where(mean > 0, loads.max(axis=-1) / np.where(mean > 0, mean, 1), 1.0)


def hottest_share(freqs: np.ndarray) -> np.ndarray:
    """Per layer, the fraction of tokens that use the hottest expert (``max_i f_i``)."""
    return np.asarray(freqs).max(axis=-1)


def total_variation(freqs_a: np.ndarray, freqs_b: np.ndarray) -> np.ndarray:
    """Per-layer total-variation distance between two expert-popularity distributions."""
    a = np.asarray(freqs_a, dtype=float)
    b = np.asarray(freqs_b, dtype=float)
    a = a / a.sum(axis=-1, keepdims=True)
    b = b / b.sum(axis=-1, keepdims=True)
    return 0.5 * np.abs(a - b).sum(axis=-1)


def top_pair_share(trace: Trace) -> np.ndarray:
    """Per layer, the fraction of tokens whose top-k contains the most frequent expert pair."""
    out = []
    E = trace.num_experts
    for a in trace.layers:
        onehot = np.zeros((a.shape[0], E))
        np.put_along_axis(onehot, a, 1.0, axis=1)
        co = onehot.T @ onehot
        np.fill_diagonal(co, 0)
        out.append(co.max() / a.shape[0])
    return np.array(out)


def ep_node_imbalance(freqs: np.ndarray, num_nodes: int, seed: int = 0) -> np.ndarray:
    """Per layer max/mean node load when whole experts are dealt to ``num_nodes`` nodes at random
    (seeded by ``seed``, default 0)."""
    num_nodes = expect_int("num_nodes", num_nodes, minimum=1)
    rng = np.random.default_rng(check_seed(seed))
    f = np.asarray(freqs, dtype=float)
    E = f.shape[-1]
    out = []
    for row in f:
        node = np.empty(E, dtype=np.int64)
        node[rng.permutation(E)] = np.arange(E) % num_nodes
        out.append(load_imbalance(np.bincount(node, weights=row, minlength=num_nodes)))
    return np.array(out)


def summarize(trace: Trace, num_nodes: int | None = None, seed: int = 0) -> dict[str, float]:
    """Median/min/max skew statistics of a trace (for reports and calibration tests)."""
    f = trace.frequencies()
    hot = hottest_share(f)
    out = {
        "layers": trace.num_layers,
        "tokens": trace.num_tokens(),
        "hottest_share_min": float(hot.min()),
        "hottest_share_median": float(np.median(hot)),
        "hottest_share_max": float(hot.max()),
        "expert_max_over_mean_median": float(np.median(load_imbalance(f))),
        "top_pair_share_median": float(np.median(top_pair_share(trace))),
    }
    if num_nodes:
        out["ep_node_max_over_mean_median"] = float(np.median(ep_node_imbalance(f, num_nodes, seed)))
    return out
