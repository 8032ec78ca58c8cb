"""Solving the block MILP: one layer (warm start, backend, bound, gap) and whole models (in parallel)."""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from ...costs import layer_capacity_bytes
from ...errors import InputError, check_choice, check_real, freeze_arrays
from ...evaluator import EvalOptions, evaluate
from ...hardware import Hardware
from ...moe import MoEModel
from ...placement import LayerPlacement, Placement
from ...solvers import SolveParams, Termination, get_backend, lp_bound
from ...solvers.backends import make_outcome
from ...solvers.tasks import EXECUTORS, run_tasks
from ...workload import LayerRouting, Workload
from ..cb import compute_balanced
from ..common import check_freqs
from ..ep import expert_parallel, expert_parallel_lpt
from ..hdmoe import WORK_LIMIT, hdmoe_layer
from ..tp import tensor_parallel
from .blocks import layer_patterns
from .bnb import MAX_EXPERTS as BNB_MAX_EXPERTS
from .bnb import MAX_OPEN as BNB_MAX_OPEN
from .bnb import branch_and_bound
from .formulation import US, BlockModel, MilpOptions
from .heuristics import warm_starts
from .lns import LnsSettings, lns, lns_share
from .nodes import reorder_nodes
from .packing import PACKED, packings
from .polish import PASS_GAIN, IncrementalScore, polish

GAP_TOL = 5e-5  # integer scaling (CP-SAT) and LP tolerances
RESERVE_S = 0.05  # wall seconds kept back from the solver for decoding and scoring its plan
MIN_SOLVE_S = 0.02  # below this, the solver is not started
# --deterministic: the polish, branch and bound and LNS stop on work budgets sized to take about the
# limit on an idle core. This multiple of the limit, counted from the start of those stages (what comes
# before them ends on its own work), is only a wall-clock safety net: past it the answer would depend
# on the clock. The budgets are only roughly calibrated: a Qwen2-57B 8x8 10/25 layer's search takes
# 4.3 s for a 1 s budget on an idle core (a CP-SAT LNS step runs 3x slower than its deterministic
# time), and the bench grid (two such jobs on two cores) took over 5 s on 10 of 774 layers. At 5x from
# the layer's start, the net stopped 100 of them, mostly before their search. A layer that reaches
# the net says so (``wall_capped``).
DET_CAP = 10.0
# ... and never less than this many seconds: each stage has fixed costs (a CP-SAT call, an LNS step:
# tenths of a second on a loaded machine), so at limits of a few hundredths of a second the net, not
# the work budget, would stop layers (at 2 s it did, for a 0.02 s bench on Ray beside a benchmark)
DET_CAP_MIN_S = 10.0
# the largest mesh the block family is built for: 16x16 builds a DeepSeek-V3 layer in about 1 GB and
# keeps the layer's time limit; 32x32 takes minutes per layer before any search (the family's
# per-column link loads grow with nodes x links)
MAX_MESH_NODES = 256
WARM_SHARE = 0.5  # of a layer's wall limit, at most, for the greedy and local-search warm starts
LP_MIN_LEFT_S = 0.05  # wall mode: with less than this left after the warm starts, no LP bound (floors only)
# wall mode: seconds per nonzero kept back from the LP's limit for SciPy's work around HiGHS and
# HiGHS's overrun of it (measured: 0.46 s at a 0.2 s limit with 1.36 M nonzeros, 16x16; 0.21 s with 74 k,
# 4x8), with room for a second process beside it (jobs 2)
LP_S_PER_NONZERO = 4e-7


@dataclass(frozen=True)
class LayerSolveResult:
    """Outcome of one layer. Times in seconds. ``objective_s``: the evaluator's layer time of the
    returned placement (:class:`LayerScorer`); ``bound_s``: a valid lower bound on the evaluator's best
    layer time over ``family`` (what it certifies is in ``bound_certifies``); ``gap = (objective -
    bound) / objective``; ``status`` ``optimal`` when that gap meets the target. The block MILP's own
    numbers (before: ``objective_s``/``bound_s``) are ``model_objective_s`` and ``model_bound_s``.

    ``trace``: the layer's progress, points ``(time_s, primal_s, bound_s, what)`` in time order,
    ``time_s`` in wall seconds since the layer began (wall-clock even in deterministic mode), values in
    seconds (None where not known): ``warm-start:<name>`` (the best start's evaluator score, when
    scored), ``bound`` (the certified bound on the evaluator, LP + area floor, when computed),
    ``model:<backend>`` (a solver incumbent: the block model's objective and the solver's bound on
    it; the model's numbers, not the evaluator's), ``final`` (``objective_s`` and ``bound_s``)."""

    layer: int
    status: str
    objective_s: float
    bound_s: float | None
    gap: float | None
    time_s: float
    backend: str
    num_vars: int  # the block model's size; 0 when none was built (no time left, or not solved)
    num_binaries: int
    num_rows: int
    warm_start_objective_s: float
    warm_start_source: str
    source: str
    bound_certifies: str
    message: str
    placement: LayerPlacement = field(repr=False)
    assign: np.ndarray = field(repr=False)
    final_source: str = ""  # filled by the pipeline: which candidate the final plan took for this layer
    family: str = ""
    model_objective_s: float | None = None
    model_bound_s: float | None = None
    time_mode: str = "wall"
    trace: tuple[tuple[float, float | None, float | None, str], ...] = ()
    hdmoe: tuple[LayerPlacement, dict] | None = field(default=None, repr=False)  # the hdmoe layer computed here
    improvement: float | None = None  # (warm_start_objective_s - objective_s) / warm_start_objective_s
    lns_steps: int = 0
    lns_accepted: int = 0
    lns_gain: float = 0.0  # relative improvement LNS made on its start (the best plan before it)
    # deterministic mode only: the wall-clock safety net (DET_CAP x the limit), not the work budget,
    # ended the search, so this layer's plan depends on the machine's load (never set in wall mode)
    wall_capped: bool = False
    # wall mode: the limit the layer ran on, when the whole model's schedule cut it (None: as asked)
    cut_limit_s: float | None = None

    def __post_init__(self) -> None:
        freeze_arrays(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record: times in seconds (keys ending in ``_s``), ``gap``, ``improvement`` and
        ``lns_gain`` as fractions, ``trace`` points as described above; no placement."""
        return {
            "layer": self.layer, "status": self.status, "objective_s": self.objective_s, "bound_s": self.bound_s,
            "gap": self.gap, "time_s": self.time_s, "backend": self.backend, "num_vars": self.num_vars,
            "num_binaries": self.num_binaries, "num_rows": self.num_rows,
            "warm_start_objective_s": self.warm_start_objective_s,
            "warm_start_source": self.warm_start_source, "source": self.source,
            "bound_certifies": self.bound_certifies, "message": self.message, "final_source": self.final_source,
            "family": self.family, "model_objective_s": self.model_objective_s, "model_bound_s": self.model_bound_s,
            "time_mode": self.time_mode, "trace": [list(p) for p in self.trace], "improvement": self.improvement,
            "lns_steps": self.lns_steps, "lns_accepted": self.lns_accepted, "lns_gain": self.lns_gain,
            "wall_capped": self.wall_capped, "cut_limit_s": self.cut_limit_s,
        }


def baseline_layers(model: MoEModel, hw: Hardware, freqs_all: np.ndarray,
                    seed: int, batch: float) -> list[dict[str, LayerPlacement]]:
    """Per layer, the placements of the baselines the block model may express (TP, EP-LPT, EP, CB),
    built once for the whole model (they warm-start every layer's MILP), as the strategies of the
    same names build them for a batch of ``batch`` tokens."""
    makers = {"tp": tensor_parallel, "ep-lpt": functools.partial(expert_parallel_lpt, batch=batch),
              "ep": expert_parallel, "cb": compute_balanced}
    out: list[dict[str, LayerPlacement]] = [{} for _ in range(len(freqs_all))]
    for name, make in makers.items():
        try:
            plan = make(model, hw, freqs_all, seed=seed)
        except InputError:
            continue
        for li, lp in enumerate(plan.layers):
            out[li][name] = lp
    return out


HDMOE_WALL_SHARE = 0.5  # wall mode: the most of a layer's limit the hdmoe layer's stage-1 solve may take


def layer_baselines(
    model: MoEModel, hw: Hardware, freqs: np.ndarray, batch: float, *, backend: str, params: SolveParams,
    layer: int = 0, freqs_all: np.ndarray | None = None, coactivation: tuple[np.ndarray, np.ndarray] | None = None,
    baselines: dict[str, LayerPlacement] | None = None, hdmoe_work_limit: float | None = WORK_LIMIT,
) -> tuple[dict[str, LayerPlacement], tuple[LayerPlacement, dict] | None]:
    """The baseline layers :func:`solve_layer` starts from (and whose patterns its family holds):
    ``baselines`` or those of :func:`baseline_layers` (from ``freqs_all [layers, E]``, else ``freqs
    [E]`` repeated), plus the hdmoe layer computed here unless given or ``hdmoe_work_limit`` is None.
    Returns them and the computed ``(hdmoe layer, its info)`` (None if not computed)."""
    if baselines is None:
        f_all = np.tile(np.asarray(freqs, dtype=float), (model.moe_layers, 1)) if freqs_all is None else freqs_all
        baselines = baseline_layers(model, hw, f_all, params.seed, batch)[layer]
    hd = None
    if hdmoe_work_limit is not None and "hdmoe" not in baselines:
        # wall mode: the layer's limit counts this too, so its stage-1 solve gets a share of it (a
        # --work-limit it cannot spend there is cut, and the hdmoe layer then depends on the machine)
        cap = None if params.deterministic else HDMOE_WALL_SHARE * params.time_limit_s
        hd = hdmoe_layer(model, hw, np.asarray(freqs, dtype=float), coactivation, batch, seed=params.seed,
                         layer=layer, work_limit=hdmoe_work_limit, backend=backend, time_limit_s=params.time_limit_s,
                         wall_cap_s=cap)
        baselines = {**baselines, "hdmoe": hd[0]}
    return baselines, hd


def family_model(model: MoEModel, hw: Hardware, freqs: np.ndarray, batch: float, options: MilpOptions | None,
                 coactivation: tuple[np.ndarray, np.ndarray] | None,
                 baselines: dict[str, LayerPlacement]) -> BlockModel:
    """The layer's block model over its family: the aligned blocks and, with ``options.patterns``
    (default), every non-replicated baseline's shares per expert (``baselines``: this layer's)."""
    opts = options or MilpOptions()
    pats = layer_patterns(baselines, model.num_experts) if opts.patterns else None
    return BlockModel(model, hw, freqs, batch, opts, coactivation=coactivation, patterns=pats)


def family_text(options: MilpOptions | None) -> str:
    """What the candidate family of :func:`solve_layer` with these options contains (``family``)."""
    opts = options or MilpOptions()
    if not opts.patterns:
        return FAMILY_BLOCKS
    text = FAMILY_PATTERNS if opts.packings > 0 else FAMILY_PATTERNS.replace(FAMILY_PACKINGS, "")
    return text + (FAMILY_NODES if opts.node_order else "") + (FAMILY_FLIPS if opts.pattern_flips else "")


def _baseline_assigns(bm: BlockModel, baselines: dict[str, LayerPlacement]) -> dict[str, np.ndarray]:
    """Column assignments of the baseline layers that the block model can express (all the
    non-replicated ones when its family has their patterns)."""
    out = {}
    for name, lp in baselines.items():
        if lp.is_replicated:
            continue
        a = bm.assign_from_shares(lp.shares)
        if a is not None:
            out[name] = a
    return out


# the whole model, in wall mode: at most WHOLE_MODEL_SLACK x layers x limit / jobs, counted from the run's
# start; AFTER_POOL_S (at most a tenth of the whole) kept for what follows the layers; a late layer
# still gets SCHEDULE_FLOOR of its limit
WHOLE_MODEL_SLACK = 1.05
AFTER_POOL_S = 1.0
SCHEDULE_FLOOR = 0.25
SCHEDULE_MIN_CUT = 0.03  # a cut of less than this share of the limit is not made (V3 8x8 at 60 s: 2 %)
PACKING_SHARE = 0.1  # of a layer's wall limit, at most, for building balanced packings (V3 8x8: 1.6 s)


def packing_layers(model: MoEModel, hw: Hardware, freqs: np.ndarray, batch: float,
                   coactivation: tuple[np.ndarray, np.ndarray] | None, options: MilpOptions, *, seed: int,
                   deadline: float | None = None) -> dict[str, LayerPlacement]:
    """The ``options.packings`` best of the layer's balanced packings with neighbour splits
    (:func:`.packing.packings`) under the evaluator (:func:`layer_time_s`, the model's delivery rule),
    as layers to add to its baselines (they fit the layer's capacity share)."""
    cap = layer_capacity_bytes(model, hw, options.capacity_share)
    found = packings(model, hw, freqs, batch, seed=seed, capacity_bytes=cap, deadline=deadline)
    if not found:
        return {}
    layers = {k: LayerPlacement.from_shares(s) for k, s in found.items()}
    ranked = list(layers)  # without co-activation sets (top-k > 1) the evaluator cannot rank them
    wl = layer_workload(model, coactivation, np.asarray(freqs, dtype=float), batch)
    if wl is not None:
        m1, eo = dataclasses.replace(model, moe_layers=1), EvalOptions(delivery=options.delivery)
        ranked.sort(key=lambda k: layer_time_s(layers[k], m1, hw, wl, eo))
    return {k: layers[k] for k in ranked[:options.packings]}


def family_layers(model: MoEModel, hw: Hardware, freqs: np.ndarray, batch: float,
                  coactivation: tuple[np.ndarray, np.ndarray] | None, options: MilpOptions | None,
                  baselines: dict[str, LayerPlacement], *, seed: int,
                  deadline: float | None = None, nodes_s: float | None = None,
                  nodes_steps: int | None = None) -> dict[str, LayerPlacement]:
    """The layers whose patterns :func:`family_model` adds to the family, and which start the
    search (:func:`layer_family`'s first item)."""
    return layer_family(model, hw, freqs, batch, coactivation, options, baselines, seed=seed, deadline=deadline,
                        nodes_s=nodes_s, nodes_steps=nodes_steps)[0]


def layer_family(model: MoEModel, hw: Hardware, freqs: np.ndarray, batch: float,
                 coactivation: tuple[np.ndarray, np.ndarray] | None, options: MilpOptions | None,
                 baselines: dict[str, LayerPlacement], *, seed: int,
                 deadline: float | None = None, nodes_s: float | None = None, nodes_steps: int | None = None,
                 ) -> tuple[dict[str, LayerPlacement], BlockModel]:
    """The layers whose patterns the family holds, and which start the search, with the family's
    block model (:func:`family_model`): the layer's ``baselines`` and, with ``options.patterns``,
    its best balanced packings (:func:`packing_layers`, built until ``deadline``) and, with
    ``options.node_order``, the best two of those layouts with their nodes' contents reordered
    (:func:`reordered_layers`, for at most ``nodes_s`` wall seconds and ``nodes_steps`` search
    steps; None: no such limit). A reordered baseline joins beside the baseline; a reordered packing replaces the
    packing. Reordered layouts whose patterns would lower the family floor (they can give a hot
    expert a cheaper column than any aligned block or original layout) are left out, the worse one
    first: the bound would fall with it (DeepSeek-V2-Lite 4x8 10/25 layer 7: 68.08 -> 65.55 us). In
    wall mode the search is skipped where ``nodes_s`` is less than two builds of the family."""
    opts = options or MilpOptions()
    layers = dict(baselines)
    if opts.patterns and opts.packings > 0:
        layers.update(packing_layers(model, hw, freqs, batch, coactivation, opts, seed=seed, deadline=deadline))
    t_build = time.perf_counter()
    bm = family_model(model, hw, freqs, batch, opts, coactivation, layers)
    t_build = time.perf_counter() - t_build
    # wall mode: where the two more builds of the family the search may need would take its whole
    # share of the limit, it is skipped (a DeepSeek-V3 16x16 family takes seconds and a GB to build)
    if not (opts.patterns and opts.node_order) or nodes_s is not None and nodes_s < NODES_BUILDS * t_build:
        return layers, bm
    end = None if nodes_s is None else time.perf_counter() + nodes_s
    moved = reordered_layers(model, hw, freqs, batch, coactivation, opts, layers, seed=seed, deadline=end,
                             steps=nodes_steps)
    for keep in range(len(moved), 0, -1):  # the best layout's reordering is tried last alone
        trial = dict(layers)
        for name, lp in list(moved.items())[:keep]:
            if name.startswith(PACKED):  # a packing's node order was the packing's own choice
                del trial[name]
            trial[name + NODES] = lp
        bm1 = family_model(model, hw, freqs, batch, opts, coactivation, trial)
        if bm1.family_floor_s >= bm.family_floor_s * (1 - 1e-12):
            return trial, bm1
        del bm1  # before the next build: one family at a time beside the first
    return layers, bm


NODES = "~nodes"  # the name of a layout whose nodes' contents the node-order search reordered ends with this
NODES_SHARE = 0.1  # of a layer's wall limit, at most, for the node-order search
NODES_BUILDS = 2  # builds of the family, at most, that the search adds (in its share: else it is skipped)
# --deterministic: search steps per second of the limit (a step took 1-5 ms on 4x8, 10-25 ms on DeepSeek-V3 8x8;
# without a budget, 8 restarts on a DeepSeek-V2-Lite 8x8 layer took about 20 s at any limit)
NODES_STEPS_PER_S = 100
NODES_LAYOUTS = 2  # the best this many layouts are reordered (each adds its patterns: DeepSeek-V3 8x8's LP
# took 24 s instead of 6 s with every baseline's)


def reordered_layers(model: MoEModel, hw: Hardware, freqs: np.ndarray, batch: float,
                     coactivation: tuple[np.ndarray, np.ndarray] | None, options: MilpOptions,
                     layers: dict[str, LayerPlacement], *, seed: int = 0,
                     deadline: float | None = None, steps: int | None = None) -> dict[str, LayerPlacement]:
    """Per layout of the :data:`NODES_LAYOUTS` best of ``layers`` (non-replicated) under the
    evaluator, the same node contents reordered on the mesh by :func:`.nodes.reorder_nodes` where
    that lowers its evaluator time: the compute term stays, the link loads fall. Tree delivery with
    co-activation sets only (the search counts the union messages); the best layouts first, each
    with an equal share of the time to ``deadline`` (``time.perf_counter()``; None: no deadline, the
    same answer every run) and of ``steps`` (a work budget: :func:`.nodes.reorder_nodes`), its random
    restarts seeded by ``seed``."""
    wl = layer_workload(model, coactivation, np.asarray(freqs, dtype=float), batch)
    if wl is None or coactivation is None or options.delivery != "tree" or hw.num_nodes < 2:
        return {}
    m1, eo = dataclasses.replace(model, moe_layers=1), EvalOptions(delivery=options.delivery)
    scores = {k: layer_time_s(lp, m1, hw, wl, eo) for k, lp in layers.items() if not lp.is_replicated}
    ids, tokens = wl.layers[0].experts, wl.layers[0].weight
    out = {}
    todo = sorted(scores, key=scores.__getitem__)[:NODES_LAYOUTS]
    for i, name in enumerate(todo):
        now = time.perf_counter()
        if deadline is not None and now >= deadline:
            break
        mine = None if deadline is None else now + (deadline - now) / (len(todo) - i)  # an equal share each
        new = reorder_nodes(layers[name], model, hw, ids, tokens, deadline=mine, seed=seed,
                            steps=None if steps is None else steps // len(todo))
        if new is not None and layer_time_s(new, m1, hw, wl, eo) < scores[name] * (1 - 1e-12):
            out[name] = new
    return out


BOUND_SHARE = 0.5  # of a monolithic layer's solver budget, for the certificate's relaxation as a MILP
BOUND_BACKENDS = ("cpsat", "highs", "scip")  # backends that report a bound and take a hint
BOUND_EMPHASIS = "bound"  # SolveParams.emphasis of the bound stage (measured in formulations/offline_milp.md)


def bound_milp_share(backend: str, lns_share: float) -> float:
    """Fraction of a layer's solver budget spent on solving the certificate's relaxation
    (:meth:`BlockModel.to_linear_lower`) as a MILP: :data:`BOUND_SHARE` on layers solved by the
    monolithic model (no LNS) with a backend that reports a bound, else 0 (on LNS layers the
    relaxation has thousands of binaries and its MILP bound stayed at the LP's; measured in
    ``formulations/offline_milp.md``)."""
    return BOUND_SHARE if lns_share == 0 and backend in BOUND_BACKENDS else 0.0


def solve_layer(
    model: MoEModel,
    hw: Hardware,
    freqs: np.ndarray,
    batch: float = 128,
    *,
    backend: str = "cpsat",
    params: SolveParams | None = None,
    options: MilpOptions | None = None,
    layer: int = 0,
    freqs_all: np.ndarray | None = None,
    coactivation: tuple[np.ndarray, np.ndarray] | None = None,
    baselines: dict[str, LayerPlacement] | None = None,
    hdmoe_work_limit: float | None = WORK_LIMIT,
    lns_settings: LnsSettings | None = None,
    bound_share: float | None = None,
    schedule: tuple[float, int] | None = None,
) -> LayerSolveResult:
    """Solve one layer's block MILP for expert frequencies ``freqs [E]`` and batch ``batch``;
    ``coactivation`` (distinct expert sets ``[G, k]`` and their frequencies) enables co-location modelling.
    ``baselines``: this layer's baseline placements (else built from ``freqs_all [layers, E]``, or
    from ``freqs`` repeated over the layers). Unless ``baselines`` has one or ``hdmoe_work_limit`` is
    None, the hdmoe baseline's layer is computed here (:func:`strategies.hdmoe.hdmoe_layer` with that
    stage-1 work limit, ``params.seed``, ``layer``, ``backend`` and ``params.time_limit_s``: the
    ``hdmoe`` strategy's layer) and returned in ``hdmoe``.

    Family (``options.patterns``, default): the aligned blocks plus, per expert, the shares every
    non-replicated baseline and, on layers with at least 4 experts per node, the best
    ``options.packings`` balanced packings (:func:`family_layers`) give it, so the returned plan
    is never worse under the evaluator than any of them that fits the layer's capacity share.
    Warm start: the best of the baselines and the greedy heuristics under the block model (a MIP
    start for CBC, a hint for CP-SAT). The returned placement is the best under the evaluator of
    the solver's plan and every warm start; when the solver fails, that warm start comes back with
    the solver's status.

    Time: ``params.time_limit_s`` covers everything the layer does (warm starts, scoring, model build,
    the LP bound, the backend's translation and search): the bound and the solver get what remains.
    ``schedule`` (wall mode; :func:`schedule_tasks`): the whole model's end (``time.time()``) and
    the pool slots left, this one included; the layer's limit becomes the time left over the slots
    left when that is shorter (at least ``SCHEDULE_FLOOR`` of it), and its message says so.
    Bound stage (``bound_share``, default :func:`bound_milp_share`): that share of what remains
    (deterministic: of the work budget) solves the certificate's relaxation as a MILP with the
    layer's backend, from the best warm start; its proven bound replaces the LP's when higher, and
    its plan is kept when the evaluator scores it better. The monolithic solve gets the rest.
    The bound is computed before the solve, and a warm start that already meets ``params.gap`` ends
    the layer. ``params.deterministic``: CP-SAT's limit is its deterministic time (``work_limit`` or
    ``time_limit_s``), the LP bound runs to completion and nothing is cut by wall time, so the same
    inputs give the same answer (``time_mode`` in the result says which).

    Polish (:mod:`.polish`, ``lns_settings.polish``): swaps and moves scored by the evaluator itself,
    from the best plan before the model solve (at most ``polish_share`` of the remaining wall time;
    deterministic: a work share, counted in evaluations) and again after the model solve and LNS if
    they changed it.

    Branch and bound (:mod:`.bnb`, ``lns_settings.bnb``): on layers with at most
    :data:`.bnb.MAX_EXPERTS` experts and co-activation sets, a best-first search over the family
    on the evaluator's own score replaces the bound stage, after the polish, with
    ``lns_settings.bnb_share`` of what remains (deterministic: a node budget); its bound replaces
    the LP's when higher and its plan is kept when better. The model solve gets what is left.

    LNS (:mod:`.lns`, ``lns_settings``): on layers with more experts than one neighbourhood frees
    (CP-SAT only), a share (:func:`.lns.lns_share`) of the solver's budget goes to fix-and-optimize
    from the best plan after the monolithic solve (wall: what remains of the limit; deterministic: that
    share of the work limit). ``improvement`` in the result: relative improvement of the returned plan
    over the best warm start (``warm_start_objective_s``) under the evaluator.
    """
    params = params or SolveParams()
    check_real("batch", batch, positive=True)
    schedule_note = ""
    asked = params  # the hdmoe baseline keeps the asked limit: a cut must not change what it compares with
    if schedule is not None and not params.deterministic:  # a whole model behind its schedule: a shorter limit
        run_end, slots_left = schedule
        cut = max((run_end - time.time()) / max(int(slots_left), 1), SCHEDULE_FLOOR * params.time_limit_s)
        if cut < params.time_limit_s * (1 - SCHEDULE_MIN_CUT):  # smaller cuts: the slack covers them
            schedule_note = (f"; its limit was cut from {params.time_limit_s:g} to {cut:.3g} s to keep the whole "
                             "model within layers x limit / jobs")
            params = replace(params, time_limit_s=cut)
    t0 = time.perf_counter()
    deadline = t0 + params.time_limit_s
    solver = get_backend(backend)
    baselines, hd = layer_baselines(model, hw, freqs, batch, backend=backend, params=asked, layer=layer,
                                    freqs_all=freqs_all, coactivation=coactivation, baselines=baselines,
                                    hdmoe_work_limit=hdmoe_work_limit)
    baselines, bm = layer_family(model, hw, freqs, batch, coactivation, options, baselines, seed=params.seed,
                                 deadline=None if params.deterministic else t0 + PACKING_SHARE * params.time_limit_s,
                                 nodes_s=None if params.deterministic else NODES_SHARE * params.time_limit_s,
                                 nodes_steps=(max(1, int(NODES_STEPS_PER_S * NODES_SHARE * params.time_limit_s))
                                              if params.deterministic else None))
    # wall mode: the heuristics may take at most WARM_SHARE of the limit (V3 8x8: 3.4 s in all)
    starts = warm_starts(bm, _baseline_assigns(bm, baselines),
                         deadline=None if params.deterministic else t0 + WARM_SHARE * params.time_limit_s)
    if not starts:
        need = model.num_experts * model.expert_weight_bytes() / hw.num_nodes
        raise InputError(
            "hardware.dram_capacity_bytes",
            f"no block placement of layer {layer} fits {bm.cap_layer / 1e9:.3f} GB per node for this layer "
            f"(experts need at least {need / 1e9:.3f} GB per node)", "raise the capacity or use a larger mesh",
        )
    score = LayerScorer(bm)
    ws_name = min(starts, key=lambda k: bm.objective(starts[k]))  # the solver's start: best under its model
    ws = starts[ws_name]
    start_scores = {k: score(a) for k, a in starts.items()}
    best_start = min(start_scores, key=start_scores.__getitem__)
    assign, obj, source = starts[best_start], start_scores[best_start], "warm-start:" + best_start
    trace = [(time.perf_counter() - t0, obj, None, source)]
    # the bound first (cheap): a warm start that already meets the gap target ends the layer
    det = params.deterministic
    left = deadline - time.perf_counter()
    build_s = 0.0  # wall seconds the relaxation took to build: the full model takes longer
    if det or left > LP_MIN_LEFT_S:
        t_build = time.perf_counter()
        lower = bm.to_linear_lower(incumbent_s=obj)  # columns that cannot beat the best start are fixed at 0
        build_s = time.perf_counter() - t_build
        # the LP's limit counts from now (building it took 0.4 s of a 3 s layer on 16x16), less what
        # SciPy spends around HiGHS (converting the rows, reading the answer back: 0.3 s there)
        left = deadline - time.perf_counter() - RESERVE_S - LP_S_PER_NONZERO * lower.A.nnz
        bound = lp_bound(lower, time_limit_s=None if det else left) if det or left > LP_MIN_LEFT_S else None
    else:  # the warm starts spent the limit (huge meshes at tiny limits): building the LP alone
        lower = bound = None  # would overrun it (16x16 DeepSeek-V3: 3 s at a 1 s limit); the floors stand in
    # the LP can be cut by the time limit: the family floor (no solve) is always there
    bound = min(max(bm.family_floor_s, -np.inf if bound is None else bound / US), obj)
    trace.append((time.perf_counter() - t0, None, bound, "bound"))

    def gap_of(o: float) -> float | None:
        return None if bound is None or o <= 0 else max(0.0, (o - bound) / o)

    def proven(o: float) -> bool:  # the gap target is met by plan score o and the current bound
        g = gap_of(o)
        return g is not None and g <= params.gap

    ls = lns_settings or LnsSettings()
    share = lns_share(bm, ls, backend)
    # small layers: branch and bound on the evaluator's score replaces the bound stage
    use_bnb = ls.bnb and score.workload is not None and model.num_experts <= BNB_MAX_EXPERTS
    bnb_frac = min(max(ls.bnb_share, 0.0), 1.0) if use_bnb else 0.0  # of what remains after the polish
    if use_bnb:
        b_share = 0.0
    else:
        b_share = bound_milp_share(backend, share) if bound_share is None else float(min(max(bound_share, 0.0), 1.0))
    work = params.work_limit if params.work_limit is not None else params.time_limit_s  # deterministic budget
    remaining = deadline - time.perf_counter() - RESERVE_S
    if b_share > 0 and lower is not None and not proven(obj) and (det or remaining > MIN_SOLVE_S):
        # the certificate's relaxation solved as a MILP: branching lifts the bound above its LP
        sp = replace(params, hint=bm.lower_vector(bm.canonical(assign), lower), emphasis=BOUND_EMPHASIS)
        if det:  # CP-SAT counts the work share; the others (wall only) get that share of the limit
            sp = replace(sp, work_limit=work * b_share,
                         time_limit_s=params.time_limit_s * (1.0 if backend == "cpsat" else b_share))
        else:
            sp = replace(sp, time_limit_s=remaining * b_share)
        try:
            out = solver.solve(lower, sp)
        except Exception:  # a failed bound stage leaves the LP bound and the plan as they are
            out = None
        if out is not None and (out.bound is not None or out.x is not None):
            better = False
            if out.x is not None:  # its optimum is a plan of the family too
                cand = bm.decode(out.x)
                if bm.feasible(cand):
                    cobj = score(cand)
                    if cobj < obj * (1 - 1e-12):
                        assign, obj, source, better = cand, cobj, f"{backend}-lower", True
            if out.bound is not None:
                bound = min(max(bound, out.bound / US), obj)
            trace.append((time.perf_counter() - t0, obj if better else None, bound, f"bound:{backend}"))

    # wall: the deadline; deterministic: an evaluation budget, with the wall-clock cap as a safety net.
    # Everything above ends on its own work (or runs to completion) whatever the clock says, so the net
    # starts here: counted from the layer's start, the setup of a 64-expert 8x8 layer (3-4 s) left the
    # search a fraction of its budget at 1 s, and the bench grid stopped 100 of 774 layers on it
    # (with a work limit, the time limit is a wall limit of its own; else the net, at least DET_CAP_MIN_S)
    net_s = params.time_limit_s if params.work_limit else max(DET_CAP * params.time_limit_s, DET_CAP_MIN_S)
    cap = deadline - RESERVE_S if not det else time.perf_counter() + net_s
    pol = _Polisher(bm, score, params.seed, ls.polish and score.workload is not None)
    packed = any(k.startswith(PACKED) for k in starts)  # the layer has balanced packings
    polish_evals = int(ls.polish_share * work / ls.polish_eval_cost) if det else None  # a work budget

    def window() -> float:  # a polish's end in wall mode: its share of what remains
        return time.perf_counter() + ls.polish_share * max(cap - time.perf_counter(), 0.0)

    if not proven(obj):
        end = cap if det else window()
        if (better := pol.run(assign, obj, end, polish_evals)) is not None:
            assign, obj, source = better[0], better[1], f"{source}+polish"
            trace.append((time.perf_counter() - t0, obj, None, "polish"))
        # with packings, the best start of the other group too (packings or the rest), with what is left
        # of the window: the best start is not always the best after its polish (on Qwen2 4x8 a
        # packing's local optimum was 2.9 % worse than a polished block plan's)
        other = [k for k in sorted(start_scores, key=start_scores.__getitem__)
                 if k.startswith(PACKED) != best_start.startswith(PACKED)]
        if ls.polish_packed and other and packed and not proven(obj):
            second = other[0]
            second_evals = None if polish_evals is None else polish_evals // 2  # deterministic: half a budget more
            first_cut = pol.cut
            if (better := pol.run(starts[second], start_scores[second], end, second_evals)) is not None \
                    and better[1] < obj * (1 - 1e-12):
                assign, obj, source = better[0], better[1], f"warm-start:{second}+polish"
                trace.append((time.perf_counter() - t0, obj, None, "polish"))
            else:
                pol.cut = first_cut  # the plan kept is the first polish's, as that left it
            pol.last = np.asarray(assign).copy()  # the plan kept is the one polished
    bnb_note = ""
    if use_bnb and not proven(obj):
        inc = pol.incremental(assign)
        allowed = bm.allowed & ~bm.beaten_columns(obj)  # incumbent fixing, as for the LP
        if det:
            br = branch_and_bound(inc, allowed, assign, obj, gap=params.gap, deadline=cap,
                                  max_nodes=int(bnb_frac * work * ls.bnb_nodes_per_s))
        else:
            br = branch_and_bound(inc, allowed, assign, obj, gap=params.gap,
                                  deadline=time.perf_counter() + bnb_frac * max(cap - time.perf_counter(), 0.0))
        better = False
        if br.improved:
            cobj = score(br.assign)  # the reported number is the evaluator's own
            if cobj < obj * (1 - 1e-12):
                assign, obj, source, better = br.assign, cobj, "bnb", True
        bound = min(max(bound, br.bound_s), obj)
        trace.append((time.perf_counter() - t0, obj if better else None, bound, "bnb"))
        why = {"proven": "the gap target was met", "deadline": "the time limit was reached",
               "nodes": "its node budget was spent", "memory": f"{BNB_MAX_OPEN:,} nodes were open"}[br.stop]
        bnb_note = f"; branch and bound: {_count(br.nodes, 'node')}, stopped because {why}"
    # no model when the limit is already spent: building it alone overran a 1 s limit by 0.7 s (16x16),
    # and with less time left than the relaxation took to build it overran a 3 s limit by 0.25 s there
    lm = (bm.to_linear() if det or deadline - time.perf_counter() - RESERVE_S > MIN_SOLVE_S + build_s
          else None)
    remaining = deadline - time.perf_counter() - RESERVE_S
    if proven(obj):
        raw = make_outcome(backend, lm, Termination.OPTIMAL, None, None,
                           "gap target proven before the model solve (warm starts and bound"
                           + (", branch and bound)" if use_bnb else ")"))
    elif use_bnb and (remaining <= MIN_SOLVE_S if not det else bnb_frac >= 1.0):
        raw = make_outcome(backend, lm, Termination.FEASIBLE, None, None, "the branch and bound had the whole budget")
    elif lm is None or (not det and remaining <= MIN_SOLVE_S):  # (wall mode) not built, or built too late
        raw = make_outcome(backend, lm, Termination.FEASIBLE, None, None, "time limit spent before the solve")
    elif share >= 1.0:
        raw = make_outcome(backend, lm, Termination.FEASIBLE, None, None, "LNS instead of the monolithic solve")
    elif det and share + b_share + bnb_frac >= 1.0:  # its limit (work or seconds) would be 0 or less
        raw = make_outcome(backend, lm, Termination.FEASIBLE, None, None, "the bound stage had the whole budget")
    else:
        sp = replace(params, hint=bm.full_vector(bm.canonical(ws), lm))  # a hint symmetry breaking allows
        if det:
            spent = share + b_share + bnb_frac
            sp = replace(sp, work_limit=work * (1 - spent)) if spent > 0 else sp
            if backend == "cpsat" and sp.work_limit is not None:  # its wall cap: what is left of the net
                sp = replace(sp, time_limit_s=max(cap - time.perf_counter(), MIN_SOLVE_S))
            if backend != "cpsat" and b_share + bnb_frac > 0:  # wall only: the earlier stage had its share
                sp = replace(sp, time_limit_s=params.time_limit_s * (1 - b_share - bnb_frac))
        else:  # wall seconds: the solver gets what remains of the layer's limit (less LNS's share)
            sp = replace(sp, time_limit_s=remaining * (1 - share))
        t_solve = time.perf_counter() - t0
        try:
            raw = solver.solve(lm, sp)
            trace += [(t_solve + t, None if p is None else p / US, None if b is None else b / US, "model:" + backend)
                      for t, p, b in raw.trace]
        except Exception as exc:  # a solver crash must not lose the warm start
            raw = make_outcome(backend, lm, Termination.ERROR, None, None, f"{type(exc).__name__}: {exc}")
    if raw.x is not None:
        cand = bm.decode(raw.x)
        if bm.feasible(cand):
            cobj = score(cand)
            if cobj < obj * (1 - 1e-12):
                assign, obj, source = cand, cobj, backend
    lres = None
    if share > 0 and lm is not None and raw.status not in (Termination.OPTIMAL, Termination.ERROR,
                                                           Termination.INFEASIBLE):
        # wall: what remains; deterministic: the work budget decides, wall time is a safety cap as for CP-SAT
        target = None if bound is None else bound / (1 - params.gap)  # the gap target met: stop
        t_lns = time.perf_counter() - t0
        lres = lns(bm, assign, score, params, cap, settings=ls, work_budget=work * share if det else None,
                   backend=backend, lm=lm, stop_below=target)
        trace += [(t_lns + t, v, None, "lns") for t, (_, v) in zip(lres.times, lres.history, strict=True)]
        if lres.score_s < obj:
            assign, obj, source = lres.assign, lres.score_s, f"{source}+lns"
    if ((moved := pol.changed(assign)) or packed and pol.unfinished(assign)) and not proven(obj):
        # the model solve or LNS moved the plan: polish it again with what remains. Or, on a layer
        # with packings, their time cut the polish's window before a local optimum (Qwen3-30B 4x8
        # 10/25: 0.39 % worse than without packings): resume it with the first window's share of
        # what remains. Not without packings: on DeepSeek-V2-Lite 4x8 resuming gained 0.05 % of
        # TBT and the whole solve took 8 s more of its 2-minute target.
        end = cap if moved or det else window()
        if (better := pol.run(assign, obj, end, polish_evals)) is not None:
            assign, obj, source = better[0], better[1], f"{source}+polish"
            trace.append((time.perf_counter() - t0, obj, None, "polish"))
    model_bound = raw.bound / US if raw.bound is not None else None
    gap = gap_of(obj)
    # a backend that calls the model infeasible although its hint is a plan of it: its integer scaling
    # of tight capacity rows (CP-SAT rounds them to stay safe) cut that plan off. The plan and the
    # bound do not come from that solve, so the layer's status is theirs, and the message says so
    misread = raw.status == Termination.INFEASIBLE and bm.feasible(bm.canonical(ws))  # the hint it was given
    if misread:
        raw = replace(raw, message=f"{raw.message} (the model's solve called it infeasible, but the warm start "
                      f"{ws_name!r} is a feasible plan of it; the plan and bound stand)")
    if raw.status == Termination.ERROR or raw.status == Termination.INFEASIBLE and not misread:
        status = Termination.ERROR.value if raw.status == Termination.ERROR else "error:solver-says-infeasible"
    elif gap is not None and gap <= params.gap + GAP_TOL:
        status = Termination.OPTIMAL.value
    else:
        status = Termination.FEASIBLE.value
    if det:
        time_mode = ("deterministic" if backend == "cpsat" else "wall (cbc has no deterministic limit: it counts its "
                     "CPU seconds)" if backend == "cbc" else f"wall ({backend} has no deterministic limit)")
    else:
        time_mode = "wall"
    # a stage ran into the cap (what follows the last stage takes milliseconds)
    wall_capped = det and (raw.wall_capped or (backend == "cpsat" and time.perf_counter() >= cap))
    message = raw.message + bnb_note + schedule_note
    if lres is not None:
        why = {"target": "the gap target was met", "work": "its work budget was spent",
               "deadline": "the time limit was reached", "max_steps": "its step limit was reached",
               "patience": f"{_count(lres.steps_since_best, 'step')} in a row did not improve the plan"}[lres.stop]
        message = f"{message}; LNS: {_count(lres.steps, 'step')}, {lres.accepted} accepted, stopped because {why}"
    if wall_capped and backend == "cbc":
        message += ("; CBC ran past twice its limit in wall time before its CPU seconds were spent and was "
                    "stopped, so this plan depends on the machine's load")
    elif wall_capped:
        message += (f"; the wall-clock safety net ({net_s:g} s after the search began) stopped it before its "
                    "work budget, so this plan depends on the machine's load")
    t_end = time.perf_counter() - t0
    trace.append((t_end, obj, bound, "final"))
    return LayerSolveResult(
        layer=layer, status=status, objective_s=obj, bound_s=bound, gap=gap, time_s=t_end,
        backend=backend, num_vars=0 if lm is None else lm.num_vars,
        num_binaries=0 if lm is None else lm.num_binaries, num_rows=0 if lm is None else lm.num_rows,
        warm_start_objective_s=start_scores[best_start], warm_start_source=best_start, source=source,
        bound_certifies=score.certifies, message=message, placement=bm.placement(assign), assign=assign,
        family=family_text(options), model_objective_s=bm.objective(assign), model_bound_s=model_bound,
        time_mode=time_mode, trace=tuple(trace), hdmoe=hd,
        improvement=1.0 - obj / start_scores[best_start] if start_scores[best_start] > 0 else None,
        lns_steps=lres.steps if lres else 0, lns_accepted=lres.accepted if lres else 0,
        lns_gain=lres.gain if lres else 0.0, wall_capped=wall_capped,
        cut_limit_s=params.time_limit_s if schedule_note else None,
    )


class _Polisher:
    """:func:`.polish.polish` on a layer (when ``on`` and the scorer has a workload): ``run`` returns
    the polished plan and its score under ``score`` (the evaluator) if that is strictly better."""

    def __init__(self, bm: BlockModel, score: LayerScorer, seed: int, on: bool) -> None:
        self.bm, self.score, self.seed, self.on = bm, score, seed, on
        self.inc: IncrementalScore | None = None
        self.last: np.ndarray | None = None
        self.cut: np.ndarray | None = None  # a polish's result when its window or budget cut it short

    def changed(self, assign: np.ndarray) -> bool:
        return self.on and self.last is not None and not np.array_equal(assign, self.last)

    def unfinished(self, assign: np.ndarray) -> bool:
        """``assign`` is where a polish stopped on its window or budget, not at a local optimum."""
        return self.on and self.cut is not None and np.array_equal(assign, self.cut)

    def incremental(self, assign: np.ndarray) -> IncrementalScore:
        """The layer's :class:`IncrementalScore` (built once; the scorer must have a workload), set
        to ``assign``."""
        if self.inc is None:
            lr = self.score.workload.layers[0]
            self.inc = IncrementalScore(self.bm, lr.experts, lr.weight, assign)
        else:
            self.inc.reset(assign)
        return self.inc

    def run(self, assign: np.ndarray, obj: float, end: float,
            max_evals: int | None = None) -> tuple[np.ndarray, float] | None:
        if not self.on or time.perf_counter() >= end:
            return None
        r = polish(self.incremental(assign), self.bm.family, seed=self.seed, deadline=end, max_evals=max_evals,
                   min_pass_gain=PASS_GAIN)
        self.cut = r.assign.copy() if r.stop in ("deadline", "evaluations") else None
        # the reported number is the evaluator's own; a plan it does not confirm is not kept
        cobj = self.score(r.assign) if r.score_s < obj * (1 - 1e-12) else obj
        if cobj < obj * (1 - 1e-12):
            self.last = r.assign
            return r.assign, cobj
        self.last = np.asarray(assign).copy()  # kept as it was: not a plan "moved" since the polish
        return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


FAMILY_PACKINGS = " or its best balanced packings with neighbour splits"
FAMILY_PATTERNS = ("one copy per expert (no replication: EPLB's replicated placements are outside), within the "
                   "layer's capacity share, on either an aligned power-of-two block of the mesh with the expert "
                   "spread evenly over it, or one of the node sets with shares that the layer's non-replicated "
                   "baselines (tp, ep, ep-lpt, cb, hdmoe)" + FAMILY_PACKINGS + " give that expert")
FAMILY_NODES = (" (where the node-order search lowers their time without lowering the family floor, the best two "
                "of those layouts with their nodes' contents reordered on the mesh: beside a baseline, in place of "
                "a packing)")
FAMILY_FLIPS = ", and their mirror images under the mesh's row and column flips"
FAMILY = FAMILY_PATTERNS + FAMILY_NODES + FAMILY_FLIPS  # the default family (patterns, reordered layouts, flips)
FAMILY_BLOCKS = ("aligned power-of-two blocks of the mesh, one copy per expert spread evenly over its block, "
                 "within the layer's capacity share")


class LayerScorer:
    """The evaluator's layer time (default options but the block model's delivery rule; mesh mode,
    spread homes, coalesce="node") of a block assignment on the expected workload of the layer's
    co-activation sets. Without co-activation sets (and top-k > 1) the token compositions are
    unknown: the block model's objective, an upper bound on the evaluator for every composition with
    these frequencies, stands in."""

    def __init__(self, bm: BlockModel) -> None:
        self.bm = bm
        self.workload = layer_workload(bm.model, bm.coactivation, bm.f, bm.B)
        if self.workload is not None:
            self.model1 = dataclasses.replace(bm.model, moe_layers=1)
            self.opts = EvalOptions(delivery=bm.opts.delivery)
            self.certifies = ("lower bound on the evaluator's layer time (mesh mode, spread homes, coalesce=node, "
                              f"{bm.opts.delivery} delivery, expected workload of the co-activation sets) over the "
                              "family")
        else:
            self.certifies = ("lower bound on the evaluator's layer time over the family for any token composition "
                              "with these expert frequencies (no co-activation sets given: the objective is the "
                              "block model's, an upper bound on the evaluator)")

    def __call__(self, assign: np.ndarray) -> float:
        if self.workload is None:
            return self.bm.objective(assign)
        return layer_time_s(self.bm.placement(assign), self.model1, self.bm.hw, self.workload, self.opts)


def layer_workload(model: MoEModel, coactivation: tuple[np.ndarray, np.ndarray] | None, freqs: np.ndarray,
                   batch: float) -> Workload | None:
    """The one-layer expected workload :class:`LayerScorer` scores on: the co-activation sets with
    weights ``f_g * batch`` (top-1: one set per expert); None when top-k > 1 and no sets are given."""
    k, E = model.top_k, model.num_experts
    if coactivation is not None:
        ids, fg = np.asarray(coactivation[0]), np.asarray(coactivation[1], dtype=float)
    elif k == 1:
        ids, fg = np.arange(E)[:, None], np.asarray(freqs, dtype=float)
    else:
        return None
    return Workload((LayerRouting(ids, fg * batch),), E, k, float(batch), "expected")


def layer_time_s(lp: LayerPlacement, model1: MoEModel, hw: Hardware, workload: Workload, opts: EvalOptions) -> float:
    """The evaluator's time (s) of one layer's placement on a one-layer workload (``model1``: the
    model with one MoE layer)."""
    return float(evaluate(Placement((lp,)), model1, hw, workload, opts).layer_s[0])


class LayerTask(NamedTuple):
    """One layer's picklable solve task (:func:`layer_tasks`): ``freqs_all [layers, E]``, the layer
    ``li``, its co-activation sets and baseline layers, and the solve settings."""

    model: MoEModel
    hw: Hardware
    freqs_all: np.ndarray
    li: int
    batch: float
    backend: str
    params: SolveParams
    options: MilpOptions | None
    coactivation: tuple[np.ndarray, np.ndarray] | None
    baselines: dict[str, LayerPlacement]
    hdmoe_work_limit: float | None
    lns_settings: LnsSettings | None
    schedule: tuple[float, int] | None = None  # wall mode: the whole model's end (time.time()) and the slots left


def solve_layer_task(t: LayerTask) -> LayerSolveResult:
    """One task of :func:`layer_tasks` (top-level, so that a process pool or Ray can run it)."""
    return solve_layer(t.model, t.hw, t.freqs_all[t.li], t.batch, backend=t.backend, params=t.params,
                       options=t.options, layer=t.li, coactivation=t.coactivation, baselines=t.baselines,
                       hdmoe_work_limit=t.hdmoe_work_limit, lns_settings=t.lns_settings, schedule=t.schedule)


def schedule_tasks(tasks: list[LayerTask], jobs: int, time_limit_s: float, started: float) -> list[LayerTask]:
    """``tasks`` with the whole model's end and each task's place in the pool, so that the run,
    counted from ``started`` (``time.time()``), takes at most ``WHOLE_MODEL_SLACK`` x tasks x limit
    / jobs, with ``AFTER_POOL_S`` (at most a tenth of that) left for what follows the layers (the
    other baselines, scoring every candidate, writing the plan). A pool of ``jobs`` workers takes
    the tasks in order, so task i runs in about slot ``i // jobs``; when it starts, it takes the time
    left over the slots left (its own included), if that is less than its limit, and at least
    ``SCHEDULE_FLOOR`` of it. Layers that end early leave the later ones their whole limit. At 0.5 s
    per layer the fixed work of a run (imports, loading, the final scoring: about 2 s) put 26 layers
    9 % past the rule."""
    if not tasks:
        return tasks
    width = max(1, min(jobs, len(tasks)))
    slots = -(-len(tasks) // width)
    whole = len(tasks) * time_limit_s / width  # the rule's layers x limit / jobs: less than slots x limit
    end = started + WHOLE_MODEL_SLACK * whole - min(AFTER_POOL_S, 0.1 * whole)  # where jobs do not divide
    return [t._replace(schedule=(end, slots - i // width)) for i, t in enumerate(tasks)]


@dataclass(frozen=True)
class ModelSolveResult:
    layers: tuple[LayerSolveResult, ...]
    placement: Placement
    wall_s: float


def solve_model(
    model: MoEModel,
    hw: Hardware,
    freqs: np.ndarray,
    batch: float = 128,
    *,
    backend: str = "cpsat",
    params: SolveParams | None = None,
    options: MilpOptions | None = None,
    jobs: int = 1,
    executor: str = "local",
    progress: bool | None = False,
    coactivation: list[tuple[np.ndarray, np.ndarray]] | None = None,
    layers: list[int] | tuple[int, ...] | None = None,
    hdmoe_work_limit: float | None = WORK_LIMIT,
    lns_settings: LnsSettings | None = None,
) -> ModelSolveResult:
    """Solve every layer (independent problems): serially, in a local process pool (``jobs > 1``)
    or on Ray (``executor="ray"``, needs ``pip install .[ray]``). ``coactivation[l]``: the layer's
    co-activation sets (``Trace.coactivation(l)``), for co-location modelling. ``layers``: solve only
    these (0-based); every other layer takes its best baseline and is reported ``not-solved``.
    ``hdmoe_work_limit``, ``lns_settings``: see :func:`solve_layer`."""
    check_choice("executor", executor, EXECUTORS)
    params = params or SolveParams()
    check_real("batch", batch, positive=True)
    tasks = layer_tasks(model, hw, freqs, batch, backend=backend, params=params, options=options,
                        coactivation=coactivation, hdmoe_work_limit=hdmoe_work_limit, lns_settings=lns_settings)
    chosen = select_layers(layers, len(tasks))
    t0 = time.perf_counter()
    bar = tqdm(total=len(chosen), desc=f"solve {model.name}", disable=None if progress is None else not progress,
               unit="layer", leave=False)
    try:
        done = run_tasks(solve_layer_task, [tasks[li] for li in chosen], jobs=jobs, executor=executor, bar=bar,
                         num_cpus=params.threads)
    finally:
        bar.close()
    by_layer = dict(zip(chosen, done, strict=True))
    results = [by_layer[li] if li in by_layer else not_solved_task(tasks[li]) for li in range(len(tasks))]
    return model_result(results, backend, batch, params, time.perf_counter() - t0)


def select_layers(layers: list[int] | tuple[int, ...] | None, num_layers: int) -> list[int]:
    """The layers to solve, sorted (all when ``layers`` is None); an InputError unless every entry is
    a whole number in ``[0, num_layers)``, none is repeated and the list is non-empty."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = [layers]  # one layer, as the CLI's --layers 5
    if isinstance(layers, (str, bytes, dict)):  # a string would be read digit by digit
        raise InputError("layers", f"must be a list of layer numbers, got {layers!r}",
                         "e.g. layers=[0, 5, 12] (0-based)")
    try:
        vals = list(layers)
    except TypeError:
        raise InputError("layers", f"must be a list of layer numbers, got {layers!r}",
                         "e.g. layers=[0, 5, 12] (0-based)") from None
    if not vals:
        raise InputError("layers", "is empty", f"give layer numbers in 0..{num_layers - 1}")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < num_layers:
            raise InputError("layers", f"{v!r} is not a layer number in 0..{num_layers - 1}",
                             f"the model has {num_layers} MoE layers, numbered from 0")
    ints = sorted(int(v) for v in vals)
    twice = next((a for a, b in zip(ints, ints[1:], strict=False) if a == b), None)
    if twice is not None:
        raise InputError("layers", f"lists layer {twice} more than once", "name each layer once")
    return ints


def not_solved_task(t: LayerTask) -> LayerSolveResult:
    """A layer left out of the solve: its best baseline under the evaluator (:class:`LayerScorer`,
    on the baselines the block model expresses, the hdmoe layer included unless the task's hdmoe
    work limit is None; it is returned in ``hdmoe`` as for a solved layer), reported ``not-solved``."""
    model, li, backend, params, options = t.model, t.li, t.backend, t.params, t.options
    t0 = time.perf_counter()
    baselines, hd = layer_baselines(model, t.hw, t.freqs_all[li], t.batch, backend=backend, params=params, layer=li,
                                    freqs_all=t.freqs_all, coactivation=t.coactivation, baselines=t.baselines,
                                    hdmoe_work_limit=t.hdmoe_work_limit)

    def result(name: str, placement: LayerPlacement, assign: np.ndarray, obj: float) -> LayerSolveResult:
        return LayerSolveResult(
            layer=li, status="not-solved", objective_s=obj, bound_s=None, gap=None, time_s=time.perf_counter() - t0,
            backend=backend, num_vars=0, num_binaries=0, num_rows=0, warm_start_objective_s=obj,
            warm_start_source=name, source="baseline:" + name, bound_certifies="", message="layer not selected",
            placement=placement, assign=assign, family=family_text(options),
            time_mode="wall" if not params.deterministic else "deterministic", hdmoe=hd)

    # every non-replicated baseline is a plan of the family as it is (its shares are patterns): score
    # those within the layer's capacity share directly, without building the family (0.2 s on 8x8)
    opts = options or MilpOptions()
    wl = layer_workload(model, t.coactivation, t.freqs_all[li], t.batch)
    if wl is not None and opts.patterns:  # without patterns the family is the aligned blocks only
        cap = layer_capacity_bytes(model, t.hw, opts.capacity_share)
        per_expert = model.expert_weight_bytes()
        model1, eo = dataclasses.replace(model, moe_layers=1), EvalOptions(delivery=opts.delivery)
        scores = {n: layer_time_s(lp, model1, t.hw, wl, eo) for n, lp in baselines.items()
                  if not lp.is_replicated
                  and (cap is None or float(lp.weight_copies_per_node().max() * per_expert) <= cap * (1 + 1e-9))}
        if scores:
            name = min(scores, key=scores.__getitem__)
            return result(name, baselines[name], np.full(model.num_experts, -1), scores[name])
    bm = family_model(model, t.hw, t.freqs_all[li], t.batch, options, t.coactivation, baselines)
    # only layouts within the layer's capacity share: with every layer inside its share the whole
    # plan fits the DRAM, whichever layers are solved
    starts = {k: a for k, a in _baseline_assigns(bm, baselines).items() if bm.in_family(a)}
    if not starts and bm.cap_layer is not None:  # no baseline fits: the greedy heuristics respect it
        starts = warm_starts(bm, {})
    score = LayerScorer(bm)
    if starts:
        scores = {k: score(a) for k, a in starts.items()}
        name = min(scores, key=scores.__getitem__)
        assign, obj = starts[name], scores[name]
        placement = bm.placement(assign)
    else:  # nothing expressible: the first baseline as it is, unscored
        name, placement = next(iter(baselines.items()))
        assign, obj = np.full(model.num_experts, -1), float("nan")
    return result(name, placement, assign, obj)


def layer_tasks(model: MoEModel, hw: Hardware, freqs: np.ndarray, batch: float, *, backend: str,
                params: SolveParams, options: MilpOptions | None,
                coactivation: list[tuple[np.ndarray, np.ndarray]] | None,
                hdmoe_work_limit: float | None = WORK_LIMIT,
                lns_settings: LnsSettings | None = None) -> list[LayerTask]:
    """One picklable task per layer for :func:`solve_layer_task` (baselines for the warm starts built
    once here; the hdmoe layer, with ``hdmoe_work_limit``, inside each task; ``lns_settings`` for
    every layer's LNS, None: the defaults)."""
    f = check_freqs(freqs, model)
    get_backend(backend)
    base = baseline_layers(model, hw, f, params.seed, batch)
    co = [None] * f.shape[0] if coactivation is None else coactivation
    return [LayerTask(model, hw, f, li, batch, backend, params, options, co[li], base[li], hdmoe_work_limit,
                      lns_settings) for li in range(f.shape[0])]


def model_result(results: list[LayerSolveResult], backend: str, batch: float, params: SolveParams,
                 wall_s: float) -> ModelSolveResult:
    """The whole-model result of per-layer results (in layer order)."""
    placement = Placement(tuple(r.placement for r in results), f"milp-{backend}",
                          {"backend": backend, "batch": batch, "time_limit_s": params.time_limit_s})
    return ModelSolveResult(tuple(results), placement, wall_s)


def best_per_layer(candidates: dict[str, Placement], layer_times: dict[str, np.ndarray],
                   strategy: str = "milp") -> tuple[Placement, list[str]]:
    """Per layer, the candidate placement with the smallest evaluator layer time. The evaluator's
    layers are independent (the non-MoE terms do not depend on the placement), so the combined plan's
    TBT is no worse than any candidate's. Returns the plan and the source of each layer."""
    names = list(candidates)
    times = np.stack([np.asarray(layer_times[n]) for n in names])  # [candidates, L]
    pick = np.argmin(times, axis=0)  # first (preferred) candidate wins ties
    layers = tuple(candidates[names[p]].layers[li] for li, p in enumerate(pick))
    sources = [names[p] for p in pick]
    return Placement(layers, strategy, {"layer_sources": sources}), sources
