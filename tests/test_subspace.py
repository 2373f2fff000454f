"""Gradient subspace (issue 4): statistics, PCA by block power iteration, AG, blocks,
projection and resumability, checked against explicitly formed gradient matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gradspace.errors import ConfigError, NumericalError, StoreError
from gradspace.runtime import Timer
from gradspace.subspace import ag, power, project, stats
from gradspace.subspace.diagnostics import reconstruction_errors
from gradspace.subspace.layout import ParamLayout, build_layout
from gradspace.subspace.operators import JvpVjpOperator, PerSampleOperator, energy


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


class TinyCNN(nn.Module):
    """conv-BN-ReLU-pool + linear head: 4·9 + 8 + 16·3 + 3 = 95 parameters."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 2), 1))


def make_model(seed=0):
    torch.manual_seed(seed)
    m = TinyCNN()
    with torch.no_grad():  # non-trivial BN running statistics (eval mode is used)
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
        m.bn.weight.uniform_(0.5, 1.5)
    return m.eval()


def make_data(n=120, seed=1, classes=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    proto = torch.randn(classes, 1, 6, 6, generator=g)
    x = proto[y] + 0.5 * torch.randn(n, 1, 6, 6, generator=g)
    return x, y


def batches(x, y, bs=32):
    return [(x[a:a + bs], y[a:a + bs], torch.arange(a, min(a + bs, len(x)))) for a in range(0, len(x), bs)]


def reference_grads(model, x, T=1.0):
    """∇θE per sample by torch.func (vmap of grad over functional_call), float64 numpy."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def e(p, xi):
        return energy(functional_call(model, (p, buffers), (xi[None],)), T)[0]

    g = vmap(grad(e), in_dims=(None, 0))(params, x)
    return torch.cat([g[k].reshape(x.shape[0], -1) for k in params], 1).double().numpy()


def layout_of(model, blocks="top"):
    return build_layout(model, "all", blocks)


def stats_of(model, x, layout, options=None, shards=2):
    g = reference_grads(model, x)
    parts = [{"count": np.int64(len(c)), "sum": c.sum(0), "sumsq": (c * c).sum(0)}
             for c in np.array_split(g, shards)]
    return stats.reduce_moments(parts, layout, options), g


def sine(A, B):
    """Largest principal-angle sine between span(A) and span(B), same dimension."""
    qa, _ = np.linalg.qr(A)
    qb, _ = np.linalg.qr(B)
    return float(np.linalg.norm(qa - qb @ (qb.T @ qa), 2))


def full_basis(group, layout, key="V"):
    """Reassemble V (P×K) in flat engine order from its block arrays."""
    P = layout.num_params
    first = np.asarray(group[f"{key}.{layout.block_names[0]}"][...])
    V = np.zeros((P, first.shape[1]))
    for b in layout.block_names:
        Vb = np.asarray(group[f"{key}.{b}"][...])
        r = 0
        for a, z in layout.block_ranges(b):
            V[a:z] = Vb[r:r + z - a]
            r += z - a
    return V


# -- statistics --------------------------------------------------------------------------

def test_stats_reduce_equals_direct_moments():
    model = make_model()
    x, _ = make_data()
    layout = layout_of(model)
    for opts in ({}, {"scale": "variance"}, {"mean": False}, {"scale": "none"}):
        st, g = stats_of(model, x, layout, opts, shards=3)
        M, sq = g.mean(0), (g * g).mean(0)
        m = M if st.options["mean"] else 0 * M
        d = {"second_moment": sq, "variance": g.var(0), "none": None}[st.options["scale"]]
        s = np.ones_like(M) if d is None else 1 / np.sqrt(np.maximum(d, 1e-8 * d.mean()))
        np.testing.assert_allclose(st.mean, m, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(st.scale, s, rtol=1e-8)
        G = (g - m) * s
        np.testing.assert_allclose(st.total_variance, (G * G).sum(1).mean(), rtol=1e-6)
        assert st.count == len(x)


def test_stats_partial_from_engine_matches_reference(tmp_path):
    from gradspace.grads import GradientEngine

    model = make_model()
    x, y = make_data(40)
    layout = layout_of(model)
    sums = stats.accumulate_moments(GradientEngine(model, "all", "energy"), batches(x, y, 16), layout)
    g = reference_grads(model, x)
    np.testing.assert_allclose(sums["sum"], g.sum(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sums["sumsq"], (g * g).sum(0), rtol=1e-4, atol=1e-8)
    stats.save_partial(tmp_path / "p.npz", sums, layout)
    z, lay, _ = stats.load_partial(tmp_path / "p.npz")
    assert lay.names == layout.names and int(z["count"]) == 40


def test_nonfinite_statistics_name_the_parameter():
    model = make_model()
    layout = layout_of(model)
    P = layout.num_params
    bad = {"count": np.int64(4), "sum": np.zeros(P), "sumsq": np.ones(P)}
    pos = layout.offsets[layout.names.index("head.weight")] + 5
    bad["sum"][pos] = np.nan
    with pytest.raises(NumericalError, match=r"head\.weight\[0, 5\]"):
        stats.reduce_moments([bad], layout)
    zero = {"count": np.int64(4), "sum": np.zeros(P), "sumsq": np.ones(P)}
    dead = layout.offsets[layout.names.index("bn.bias")] + 2
    zero["sumsq"][dead] = 0.0  # diag(I) = Σg²/n = 1/4 except the zero (dead) entry
    for floor in (0.0, 1e-6):  # a dead entry takes the largest finite scale, floor or not
        st = stats.reduce_moments([zero], layout, {"var_floor": floor})
        assert np.isfinite(st.scale).all() and st.scale[dead] == st.scale.max() == pytest.approx(2.0)
    tiny = {k: v.copy() for k, v in zero.items()}
    tiny["sumsq"][dead] = 4e-12  # live but near-dead: the floor bounds its scale
    d_mean = (0.25 * (P - 1) + 1e-12) / P
    st = stats.reduce_moments([tiny], layout, {"var_floor": 1e-6})
    assert st.scale[dead] == st.scale.max() == pytest.approx(1 / np.sqrt(1e-6 * d_mean))
    allzero = {"count": np.int64(4), "sum": np.zeros(P), "sumsq": np.zeros(P)}
    with pytest.raises(NumericalError, match=r"zero for all .* conv\.weight"):
        stats.reduce_moments([allzero], layout)
    with pytest.raises(NumericalError, match="conv.weight"):
        layout.check_finite("x", np.r_[np.inf, np.zeros(P - 1)])


def test_default_normalization_is_the_centred_variance_with_dead_parameters_at_the_largest_scale():
    """Default diag(I) = E[(g − M)²] (paper §3.2 "variance matrix"; the authors' code takes
    the mean of (∇E − M)² and replaces the infinite 1/√I of dead parameters by the largest
    finite value), checked against numpy on a model with an all-zero-gradient channel."""
    import yaml

    model = make_model()
    with torch.no_grad():  # channel 1 dead: BN γ = 0 and β < 0, so ReLU output is 0 everywhere
        model.bn.weight[1] = 0.0
        model.bn.bias[1] = -1.0
    x, _ = make_data(60)
    layout = layout_of(model)
    st, g = stats_of(model, x, layout, shards=3)
    assert st.options["scale"] == "variance" and st.options["mean"] is True
    M = g.mean(0)
    L = ((g - M) ** 2).mean(0)  # centred variance, two-pass
    dead = np.all(g == 0, axis=0)
    bn_w, conv = (layout.offsets[layout.names.index(n)] for n in ("bn.weight", "conv.weight"))
    assert dead[bn_w + 1] and dead[conv + 9:conv + 18].all() and 20 <= dead.sum() < len(dead) // 2
    with np.errstate(divide="ignore"):
        I2 = 1 / np.sqrt(L)
    I2[np.isinf(I2)] = I2[np.isfinite(I2)].max()  # the authors' replacement of infinite entries
    np.testing.assert_allclose(st.mean, M, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(st.scale, I2, rtol=1e-7)
    assert np.all(st.scale[dead] == st.scale[~dead].max())
    G = (g - st.mean) * st.scale
    assert np.all(G[:, dead] == 0) and np.isfinite(G).all()
    np.testing.assert_allclose(st.total_variance, (G * G).sum(1).mean(), rtol=1e-6)
    # the uncentred second moment stays available, and differs
    sm, _ = stats_of(model, x, layout, {"scale": "second_moment"})
    with np.errstate(divide="ignore"):
        I2m = 1 / np.sqrt((g * g).mean(0))
    I2m[np.isinf(I2m)] = I2m[np.isfinite(I2m)].max()
    np.testing.assert_allclose(sm.scale, I2m, rtol=1e-7)
    assert not np.allclose(sm.scale, st.scale, rtol=1e-3)
    # the workflow schema writes the same default
    from pathlib import Path

    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    norm = schema["properties"]["subspace"]["properties"]["normalize"]["properties"]
    assert {k: v["default"] for k, v in norm.items()} == stats.DEFAULT_NORMALIZE
    assert stats.normalize_options(None)["scale"] == "variance"


def test_stats_store_roundtrip(tmp_path):
    model = make_model()
    x, _ = make_data(30)
    st, _ = stats_of(model, x, layout_of(model))
    stats.write_stats(tmp_path / "stats.zarr", st)
    back = stats.read_stats(tmp_path / "stats.zarr")
    np.testing.assert_array_equal(back.mean, st.mean)
    np.testing.assert_array_equal(back.scale, st.scale)
    assert back.layout.names == st.layout.names and back.count == 30


# -- operators and blocks -----------------------------------------------------------------

def explicit_G(model, x, st):
    g = reference_grads(model, x)
    return (g - st.mean) * st.scale


def random_V(layout, K, seed=0):
    rng = np.random.default_rng(seed)
    return {b: torch.as_tensor(rng.standard_normal((layout.block_size(b), K)), dtype=torch.float32)
            for b in layout.block_names}


def test_operators_match_explicit_products_and_blocks_sum():
    from gradspace.grads import GradientEngine

    model = make_model()
    x, _ = make_data(48)
    layout = layout_of(model, "top")  # conv / bn / head blocks
    assert len(layout.block_names) == 3
    st, _ = stats_of(model, x, layout)
    G = explicit_G(model, x, st)
    V = random_V(layout, 5)
    Vfull = np.zeros((layout.num_params, 5))
    for b in layout.block_names:
        (a, z), = layout.block_ranges(b)
        Vfull[a:z] = V[b].numpy()
    U = torch.randn(48, 5, generator=torch.Generator().manual_seed(3))
    ops = [JvpVjpOperator(model, layout, st, direction_chunk=2),
           PerSampleOperator(model, layout, st, engine=GradientEngine(model, "all", "energy"))]
    for op in ops:
        gv = op.gv(x, V).double().numpy()
        np.testing.assert_allclose(gv, G @ Vfull, rtol=1e-4, atol=1e-4 * np.abs(G @ Vfull).max())
        # per-block products summed equal the whole
        parts = sum(op.gv(x, {b: V[b]}).double().numpy() for b in layout.block_names)
        np.testing.assert_allclose(parts, gv, rtol=1e-5, atol=1e-5 * np.abs(gv).max())
        gtu = op.gtu(x, U)
        ref = G.T @ U.double().numpy()
        for b in layout.block_names:
            (a, z), = layout.block_ranges(b)
            np.testing.assert_allclose(gtu[b].double().numpy(), ref[a:z], rtol=1e-4,
                                       atol=1e-4 * np.abs(ref).max())
            only = op.gtu(x, U, [b])
            assert list(only) == [b]
            np.testing.assert_allclose(only[b].numpy(), gtu[b].numpy(), rtol=1e-5, atol=1e-6)


def test_block_restricted_persample_differentiates_only_its_blocks():
    """A block-group job's persample operator computes only its blocks' gradients, and its
    products equal the explicit ones on those blocks (non-adjacent blocks too)."""
    model = make_model()
    x, _ = make_data(40)
    layout = layout_of(model, "top")
    st, _ = stats_of(model, x, layout)
    G = explicit_G(model, x, st)
    V = random_V(layout, 4)
    U = torch.randn(40, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    for group in ([layout.block_names[0], layout.block_names[2]], [layout.block_names[1]]):
        op = PerSampleOperator(model, layout, st, blocks=group)
        assert op.engine.num_params == sum(layout.block_size(b) for b in group) < layout.num_params
        gv = op.gv(x, {b: V[b] for b in group}).double().numpy()
        ref = sum(G[:, a:z] @ V[b].double().numpy() for b in group for (a, z) in layout.block_ranges(b))
        np.testing.assert_allclose(gv, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        gtu = op.gtu(x, U, group)
        for b in group:
            (a, z), = layout.block_ranges(b)
            want = G[:, a:z].T @ U.double().numpy()
            np.testing.assert_allclose(gtu[b].double().numpy(), want, rtol=1e-4,
                                       atol=1e-4 * np.abs(want).max())
        other = next(b for b in layout.block_names if b not in group)
        with pytest.raises(ConfigError, match="unknown parameter block"):
            op.gtu(x, U, [other])


# -- PCA ------------------------------------------------------------------------------------

def exact_top(model, x, st, k):
    G = explicit_G(model, x, st)
    w, E = np.linalg.eigh(G.T @ G)
    order = np.argsort(w)[::-1]
    return w[order] / len(x), E[:, order[:k]], G


@pytest.mark.parametrize("method", ["jvp_vjp", "persample"])
@pytest.mark.parametrize("solver", ["krylov", "power"])
def test_pca_matches_exact_eigenvectors(method, solver):
    from gradspace.grads import GradientEngine

    model = make_model()
    x, y = make_data()
    layout = layout_of(model, {"max_params": 40})  # blocks that split the conv weight from the rest
    st, _ = stats_of(model, x, layout)
    k, p = 2, 8
    w, E, _ = exact_top(model, x, st, k)
    assert w[k - 1] / w[k + p] > 5, "test needs a separated spectrum"
    engine = GradientEngine(model, "all", "energy") if method == "persample" else None
    op = (PerSampleOperator(model, layout, st, engine=engine) if engine
          else JvpVjpOperator(model, layout, st))
    Vb, info = power.fit_pca_in_memory(op, lambda: batches(x, y), layout, k, p, seed=0, tol=1e-5,
                                       solver=solver, stats=st)
    V = np.concatenate([Vb[b] for b in layout.block_names]).astype(np.float64)
    assert V.shape == (layout.num_params, k)
    np.testing.assert_allclose(V.T @ V, np.eye(k), atol=1e-5)
    assert sine(V, E) <= 1e-3
    np.testing.assert_allclose(info["eigenvalues"], w[:k], rtol=1e-4)
    assert info["converged"] and info["max_residual"] <= 1e-5
    diags = info["diagnostics"]
    assert [d["pass"] for d in diags] == list(range(len(diags))) and info["passes"] == len(diags) + 1
    # the residual falls to the tolerance, captured variance grows to the top-k optimum
    assert diags[1]["max_residual"] > 1e-2 > diags[-1]["max_residual"]
    assert diags[-1]["captured_variance_topk"] == pytest.approx(w[:k].sum() / w.sum(), rel=1e-4)


def test_krylov_needs_fewer_passes_than_power():
    model = make_model()
    x, y = make_data()
    layout = layout_of(model)
    st, _ = stats_of(model, x, layout)
    op = JvpVjpOperator(model, layout, st)
    passes = {}
    for solver in ("krylov", "power"):
        _, info = power.fit_pca_in_memory(op, lambda: batches(x, y), layout, 4, 4, 0, tol=1e-3,
                                          solver=solver, stats=st)
        assert info["converged"]
        passes[solver] = info["passes"]
    assert passes["krylov"] < passes["power"], passes


def test_operators_give_the_same_subspace():
    from gradspace.grads import GradientEngine

    model = make_model()
    x, y = make_data()
    layout = layout_of(model)
    st, _ = stats_of(model, x, layout)
    out = []
    ops = [JvpVjpOperator(model, layout, st),
           PerSampleOperator(model, layout, st, engine=GradientEngine(model))]
    for op in ops:
        Vb, _ = power.fit_pca_in_memory(op, lambda: batches(x, y), layout, 2, 8, 0, tol=1e-6, stats=st)
        out.append(np.concatenate([Vb[b] for b in layout.block_names]))
    assert sine(out[0], out[1]) <= 1e-3


def _file_passes(op, x, y, layout, st, work, passes, start=0, crash_at=None):
    """The workflow's file-based pass / reduce sequence in one process (two data parts)."""
    if start == 0:
        power.init_basis(work / "V-init.zarr", layout, 3, 4, 0)
    for t in range(start, passes):
        basis = work / ("V-init.zarr" if t == 0 else f"pass-{t - 1}/V-next.zarr")
        g, battrs, _ = power.read_basis(basis)
        V = power.load_basis_tensors(g, layout)
        parts = []
        for w, (a, z) in enumerate(((0, 64), (64, len(x)))):
            if crash_at == (t, w):
                raise KeyboardInterrupt
            W, n, U, rows = power.partial_products(op, batches(x[a:z], y[a:z]), V, keep_images=True)
            parts.append(work / f"pass-{t}/part-{w}.zarr")
            power.write_partial(parts[-1], layout, W, n, {"iteration": t, "shard": str(w), "k": 3,
                                                          "columns": 7}, images=U, rows=rows + a)
        power.reduce_pass(parts, work / f"pass-{t}/V-next.zarr", work / f"krylov-{t}.zarr", st,
                          [work / f"krylov-{s}.zarr" for s in range(t)])


def test_resume_after_interruption_is_bit_identical(tmp_path):
    model = make_model()
    x, y = make_data()
    layout = layout_of(model)
    st, _ = stats_of(model, x, layout)
    op = JvpVjpOperator(model, layout, st)
    _file_passes(op, x, y, layout, st, tmp_path / "full", 4)
    work = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _file_passes(op, x, y, layout, st, work, 4, crash_at=(2, 1))
    assert (work / "krylov-1.zarr").exists() and not (work / "krylov-2.zarr").exists()
    assert not (work / "pass-2/part-1.zarr").exists()  # nothing half-written
    stamp = (work / "krylov-1.zarr" / "zarr.json").stat().st_mtime_ns
    _file_passes(op, x, y, layout, st, work, 4, start=2)
    assert (work / "krylov-1.zarr" / "zarr.json").stat().st_mtime_ns == stamp  # not redone
    for name in ("krylov-3.zarr", "pass-3/V-next.zarr"):
        a, b = power.open_store(tmp_path / "full" / name), power.open_store(work / name)
        for key in a.array_keys():
            np.testing.assert_array_equal(np.asarray(a[key][...]), np.asarray(b[key][...]))
    d = power.krylov_diagnostics(work / "krylov-3.zarr")
    ref = power.krylov_diagnostics(tmp_path / "full/krylov-3.zarr")
    assert d["pass"] == 3 and d["residuals"] == ref["residuals"]


def test_reduce_checks_parts(tmp_path):
    model = make_model()
    x, y = make_data(64)
    layout = layout_of(model)
    st, _ = stats_of(model, x, layout)
    op = JvpVjpOperator(model, layout, st)
    power.init_basis(tmp_path / "V0.zarr", layout, 2, 2, 0)
    g, _, _ = power.read_basis(tmp_path / "V0.zarr")
    V = power.load_basis_tensors(g, layout)
    paths = []
    for s, (a, z) in enumerate(((0, 32), (32, 64))):
        W, n, U, rows = power.partial_products(op, batches(x[a:z], y[a:z]), V, keep_images=True)
        paths.append(tmp_path / f"p{s}.zarr")
        power.write_partial(paths[-1], layout, W, n, {"iteration": 0, "shard": str(s), "k": 2, "columns": 4},
                            images=U, rows=rows + a)
    with pytest.raises(StoreError, match="missing or extra"):
        power.reduce_pass(paths[:1], tmp_path / "V1.zarr", tmp_path / "K0.zarr", st)
    with pytest.raises(StoreError, match="Krylov records"):
        power.reduce_pass(paths, tmp_path / "V1.zarr", tmp_path / "K0.zarr", st, [tmp_path / "nope.zarr"])
    diag = power.reduce_pass(paths, tmp_path / "V1.zarr", tmp_path / "K0.zarr", st)
    assert diag["n"] == 64 and diag["pass"] == 0 and diag["max_residual"] is None
    # two part partials summed equal one partial over all samples (float32 storage)
    W_all, _ = power.partial_products(op, batches(x, y), V)
    z = [power.read_basis(p, "pca_partial")[0] for p in paths]
    for b in layout.block_names:
        got = np.asarray(z[0][f"W.{b}"], np.float64) + np.asarray(z[1][f"W.{b}"])
        np.testing.assert_allclose(got, W_all[b], rtol=1e-5, atol=1e-6 * np.abs(W_all[b]).max())


def test_tsqr_orthonormal_even_when_rank_deficient():
    rng = np.random.default_rng(0)
    W = {"a": rng.standard_normal((30, 6)), "b": rng.standard_normal((4, 6))}
    W["a"][:, 5] = W["a"][:, 0]  # rank deficient
    W["b"][:, 5] = W["b"][:, 0]
    get, R = power.tsqr(["a", "b"], W.__getitem__)
    Q = np.vstack([get("a"), get("b")])
    np.testing.assert_allclose(Q.T @ Q, np.eye(6), atol=1e-12)
    np.testing.assert_allclose(Q @ R, np.vstack([W["a"], W["b"]]), atol=1e-12)
    assert (np.diag(R) >= 0).all()


# -- AG -------------------------------------------------------------------------------------

def test_ag_equals_explicit_class_means(tmp_path):
    model = make_model()
    x, y = make_data(90)
    layout = layout_of(model)
    st, _ = stats_of(model, x, layout)
    G = explicit_G(model, x, st)
    means = np.stack([G[y.numpy() == c].mean(0) for c in range(3)], 1)
    op = JvpVjpOperator(model, layout, st)
    paths = []
    for s, (lo, hi) in enumerate(((0, 50), (50, 90))):
        sums, counts = ag.class_sums(op, batches(x[lo:hi], y[lo:hi], 16), 3)
        paths.append(tmp_path / f"ag{s}.zarr")
        ag.write_ag_partial(paths[-1], layout, sums, counts, {"shard": s})
    info = ag.reduce_ag(paths, layout, tmp_path / "ag.zarr", True, st)
    g, _, _ = power.read_basis(tmp_path / "ag.zarr", "subspace")
    M = full_basis(g, layout, "means")
    np.testing.assert_allclose(M, means, rtol=1e-4, atol=1e-5 * np.abs(means).max())
    V = full_basis(g, layout)
    # centred gradients: Σ_c n_c μ_c = 0, so the class means span C − 1 = 2 dimensions
    assert info["rank"] == info["k"] == 2 and info["classes"] == 3 and info["counts"] == [30, 30, 30]
    np.testing.assert_allclose(V.T @ V, np.eye(2), atol=1e-5)
    assert np.linalg.norm(means - V @ (V.T @ means)) < 1e-5 * np.linalg.norm(means)
    # without the centring the C means are independent and span V exactly
    st2 = stats.reduce_moments([{"count": np.int64(90), "sum": st.mean * 0, "sumsq": st.scale ** -2 * 90}],
                               layout, {"mean": False})
    op2 = JvpVjpOperator(model, layout, st2)
    sums, counts = ag.class_sums(op2, batches(x, y), 3)
    ag.write_ag_partial(tmp_path / "raw.zarr", layout, sums, counts, {"shard": 0})
    info2 = ag.reduce_ag([tmp_path / "raw.zarr"], layout, tmp_path / "ag2.zarr", True)
    V2 = full_basis(power.read_basis(tmp_path / "ag2.zarr")[0], layout)
    G2 = reference_grads(model, x) * st2.scale
    raw_means = np.stack([G2[y.numpy() == c].mean(0) for c in range(3)], 1)
    assert info2["k"] == 3 and sine(V2, raw_means) < 1e-4


def test_ag_class_partitioned_jobs_equal_one_job(tmp_path):
    """Class-range jobs (subspace.ag.class_jobs) over two data parts: each partial holds only
    its classes' columns, gradients are computed only for its classes' samples, and the
    reduce gives the one-job subspace; a missing range is an error naming the gap."""
    model = make_model()
    x, y = make_data(90)
    layout = layout_of(model)
    st, _ = stats_of(model, x, layout)
    op = JvpVjpOperator(model, layout, st)
    sums, counts = ag.class_sums(op, batches(x, y, 16), 3)
    ag.write_ag_partial(tmp_path / "one.zarr", layout, sums, counts, {"shard": 0})
    ref = ag.reduce_ag([tmp_path / "one.zarr"], layout, tmp_path / "ref.zarr", True, st)
    seen = []

    class Counting(JvpVjpOperator):
        def gtu(self, xb, U, blocks=None):
            seen.append(int(xb.shape[0]))
            return super().gtu(xb, U, blocks)

    op2 = Counting(model, layout, st)
    paths = []
    for job in range(2):
        c0, c1 = ag.class_range(3, 2, job)
        for part, (lo, hi) in enumerate(((0, 50), (50, 90))):
            sums, counts = ag.class_sums(op2, batches(x[lo:hi], y[lo:hi], 16), 3, classes=(c0, c1))
            assert all(v.shape[1] == c1 - c0 for v in sums.values())
            assert counts[:c0].sum() == counts[c1:].sum() == 0
            paths.append(tmp_path / f"c{job}-p{part}.zarr")
            ag.write_ag_partial(paths[-1], layout, sums, counts,
                                {"shard": f"classes {c0}-{c1} of {part}", "classes": [c0, c1]})
    assert sum(seen) == 90  # one gradient per sample over all class jobs
    info = ag.reduce_ag(paths, layout, tmp_path / "ag.zarr", True, st)
    assert info["k"] == ref["k"] and info["counts"] == ref["counts"]
    g1, _, _ = power.read_basis(tmp_path / "ref.zarr", "subspace")
    g2, _, _ = power.read_basis(tmp_path / "ag.zarr", "subspace")
    M1 = full_basis(g1, layout, "means")
    np.testing.assert_allclose(full_basis(g2, layout, "means"), M1, rtol=1e-4, atol=1e-5 * np.abs(M1).max())
    with pytest.raises(StoreError, match="do not tile"):
        ag.reduce_ag([p for p in paths if not p.name.startswith("c0")], layout, tmp_path / "bad.zarr",
                     True, st)


# -- projection -----------------------------------------------------------------------------

def test_projection_and_reconstruction_error(tmp_path):
    from gradspace.grads import GradientEngine

    model = make_model()
    x, y = make_data(60)
    layout = layout_of(model)
    st, _ = stats_of(model, x, layout)
    G = explicit_G(model, x, st)
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((layout.num_params, 4)))
    V = {b: torch.as_tensor(layout.take(Q.T, b).T.copy(), dtype=torch.float32) for b in layout.block_names}
    op = PerSampleOperator(model, layout, st, engine=GradientEngine(model))
    timer = Timer()
    project.write_reduced(tmp_path / "r.zarr", 60, 4, project.project_batches(op, batches(x, y), V, timer),
                          {"k": 4, "blocks": layout.block_names})
    from gradspace.store import open_store

    z = open_store(tmp_path / "r.zarr")
    np.testing.assert_allclose(np.asarray(z["reduced"]), G @ Q, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(z["index"]), np.arange(60))
    rec = reconstruction_errors([tmp_path / "r.zarr"])
    exact = np.linalg.norm(G - G @ Q @ Q.T, axis=1) / np.linalg.norm(G, axis=1)
    np.testing.assert_allclose(rec, exact, rtol=1e-3)
    assert set(timer.totals) == {"gradient", "projection"}
    # per-block parts merged equal the whole
    parts = []
    for b in layout.block_names:
        parts.append(tmp_path / f"r-{b}.zarr")
        project.write_reduced(parts[-1], 60, 4, project.project_batches(op, batches(x, y), {b: V[b]}, timer),
                              {"k": 4, "blocks": [b]})
    project.merge_parts(parts, tmp_path / "m.zarr", layout.block_names)
    m = open_store(tmp_path / "m.zarr")
    np.testing.assert_allclose(np.asarray(m["reduced"]), np.asarray(z["reduced"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(m["gnorm2"]), np.asarray(z["gnorm2"]), rtol=1e-6)
    with pytest.raises(StoreError, match="cover blocks"):
        project.merge_parts(parts[:1], tmp_path / "bad.zarr", layout.block_names)


def test_layout_blocks_and_serialization():
    model = make_model()
    lay = layout_of(model, "single")
    assert lay.block_names == ["all"] and lay.num_params == 95
    assert layout_of(model, "top").block_names == ["00_conv", "01_bn", "02_head"]
    lay2 = layout_of(model, {"max_params": 40})
    assert sum(lay2.block_size(b) for b in lay2.block_names) == 95
    assert ParamLayout.from_dict(lay2.to_dict()).blocks == lay2.blocks
    assert lay.locate_flat(36) == "bn.weight[0]"


def test_persample_products_hold_one_engine_chunk_not_the_batch():
    """gv, gtu, gtgv and the projection over a batch of 48 with an engine chunk of 10
    samples equal the explicit products, and the engine's gradient buffer never grows past
    one chunk (memory bounded by the chunk, not the loader batch)."""
    from gradspace.grads import GradientEngine
    from gradspace.runtime import Timer
    from gradspace.subspace.project import project_batches

    model = make_model()
    x, y = make_data(48)
    layout = layout_of(model, "top")
    st, _ = stats_of(model, x, layout)
    G = explicit_G(model, x, st)
    V = random_V(layout, 5)
    Vfull = np.zeros((layout.num_params, 5))
    for b in layout.block_names:
        (a, z), = layout.block_ranges(b)
        Vfull[a:z] = V[b].numpy()
    eng = GradientEngine(model, "all", "energy", chunk_size=10)
    op = PerSampleOperator(model, layout, st, engine=eng)
    assert eng.chunk_len() == 10
    ref_gv = G @ Vfull
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(ref_gv).max())
    np.testing.assert_allclose(op.gv(x, V).double().numpy(), ref_gv, **tol)
    U, W = op.gtgv(x, V)
    np.testing.assert_allclose(U.double().numpy(), ref_gv, **tol)
    ref_w = G.T @ U.double().numpy()
    gtu = op.gtu(x, U)
    for b in layout.block_names:
        (a, z), = layout.block_ranges(b)
        for got in (W[b], gtu[b]):
            np.testing.assert_allclose(got.double().numpy(), ref_w[a:z], rtol=1e-4,
                                       atol=1e-4 * np.abs(ref_w).max())
    (rows, _, red, gn), = project_batches(op, [(x, y, np.arange(48))], V, Timer())
    np.testing.assert_allclose(red, ref_gv, **tol)
    np.testing.assert_allclose(gn, (G ** 2).sum(1), rtol=1e-4)
    assert eng._buf is not None and eng._buf.shape[0] == 10
