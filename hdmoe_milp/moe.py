"""MoE model specifications and presets (values from the public Hugging Face configs)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from .errors import MAX_EXPERTS, MAX_LAYERS, InputError, check_choice, check_real, expect_instance, shown

# Ranges of a model's numbers. Every cost multiplies a few of these sizes with each other and with the
# batch and context length, then divides by rates and by the bytes of one expert; these bounds keep all
# of it finite and positive (an int is exact; a float of a product of a few such sizes is far below 1e308).
MAX_MODEL_SIZE = 2**31 - 1  # experts, top_k, hidden and intermediate sizes, layer counts: far beyond any model
BYTES_PER_ELEMENT_RANGE = (1 / 16, 64.0)  # bytes per weight / activation: half a bit (compressed) to 512 bits


@dataclass(frozen=True)
class MoEModel:
    """Shape of a decoder-only MoE LLM.

    ``expert_intermediate`` is the routed experts' intermediate size (SwiGLU: gate, up and down
    matrices of ``hidden x expert_intermediate``). ``dense_intermediate`` is the FFN size of the
    ``dense_layers`` non-MoE layers. ``paper_intermediate`` is the intermediate size the HD-MoE
    evaluation scripts used for this model (None = ``expert_intermediate``); only ``paper`` mode reads it.
    Bytes per element: ``weight_bytes`` for weights, ``activation_bytes`` for activations.
    """

    name: str
    num_experts: int
    top_k: int
    hidden: int
    expert_intermediate: int
    moe_layers: int
    dense_layers: int = 0
    dense_intermediate: int = 0
    shared_experts: int = 0
    shared_intermediate: int = 0
    weight_bytes: float = 2.0
    activation_bytes: float = 2.0
    paper_intermediate: int | None = None

    def __post_init__(self) -> None:
        expect_instance("model.name", self.name, str, "give a string, e.g. 'my-moe'")
        if not self.name.strip():
            raise InputError("model.name", "is empty", "give a name, e.g. 'my-moe'")
        sizes = {"num_experts": 1, "top_k": 1, "hidden": 1, "expert_intermediate": 1, "moe_layers": 1,
                 "dense_layers": 0, "dense_intermediate": 0, "shared_experts": 0, "shared_intermediate": 0}
        if self.paper_intermediate is not None:
            sizes["paper_intermediate"] = 1
        for fld, lo in sizes.items():
            v = getattr(self, fld)
            kind = "a positive" if lo else "a non-negative"
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not lo <= v <= MAX_MODEL_SIZE:
                raise InputError(f"model.{fld}", f"must be {kind} whole number up to {MAX_MODEL_SIZE}, got {shown(v)}",
                                 f"give {kind} integer" + (" or None (= expert_intermediate)"
                                                           if fld == "paper_intermediate" else ""))
            object.__setattr__(self, fld, int(v))  # plain int (not np.int64): JSON-ready
        for fld, most, what in (("num_experts", MAX_EXPERTS, "experts per layer"),
                                ("moe_layers", MAX_LAYERS, "MoE layers")):
            if getattr(self, fld) > most:
                raise InputError(f"model.{fld}", f"must be at most {most} ({what}), got {shown(getattr(self, fld))}",
                                 f"give at most {most}")
        if self.top_k > self.num_experts:
            raise InputError("model.top_k", f"top_k={self.top_k} exceeds num_experts={self.num_experts}",
                             "give top_k <= num_experts")
        for count, size, what in (("shared_experts", "shared_intermediate", "shared experts"),
                                  ("dense_layers", "dense_intermediate", "dense layers")):
            if getattr(self, count) > 0 and getattr(self, size) == 0:  # they would cost nothing
                raise InputError(f"model.{size}", f"is 0 with {count}={getattr(self, count)}: the {what} would "
                                 "cost no time and hold no weights", f"give their intermediate size, or {count}=0")
        lo, hi = BYTES_PER_ELEMENT_RANGE
        for fld in ("weight_bytes", "activation_bytes"):
            v = check_real(f"model.{fld}", getattr(self, fld), minimum=lo, maximum=hi)  # bytes per element
            object.__setattr__(self, fld, v)  # plain float: JSON-ready

    def expert_weight_bytes(self) -> float:
        """Bytes of one routed expert's weights (3 SwiGLU matrices)."""
        return 3.0 * self.hidden * self.expert_intermediate * self.weight_bytes

    def expert_flops_per_token(self) -> float:
        """FLOPs of one routed expert for one token (3 matrices, 2 FLOPs per multiply-add)."""
        return 6.0 * self.hidden * self.expert_intermediate

    def non_expert_weight_bytes(self) -> float:
        """Bytes of the weights outside the routed experts: attention projections (4 h x h per layer),
        shared experts and dense FFNs (embeddings left out)."""
        h = self.hidden
        return (
            self.total_layers * 4 * h * h
            + self.moe_layers * 3 * h * self.shared_intermediate * self.shared_experts
            + self.dense_layers * 3 * h * self.dense_intermediate
        ) * self.weight_bytes

    @property
    def total_layers(self) -> int:
        return self.moe_layers + self.dense_layers


MODEL_PRESETS: dict[str, MoEModel] = {
    m.name: m
    for m in (
        MoEModel("mixtral-8x7b", 8, 2, 4096, 14336, 32),
        MoEModel(
            "deepseek-v2-lite", 64, 6, 2048, 1408, 26, dense_layers=1, dense_intermediate=10944,
            shared_experts=2, shared_intermediate=1408,
        ),
        MoEModel(
            "qwen2-57b-a14b", 64, 8, 3584, 2560, 28, shared_experts=1, shared_intermediate=20480,
            paper_intermediate=18944,
        ),
        MoEModel(
            "deepseek-v3", 256, 8, 7168, 2048, 58, dense_layers=3, dense_intermediate=18432,
            shared_experts=1, shared_intermediate=2048, weight_bytes=1.0,
        ),
        MoEModel("qwen3-30b-a3b", 128, 8, 2048, 768, 48),
        MoEModel("olmoe-1b-7b", 64, 8, 2048, 1024, 16),
    )
}


def get_model(name: str) -> MoEModel:
    """A preset by name (see ``MODEL_PRESETS``)."""
    check_choice("model", name, tuple(MODEL_PRESETS))
    return MODEL_PRESETS[name]
