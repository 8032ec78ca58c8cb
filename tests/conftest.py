from __future__ import annotations

from pathlib import Path

import pytest

from hdmoe_milp import get_model, load_trace

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "instances" / "traces"


@pytest.fixture(scope="session")
def ds_trace():
    m = get_model("deepseek-v2-lite")
    return load_trace(TRACES / "deepseek_v2_lite_law_4k.npz", m.num_experts, m.top_k)


@pytest.fixture(scope="session")
def mixtral_trace():
    m = get_model("mixtral-8x7b")
    return load_trace(TRACES / "mixtral_reasoning_4k.json.gz", m.num_experts, m.top_k)
