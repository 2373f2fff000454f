"""Rank of the AG basis (issue 10): the span of the class means of the centred gradients
has dimension C − 1 (Σ_c n_c μ_c = 0), C − 2 when two classes share their mean; the float32
noise in the class sums must not survive as an extra basis column."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradspace.subspace import ag, power, stats
from gradspace.subspace.layout import ParamLayout
from gradspace.subspace.operators import JvpVjpOperator, PerSampleOperator
from test_subspace import (
    batches,
    full_basis,
    layout_of,
    make_data,
    make_model,
    reference_grads,
    sine,
    stats_of,
)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def synthetic(C=6, P=6000, n=1200, offset=30.0, duplicate=False, seed=0):
    """float32 gradients g (n×P) with a large common mean (raw ≫ centred, as energy
    gradients) and class structure; class 2 repeats class 1's rows when ``duplicate``."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % C
    scale = np.exp(rng.uniform(-3, 3, P))
    cls = 0.3 * rng.standard_normal((C, P))
    g = ((offset * rng.standard_normal(P) + cls[y] + rng.standard_normal((n, P))) * scale).astype(np.float32)
    if duplicate:
        g[y == 2] = g[y == 1]
    layout = ParamLayout(["a", "b"], [(P // 3,), (P - P // 3,)], [("a", [0]), ("b", [1])])
    return g, y, layout


def write_partials(tmp_path, g, y, layout, st, C, bs=100, shards=2, name="p"):
    """Class sums with the ``jvp_vjp`` arithmetic: s ⊙ (Σ u_i g_i − m Σ u_i) in float32 per
    batch, float64 across batches."""
    m = torch.tensor(st.mean if st is not None else np.zeros(g.shape[1]), dtype=torch.float32)
    s = torch.tensor(st.scale if st is not None else np.ones(g.shape[1]), dtype=torch.float32)
    paths = []
    for k, rows in enumerate(np.array_split(np.arange(len(y)), shards)):
        S = np.zeros((g.shape[1], C))
        for a in range(0, len(rows), bs):
            r = rows[a:a + bs]
            U = torch.nn.functional.one_hot(torch.from_numpy(y[r]), C).float()
            S += (s[:, None] * (torch.from_numpy(g[r]).T @ U - m[:, None] * U.sum(0)[None])).double().numpy()
        sums = {b: np.ascontiguousarray(layout.take(S.T, b).T) for b in layout.block_names}
        paths.append(tmp_path / f"{name}{k}.zarr")
        ag.write_ag_partial(paths[-1], layout, sums, np.bincount(y[rows], minlength=C), {"shard": k})
    return paths


def exact_means(g, y, st, C):
    g = g.astype(np.float64)
    m = st.mean if st is not None else 0.0
    s = st.scale if st is not None else 1.0
    return np.stack([((g[y == c] - m) * s).mean(0) for c in range(C)], 1)


def check_basis(path, layout, k, means):
    V = full_basis(power.read_basis(path)[0], layout)
    assert V.shape[1] == k
    np.testing.assert_allclose(V.T @ V, np.eye(k), atol=1e-5)
    # V spans the exact class means
    assert np.linalg.norm(means - V @ (V.T @ means)) < 1e-4 * np.linalg.norm(means)
    return V


@pytest.mark.parametrize("duplicate", [False, True])
def test_ag_rank_centred_is_c_minus_1_despite_float32_noise(tmp_path, duplicate):
    C = 6
    g, y, layout = synthetic(C, duplicate=duplicate)
    g64 = g.astype(np.float64)
    st = stats.reduce_moments([{"count": np.int64(len(y)), "sum": g64.sum(0), "sumsq": (g64 ** 2).sum(0)}],
                              layout)
    paths = write_partials(tmp_path, g, y, layout, st, C)
    means = exact_means(g, y, st, C)
    expected = C - 2 if duplicate else C - 1
    assert np.linalg.matrix_rank(means, tol=1e-8 * np.linalg.norm(means, 2)) == expected
    # the float32 noise: the dependent column's R diagonal is above the former cut (1e-6 of the
    # largest), so that cut kept a pure-noise column here
    stored = {b: ag.class_block(power.open_partials(paths, layout, kind=ag.AG_PARTIAL_KIND)[0], b, C)
              / np.bincount(y, minlength=C) for b in layout.block_names}
    r = np.abs(np.diag(power.tsqr(layout.block_names, stored.__getitem__)[1]))
    assert np.sum(r > 1e-6 * r.max()) > expected

    info = ag.reduce_ag(paths, layout, tmp_path / "ag.zarr", True, st)
    assert info["k"] == info["rank"] == expected and info["classes"] == C and info["centred"]
    assert 0 < info["centring_residual"] < info["rank_tol"]
    check_basis(tmp_path / "ag.zarr", layout, expected, means)

    # raw gradients (no statistics, no centring): C independent means, C − 1 with a duplicate
    raw = write_partials(tmp_path, g, y, layout, None, C, name="raw")
    info = ag.reduce_ag(raw, layout, tmp_path / "raw.zarr", True)
    assert info["k"] == (C - 1 if duplicate else C) and not info["centred"]
    check_basis(tmp_path / "raw.zarr", layout, info["k"], exact_means(g, y, None, C))

    # orthonormalize: false keeps the C raw class means
    info = ag.reduce_ag(paths, layout, tmp_path / "plain.zarr", False, st)
    assert info["k"] == C and info["rank"] is None
    grp = power.read_basis(tmp_path / "plain.zarr")[0]
    V = full_basis(grp, layout)
    np.testing.assert_array_equal(V, full_basis(grp, layout, "means"))
    np.testing.assert_allclose(V, means, rtol=1e-3, atol=1e-4 * np.abs(means).max())


@pytest.mark.parametrize("method", ["jvp_vjp", "persample"])
def test_ag_rank_on_a_model_with_two_classes_sharing_their_inputs(tmp_path, method):
    """Class 2's inputs are class 1's: μ_1 = μ_2, and with the centring μ_0 = −(μ_1 + μ_2),
    so the three class means span one direction (C − 2); raw, two (C − 1)."""
    model = make_model()
    x, y = make_data(90)
    x[y == 2] = x[y == 1]
    layout = layout_of(model)
    st, g = stats_of(model, x, layout)
    Op = JvpVjpOperator if method == "jvp_vjp" else PerSampleOperator
    for name, s, expected in (("centred", st, 1), ("raw", None, 2)):
        op = Op(model, layout, s)
        paths = []
        for k, (lo, hi) in enumerate(((0, 50), (50, 90))):
            sums, counts = ag.class_sums(op, batches(x[lo:hi], y[lo:hi], 16), 3)
            paths.append(tmp_path / f"{name}{k}.zarr")
            ag.write_ag_partial(paths[-1], layout, sums, counts, {"shard": k})
        info = ag.reduce_ag(paths, layout, tmp_path / f"{name}.zarr", True, s)
        assert info["k"] == info["rank"] == expected
        G = (g - s.mean) * s.scale if s is not None else reference_grads(model, x)
        means = np.stack([G[y.numpy() == c].mean(0) for c in range(3)], 1)
        V = check_basis(tmp_path / f"{name}.zarr", layout, expected, means)
        if expected == 1:
            assert sine(V, means[:, 1:2]) < 1e-4
