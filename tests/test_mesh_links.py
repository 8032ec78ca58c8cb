"""Per-link loads: hand-computed cases and a brute-force cross-check over explicit XY routes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hdmoe_milp.costs import link_loads, merge_flows, pack_dest, spread_link_loads
from hdmoe_milp.hardware import Mesh


def _dest(mesh: Mesh, nodes) -> np.ndarray:
    d = np.zeros((1, mesh.num_nodes), dtype=bool)
    d[0, list(nodes)] = True
    return d


def _expect(mesh: Mesh, pairs: dict[tuple[int, int], float]) -> np.ndarray:
    out = np.zeros(mesh.num_links)
    for (a, b), v in pairs.items():
        out[mesh.link_id(a, b)] = v
    return out


def test_mesh_parse_and_links():
    m = Mesh.parse("2x3")
    assert (m.rows, m.cols, m.num_nodes) == (2, 3, 6)
    assert m.num_links == 2 * 2 * 2 + 2 * 1 * 3
    assert m.xy_route(4, 0) == [m.link_id(4, 3), m.link_id(3, 0)]  # X first, then Y
    assert m.xy_route(0, 5) == [m.link_id(0, 1), m.link_id(1, 2), m.link_id(2, 5)]


def test_1x2_hand():
    m = Mesh(1, 2)
    d, c, hops = link_loads(m, _dest(m, [1]), np.array([10.0]), np.array([0]), tree=True)
    np.testing.assert_allclose(d, _expect(m, {(0, 1): 10}))
    np.testing.assert_allclose(c, _expect(m, {(1, 0): 10}))
    assert hops == 1


@pytest.mark.parametrize("tree", [True, False])
def test_2x2_hand(tree):
    m = Mesh(2, 2)
    # home 0, dest 3: dispatch 0->1->3, combine 3->2->0 (X first both ways)
    d, c, _ = link_loads(m, _dest(m, [3]), np.array([1.0]), np.array([0]), tree)
    np.testing.assert_allclose(d, _expect(m, {(0, 1): 1, (1, 3): 1}))
    np.testing.assert_allclose(c, _expect(m, {(3, 2): 1, (2, 0): 1}))
    # home 0, dests 1,2,3: link 0->1 serves dests 1 and 3; link 2->0 carries results of 2 and 3
    d, c, hops = link_loads(m, _dest(m, [1, 2, 3]), np.array([1.0]), np.array([0]), tree)
    k = 1 if tree else 2
    np.testing.assert_allclose(d, _expect(m, {(0, 1): k, (1, 3): 1, (0, 2): 1}))
    np.testing.assert_allclose(c, _expect(m, {(1, 0): 1, (3, 2): 1, (2, 0): k}))
    assert hops == 2


@pytest.mark.parametrize("tree", [True, False])
def test_2x3_hand(tree):
    m = Mesh(2, 3)
    # home 4 (row 1, col 1); dests 0 (0,0) and 2 (0,2)
    d, c, _ = link_loads(m, _dest(m, [0, 2]), np.array([2.0]), np.array([4]), tree)
    np.testing.assert_allclose(d, _expect(m, {(4, 3): 2, (3, 0): 2, (4, 5): 2, (5, 2): 2}))
    k = 2 if tree else 4
    np.testing.assert_allclose(c, _expect(m, {(0, 1): 2, (2, 1): 2, (1, 4): k}))


def _brute(mesh: Mesh, dest, weight, home, tree):
    """Explicit XY routes, link by link."""
    d = np.zeros(mesh.num_links)
    c = np.zeros(mesh.num_links)
    for f in range(dest.shape[0]):
        out_links, back_links = [], []
        for n in np.flatnonzero(dest[f]):
            out_links += mesh.xy_route(home[f], n)
            back_links += mesh.xy_route(n, home[f])
        if tree:
            out_links, back_links = set(out_links), set(back_links)
        for li in out_links:
            d[li] += weight[f]
        for li in back_links:
            c[li] += weight[f]
    return d, c


flows = st.integers(1, 4).flatmap(
    lambda R: st.integers(1, 4).flatmap(
        lambda C: st.tuples(
            st.just(Mesh(R, C)),
            st.lists(
                st.tuples(
                    st.lists(st.booleans(), min_size=R * C, max_size=R * C),
                    st.integers(0, R * C - 1),
                    st.floats(0.1, 10.0),
                ),
                min_size=1, max_size=6,
            ),
        )
    )
)


@settings(max_examples=60, deadline=None)
@given(flows, st.booleans())
def test_vectorised_matches_explicit_routes(case, tree):
    mesh, fl = case
    dest = np.array([f[0] for f in fl], dtype=bool)
    home = np.array([f[1] for f in fl])
    w = np.array([f[2] for f in fl])
    d, c, hops = link_loads(mesh, dest, w, home, tree)
    bd, bc = _brute(mesh, dest, w, home, tree)
    np.testing.assert_allclose(d, bd, atol=1e-9)
    np.testing.assert_allclose(c, bc, atol=1e-9)
    # spread homes == the average over every possible home
    ds, cs, _ = link_loads(mesh, dest, w, None, tree)
    acc_d = np.zeros(mesh.num_links)
    acc_c = np.zeros(mesh.num_links)
    for h in range(mesh.num_nodes):
        x, y, _ = link_loads(mesh, dest, w / mesh.num_nodes, np.full(len(w), h), tree)
        acc_d += x
        acc_c += y
    np.testing.assert_allclose(ds, acc_d, atol=1e-9)
    np.testing.assert_allclose(cs, acc_c, atol=1e-9)
    # the fast whole-model kernel (one layer here) gives the same spread-home loads
    rm, cm = pack_dest(mesh, dest)
    fd, fc, fh = spread_link_loads(mesh, rm, cm, w, np.array([0, len(w)]), tree)
    np.testing.assert_allclose(fd[0], acc_d, atol=1e-9)
    np.testing.assert_allclose(fc[0], acc_c, atol=1e-9)
    assert fh[0] == max(mesh.distance[h, dest[f]].max(initial=0) for h in range(mesh.num_nodes) for f in range(len(w)))
    if not tree:
        # total link bytes = sum of flow bytes x hops
        hop_bytes = sum(w[f] * mesh.distance[home[f], dest[f]].sum() for f in range(len(w)))
        assert d.sum() == pytest.approx(hop_bytes)
        assert c.sum() == pytest.approx(hop_bytes)
    expected_hops = max((mesh.distance[home[f], dest[f]].max(initial=0) for f in range(len(w))), default=0)
    assert hops == expected_hops


@pytest.mark.parametrize("shape", [(9, 6), (3, 13), (16, 16)])
@pytest.mark.parametrize("tree", [True, False])
def test_spread_homes_on_large_meshes_are_the_mean_over_explicit_homes(shape, tree):
    """Spread homes (computed from each flow's extreme rows and columns) equal the mean of every
    explicit home's loads on meshes larger than the hypothesis cases, with empty and one-node flows."""
    mesh = Mesh(*shape)
    rng = np.random.default_rng(sum(shape))
    dest = rng.random((30, mesh.num_nodes)) < rng.choice([0.01, 0.1, 0.5], size=(30, 1))
    dest[0] = False
    dest[1] = False
    dest[1, mesh.num_nodes - 1] = True
    w = rng.random(30)
    d, c, hops = link_loads(mesh, dest, w, None, tree)
    acc_d, acc_c = np.zeros(mesh.num_links), np.zeros(mesh.num_links)
    for h in range(mesh.num_nodes):
        x, y, _ = link_loads(mesh, dest, w / mesh.num_nodes, np.full(len(w), h), tree)
        acc_d += x
        acc_c += y
    np.testing.assert_allclose(d, acc_d, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(c, acc_c, rtol=1e-12, atol=1e-15)
    assert hops == mesh.distance.max(axis=0)[dest.any(axis=0)].max()


@pytest.mark.parametrize("nodes", [8, 64, 65, 130, 256])
def test_merge_flows_groups_equal_destination_sets(nodes):
    """merge_flows: one row per distinct destination set, its weight the sum of that set's flows, on
    both key paths (up to 64 nodes one word, beyond several)."""
    rng = np.random.default_rng(nodes)
    sets = rng.random((12, nodes)) < 0.1
    pick = rng.integers(0, len(sets), 200)
    w = rng.random(200)
    dest, weight = merge_flows(sets[pick], w)
    expect: dict[bytes, float] = {}
    for i, x in zip(pick, w, strict=True):
        key = sets[i].tobytes()
        expect[key] = expect.get(key, 0.0) + x
    assert len(dest) == len(expect)
    for row, x in zip(dest, weight, strict=True):
        assert x == pytest.approx(expect[row.tobytes()], rel=1e-12)
    empty_d, empty_w = merge_flows(np.zeros((0, nodes), dtype=bool), np.zeros(0))
    assert empty_d.shape == (0, nodes) and empty_w.shape == (0,)
