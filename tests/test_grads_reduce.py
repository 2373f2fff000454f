"""The engine's reduction path (``GradientEngine.reduce`` / ``iter_reduced``): per-sample
norms computed parameter tensor by parameter tensor equal the norms of the materialized
N×P gradients, for every strategy, parameter selection, power, shift and block; the
materializing API (byte-bounded chunks, reused buffers) returns the same gradients."""

from __future__ import annotations

import math

import pytest
import torch

from gradspace.errors import ConfigError, NumericalError
from gradspace.grads import GradientEngine
from gradspace.grads.reduce import GradReductions, NormReducer, check_power, power_sums
from test_grads_engine import MODELS, naive_loop, tiny_cnn, tiny_resnet

INF = math.inf
POWERS = (1, 2, INF, 0, 0.3, 3)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def ref_norms(g: torch.Tensor, p: float) -> torch.Tensor:
    """Norms of the rows of a materialized gradient matrix (float64)."""
    a = g.abs().double()
    if p == INF:
        return a.amax(1)
    if p == 0:
        return (a != 0).sum(1).double()
    return (a ** p).sum(1) ** (1.0 / p)


def _x(shape, n=7, seed=3):
    return torch.randn(n, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("params", ["last", "last_weight", "block", "all"])
@pytest.mark.parametrize("strategy", ["closed_form", "vmap", "hooks", "loop"])
def test_reduce_equals_norms_of_materialized(arch, params, strategy):
    build, shape, block = MODELS[arch]
    model = build()
    spec = block if params == "block" else params
    if strategy == "closed_form" and params not in ("last", "last_weight"):
        return  # rejected at construction (test_grads_engine)
    x = _x(shape)
    eng = GradientEngine(model, params=spec, loss="kl_uniform", temperature=2.0, strategy=strategy,
                         chunk_size=3)
    ref = naive_loop(model, spec, "kl_uniform", x, T=2.0)
    assert torch.allclose(eng.batch(x), ref, rtol=1e-10, atol=1e-14)
    red, logits = eng.reduce(x, NormReducer(POWERS), return_logits=True)
    assert isinstance(red, GradReductions) and len(red) == 7 and red.names == eng.param_names
    assert torch.allclose(logits, model(x).detach(), rtol=1e-12, atol=1e-12)
    for p in POWERS:
        want = ref_norms(ref, p)
        got = red.norm(p)
        assert got.dtype == torch.float64 and got.shape == (7,)
        assert float(((got - want).abs() / want.abs()).max()) <= 1e-10, (p, got, want)
        # power sums: Σ|g|^p (counts for p = 0, max for inf)
        ps = red.power_sum(p)
        if p not in (0, INF):
            assert torch.allclose(ps, want ** p, rtol=1e-10)
    # per parameter tensor and per block: each column slice of the materialized matrix
    off = 0
    for name, shp in zip(eng.param_names, eng.param_shapes, strict=True):
        k = math.prod(shp)
        for p in (1, 2, INF):
            assert torch.allclose(red.norm(p, names=[name]), ref_norms(ref[:, off:off + k], p),
                                  rtol=1e-10, atol=0)
        off += k
    assert off == eng.num_params


def test_block_norms_by_prefix_and_streaming_rows():
    model = tiny_resnet()
    x = _x((3, 8, 8), n=9)
    for strategy in ("vmap", "hooks", "loop"):
        eng = GradientEngine(model, params="all", strategy=strategy, chunk_size=4)
        g = eng.batch(x)
        chunks = list(eng.iter_reduced([(x[:5], None, torch.arange(10, 15)),
                                        (x[5:], None, torch.arange(15, 19))], NormReducer((1, 2))))
        assert [len(r) for _, r in chunks] == [4, 1, 4]
        assert torch.equal(torch.cat([rows for rows, _ in chunks]), torch.arange(10, 19))
        red = GradReductions.cat([r for _, r in chunks])
        cols, off = {}, 0
        for name, shp in zip(eng.param_names, eng.param_shapes, strict=True):
            k = math.prod(shp)
            cols[name] = (off, off + k)
            off += k
        blocks = {"stem": ["stages.stem"], "layer2": ["stages.layer2"], "head": ["head"]}
        for p in (1, 2):
            got = red.block_norms(p, blocks)
            for b, (pre,) in blocks.items():
                idx = [i for n, (lo, hi) in cols.items() if n.startswith(pre + ".")
                       for i in range(lo, hi)]
                want = ref_norms(g[:, idx], p)
                assert torch.allclose(got[b], want, rtol=1e-10), (strategy, b, p)
            assert torch.allclose(red.norm(p), ref_norms(g, p), rtol=1e-10)
        with pytest.raises(ConfigError, match="nosuch"):
            red.norm(1, names=["nosuch"])
        with pytest.raises(ConfigError, match="not computed"):
            red.norm(3)


def test_shifted_reductions_equal_norms_of_shifted_gradients():
    """BatchGrad's ‖g + c‖₁ with a constant c, without materializing g."""
    model = tiny_cnn()
    x = _x((1, 8, 8), n=5)
    y = torch.tensor([0, 3, 1, 4, 2])
    for strategy in ("vmap", "hooks", "loop"):
        eng = GradientEngine(model, params="all", loss="ce_label", strategy=strategy, chunk_size=2)
        g = eng.batch(x, target=y)
        c = torch.linspace(-1, 1, eng.num_params, dtype=torch.float64)
        red = eng.reduce(x, NormReducer((1, 2, INF), shifts={"ref": c}), target=y)
        for p in (1, 2, INF):
            assert torch.allclose(red.norm(p, shift="ref"), ref_norms(g + c, p), rtol=1e-10)
            assert torch.allclose(red.norm(p), ref_norms(g, p), rtol=1e-10)
        with pytest.raises(ConfigError, match="entries"):
            eng.reduce(x, NormReducer((1,), shifts={"bad": c[:3]}), target=y)


def test_fp32_reduction_matches_double_norms_of_fp32_gradients():
    """float32 models: per-tensor sums in float32 (cascade), across tensors in float64."""
    model = tiny_resnet(dtype=torch.float32)
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    for strategy in ("vmap", "hooks", "loop"):
        eng = GradientEngine(model, params="all", strategy=strategy, chunk_size=4)
        g = eng.batch(x)
        red = eng.reduce(x, NormReducer((1, 2, INF, 0.5)))
        for p in (1, 2, INF, 0.5):
            # the same float32 gradients up to the strategy's rounding (1e-5), the same sums
            assert torch.allclose(red.norm(p), ref_norms(g, p), rtol=1e-5), (strategy, p)


def test_reduce_empty_batch_and_nonfinite_names_sample_and_parameter():
    model = tiny_cnn()
    eng = GradientEngine(model, params="all", strategy="loop")
    red = eng.reduce(torch.zeros(0, 1, 8, 8, dtype=torch.float64), NormReducer((1,)))
    assert len(red) == 0 and red.norm(1).shape == (0,)
    x = _x((1, 8, 8), n=5)
    x[3, 0, 2, 2] = float("nan")
    for strategy in ("closed_form", "vmap", "hooks", "loop"):
        e = GradientEngine(model, params="last" if strategy == "closed_form" else "all",
                           strategy=strategy, chunk_size=2)
        for powers in ((1,), (0,), (2, INF)):  # p = 0 alone cannot see NaN: checked anyway
            with pytest.raises(NumericalError, match="sample 3, parameter"):
                e.reduce(x, NormReducer(powers))
    with pytest.raises(NumericalError, match="sample 13"):
        list(eng.iter_reduced([(x, None, torch.arange(10, 15))], NormReducer((1,))))


def test_power_sums_and_reducer_validation():
    g = torch.tensor([[3.0, -4.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    s = power_sums(g.clone(), (1, 2, INF, 0, 0.5))
    assert s[1].tolist() == [7.0, 0.0] and s[2].tolist() == [25.0, 0.0]
    assert s[INF].tolist() == [4.0, 0.0] and s[0].tolist() == [2.0, 0.0]
    assert s[0.5].tolist() == pytest.approx([3 ** 0.5 + 2.0, 0.0])
    h = g.clone()
    assert power_sums(h, (1, 2), inplace=True)[2].tolist() == [25.0, 0.0]
    assert h.tolist() == [[9.0, 16.0, 0.0], [0.0, 0.0, 0.0]]  # overwritten: |g|, then g²
    assert power_sums(torch.zeros(2, 0), (1,))[1].tolist() == [0.0, 0.0]
    assert NormReducer((1, 1.0, "inf", 2)).powers == (1.0, INF, 2.0)
    assert check_power(math.inf) == INF
    for bad in (-1, "x", None, float("nan"), True):
        with pytest.raises(ConfigError, match="norm order"):
            NormReducer((bad,))
    with pytest.raises(ConfigError, match="at least one"):
        NormReducer(())


def test_materializing_chunks_bounded_by_bytes_and_buffer_reuse():
    model = tiny_resnet()
    x = _x((3, 8, 8), n=10)
    P = sum(p.numel() for p in model.parameters())
    for strategy in ("vmap", "hooks", "loop"):
        ref = GradientEngine(model, params="all", strategy=strategy, chunk_size=64).batch(x)
        # a budget of 3 samples' gradients: chunks of 3, whatever chunk_size says
        eng = GradientEngine(model, params="all", strategy=strategy, chunk_size=64,
                             max_chunk_bytes=3 * P * 8 + 7)
        assert eng.chunk_len() == 3
        assert torch.allclose(eng.batch(x), ref, rtol=1e-12, atol=1e-15)
        sizes, got, ptrs = [], [], set()
        for _, g in eng.iter_chunks([x], reuse_buffer=True):
            sizes.append(g.shape[0])
            ptrs.add(g.untyped_storage().data_ptr())
            got.append(g.clone())  # the buffer is overwritten by the next chunk
        assert sizes == [3, 3, 3, 1] and len(ptrs) == 1
        assert torch.allclose(torch.cat(got), ref, rtol=1e-12, atol=1e-15)
        fresh = [g for _, g in eng.iter_chunks([x])]
        assert len({g.untyped_storage().data_ptr() for g in fresh}) == 4
        assert torch.allclose(torch.cat(fresh), ref, rtol=1e-12, atol=1e-15)
    # a budget below one sample still makes progress, one sample at a time
    assert GradientEngine(model, params="all", max_chunk_bytes=1).chunk_len() == 1
    # the reduction loop needs no gradient workspace: chunk_size applies
    assert GradientEngine(model, params="all", strategy="loop", chunk_size=5,
                          max_chunk_bytes=1).chunk_len(reducing=True) == 5
    with pytest.raises(ConfigError, match="max_chunk_bytes"):
        GradientEngine(model, params="all", max_chunk_bytes=0)


def test_batch_into_caller_buffer():
    model = tiny_cnn()
    x = _x((1, 8, 8), n=5)
    for strategy in ("vmap", "hooks", "loop"):
        eng = GradientEngine(model, params="all", strategy=strategy, chunk_size=2)
        ref = eng.batch(x)
        buf = torch.full((8, eng.num_params), float("nan"), dtype=torch.float64)
        got = eng.batch(x, out=buf)
        assert got.shape == ref.shape and got.data_ptr() == buf.data_ptr()
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-15)
        assert torch.isnan(buf[5:]).all()  # rows past N untouched
        for bad in (torch.empty(4, eng.num_params, dtype=torch.float64),
                    torch.empty(8, eng.num_params, dtype=torch.float32),
                    torch.empty(eng.num_params, 8, dtype=torch.float64).T):
            with pytest.raises(ConfigError, match="out="):
                eng.batch(x, out=bad)


def test_batch_into_reused_engine_buffer():
    """batch(reuse_buffer=True): the same values as a fresh batch, one storage from batch
    to batch (grown once for a larger batch), shared with iter_chunks(reuse_buffer=True)."""
    model = tiny_cnn()
    x = _x((1, 8, 8), n=6)
    for strategy in ("vmap", "hooks", "loop"):
        eng = GradientEngine(model, params="all", strategy=strategy, chunk_size=4)
        ref = eng.batch(x)
        a = eng.batch(x[:4], reuse_buffer=True)
        assert torch.allclose(a, ref[:4], rtol=1e-12, atol=1e-15)
        ptr = a.data_ptr()
        b = eng.batch(x[4:], reuse_buffer=True)  # smaller: same storage, first rows
        assert b.data_ptr() == ptr and torch.allclose(b, ref[4:], rtol=1e-12, atol=1e-15)
        c = eng.batch(x, reuse_buffer=True)  # larger: grown once
        assert torch.allclose(c, ref, rtol=1e-12, atol=1e-15)
        assert eng.batch(x[:3], reuse_buffer=True).data_ptr() == c.data_ptr()
        (_, g), *_ = eng.iter_chunks([x], reuse_buffer=True)
        assert g.data_ptr() == c.data_ptr()


def test_auto_on_cpu_prefers_hooks_for_large_selections():
    """Past CPU_BATCHED_MAX_PARAMS: hooks when every layer has a rule, else the loop."""
    from torch import nn

    from gradspace.grads.engine import CPU_BATCHED_MAX_PARAMS

    big = nn.Sequential(nn.Flatten(), nn.Linear(2000, 1100), nn.ReLU(), nn.Linear(1100, 3))
    assert sum(p.numel() for p in big.parameters()) > CPU_BATCHED_MAX_PARAMS
    assert GradientEngine(big, params="all").strategy_used == "hooks"
    ln = nn.Sequential(nn.Flatten(), nn.Linear(2000, 1100), nn.LayerNorm(1100), nn.Linear(1100, 3))
    assert GradientEngine(ln, params="all").strategy_used == "loop"
    small_ln = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    assert GradientEngine(small_ln, params="all").strategy_used == "vmap"


# -- grad-scores on the reduction path -------------------------------------------------------------
ALL_SCORES = {"gn1": {"kind": "gradnorm", "p": 1}, "gn2": {"kind": "gradnorm", "p": 2},
              "gninf": {"kind": "gradnorm", "p": "inf"}, "gn03": {"kind": "gradnorm", "p": 0.3},
              "gnoh": {"kind": "gradnorm", "target": "onehot"},
              "ex": {"kind": "igoe"}, "exu2": {"kind": "igoe", "dist": "uniform", "norm": "l2sq"},
              "exw": {"kind": "igoe", "norm": "l2sq", "weight": "logp_over_p"},
              "neu": {"kind": "igoe", "order": "norm_exp", "dist": "uniform"},
              "mc": {"kind": "igoe", "samples": 3},
              "bg": {"kind": "batchgrad"}}


def materialized_scores(model, p, x, ref):
    """The scores as grad-scores computed them before the reduction path: N×P gradients
    from ``engine.batch``, then float64 norms of the rows (reference implementation)."""
    import numpy as np

    from gradspace.detectors.igoe import orientation
    from gradspace.grads import lastlayer

    T = p["temperature"]

    def eng(loss):
        return GradientEngine(model, params=p["params"], loss=loss, temperature=T,
                              strategy=p["strategy"], chunk_size=p["chunk_size"])

    def nrm(g, key):
        a = g.abs().double()
        if key == "l1":
            return a.sum(1).numpy()
        if key == "l2sq":
            return (a * a).sum(1).numpy()
        q = float(key)
        return (a.amax(1) if q == INF else (a ** q).sum(1) ** (1 / q)).numpy()

    with torch.no_grad():
        logits = model(x).double().numpy()
    prob = lastlayer.softmax_t(logits, T)
    N, C = prob.shape
    ref_grad = eng("ce_label").batch(*ref).sum(0)
    g_kl, g_oh = eng("kl_uniform").batch(x), eng("ce_pred").batch(x)
    g_y = [eng("ce_label").batch(x, target=torch.full((N,), y)) for y in range(C)]
    logp = np.log(prob)
    out = {}
    for name, s in p["scores"].items():
        if s["kind"] == "gradnorm":
            out[name] = nrm(g_kl, s["p"]) if s["target"] == "uniform" else -nrm(g_oh, s["p"])
        elif s["kind"] == "batchgrad":
            out[name] = orientation("pred") * sum(prob[:, y] * nrm(g_y[y] + ref_grad, "l1") for y in range(C))
        elif s["order"] == "norm_exp":
            out[name] = orientation(s["dist"]) * nrm(g_kl, s["norm"])
        elif s["samples"] is not None:
            labels = lastlayer.sample_labels(prob, s["samples"], p["seed"], lastlayer.row_keys(logits))
            vals = [nrm(eng("ce_label").batch(x, target=torch.as_tensor(labels[:, k])), s["norm"])
                    for k in range(labels.shape[1])]
            out[name] = orientation(s["dist"]) * sum(vals) / len(vals)
        else:
            acc = 0.0
            for y in range(C):
                w = prob[:, y] if s["dist"] == "pred" else np.full(N, 1.0 / C)
                if s["weight"] == "logp_over_p":
                    w = w * logp[:, y] / prob[:, y]
                acc = acc + w * nrm(g_y[y], s["norm"])
            out[name] = orientation(s["dist"]) * acc
    return out


@pytest.mark.parametrize("strategy", ["vmap", "hooks", "loop"])
@pytest.mark.parametrize("params", ["all", "block"])
def test_grad_scores_unchanged_by_reduction_path(strategy, params, monkeypatch):
    import numpy as np

    from gradspace.grads import engine as E
    from gradspace.grads.scoring import GradScorer, parse_params

    model = tiny_resnet(num_classes=3)
    spec = ["layer2"] if params == "block" else "all"
    x = _x((3, 8, 8), n=7)
    ref = (_x((3, 8, 8), n=3, seed=9), torch.arange(3))
    p = parse_params({"params": spec, "mean": [0.0], "std": [1.0], "strategy": strategy,
                      "chunk_size": 3, "temperature": 1.5, "scores": ALL_SCORES})
    want = materialized_scores(model, p, x, ref)
    calls = []
    batch = E.GradientEngine.batch
    monkeypatch.setattr(E.GradientEngine, "batch",
                        lambda self, *a, **k: calls.append(1) or batch(self, *a, **k))
    got = GradScorer(model, p, ref)(x)
    assert len(calls) == 1  # only BatchGrad's reference sum over the ID points is materialized
    assert set(got) == set(ALL_SCORES)
    for name in ALL_SCORES:
        assert got[name].dtype == np.float64 and got[name].shape == (7,)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=0, err_msg=name)
    assert np.all(got["gn1"] > 0) and np.all(got["gnoh"] < 0) and np.all(got["bg"] < 0)  # −BatchGrad


def test_grad_scores_fp32_within_float32_rounding():
    import numpy as np

    from gradspace.grads.scoring import GradScorer, parse_params

    model = tiny_resnet(num_classes=3, dtype=torch.float32)
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    ref = (torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(7)), torch.arange(3))
    scores = {k: ALL_SCORES[k] for k in ("gn1", "gn2", "gninf", "gn03", "ex", "exu2", "bg")}
    p = parse_params({"params": "all", "mean": [0.0], "std": [1.0], "strategy": "hooks",
                      "chunk_size": 2, "scores": scores})
    want = materialized_scores(model, p, x, ref)
    got = GradScorer(model, p, ref)(x)
    for name in scores:  # float32 per-tensor sums vs float64 sums of the same float32 gradients
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)


def test_grad_scores_max_chunk_mb():
    from gradspace.grads.scoring import GradScorer, parse_params

    base = {"mean": [0.0], "std": [1.0]}
    for bad in (0, -1, "x", True):
        with pytest.raises(ConfigError, match="max_chunk_mb"):
            parse_params({**base, "max_chunk_mb": bad})
    model = tiny_resnet(num_classes=3)
    sc = GradScorer(model, parse_params({**base, "max_chunk_mb": 0.5, "strategy": "vmap"}))
    assert sc.engine("kl_uniform").max_chunk_bytes == 2**19


def test_grad_scores_gradnorm_only_skips_the_probability_forward():
    import numpy as np

    from gradspace.grads.scoring import GradScorer, parse_params

    model = tiny_resnet(num_classes=3)
    x = _x((3, 8, 8), n=5)
    ref = (_x((3, 8, 8), n=3, seed=9), torch.arange(3))
    only = {k: ALL_SCORES[k] for k in ("gn1", "gninf", "gnoh", "neu")}
    p = parse_params({"params": "all", "mean": [0.0], "std": [1.0], "strategy": "hooks",
                      "chunk_size": 2, "scores": only})
    sc = GradScorer(model, p)
    assert not sc.needs_prob
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        got = sc(x)
    finally:
        handle.remove()
    # the engine's chunks for two losses (KL-uniform: gn1, gninf, neu; one-hot CE: gnoh),
    # no extra whole-batch forward
    assert calls == [2, 2, 1] * 2
    want = materialized_scores(model, p, x, ref)
    for name in only:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=0, err_msg=name)
    assert GradScorer(model, parse_params({**{k: p[k] for k in ("mean", "std")},
                                           "scores": {"ex": {"kind": "igoe"}}})).needs_prob


def test_finiteness_bound_skips_only_proven_parameters():
    """Materializing hooks skip the re-read of parameters whose entries a bound proves
    finite; a gradient that overflows from finite activations is still caught."""
    from torch import nn

    def model(w):
        m = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 2, bias=False))
        with torch.no_grad():
            m[0].weight.fill_(1e-38)
            m[1].weight.copy_(torch.tensor([[w], [0.0]]))
        return m.eval()

    x = torch.full((2, 1), 3e38)  # finite in float32; h = x·1e-38 = 3
    ok = model(0.5)  # ∂E/∂W1 = −0.5·p₀·x ≈ −1.2e38: finite, beyond what the bound can prove
    got = GradientEngine(ok, params="all", strategy="hooks").batch(x)
    ref = GradientEngine(ok, params="all", strategy="loop").batch(x)
    assert torch.isfinite(got).all() and float(got[0, 0]) < -1e38
    assert torch.allclose(got, ref, rtol=1e-5)
    bad = model(2.0)  # ∂E/∂W1 ≈ −2·x = −6e38: overflows to −inf in float32
    for strategy in ("hooks", "loop"):
        with pytest.raises(NumericalError, match="sample 0, parameter '0.weight'"):
            GradientEngine(bad, params="all", strategy=strategy).batch(x)
        with pytest.raises(NumericalError, match="parameter '0.weight'"):
            GradientEngine(bad, params="all", strategy=strategy).reduce(x, NormReducer((1,)))
    # ordinary models: every Linear/Conv weight and bias is proven finite, BatchNorm is not
    from gradspace.grads import engine as E

    net = tiny_resnet(dtype=torch.float32)
    eng = GradientEngine(net, params="all", strategy="hooks")
    sink = E._FlatSink(torch.empty(3, eng.num_params), eng)
    eng._chunk(torch.randn(3, 3, 8, 8), None, sink)
    kind = {f"{m}.{a}" if m else a: type(mod) for m, mod in net.named_modules()
            for a, _ in mod.named_parameters(recurse=False)}
    verified = {eng.param_names[j] for j in sink.verified}
    assert verified == {n for n in eng.param_names if kind[n] in (nn.Conv2d, nn.Linear)}
    assert len(verified) == 8  # 6 convolution weights (no biases), head weight and bias


def test_fp32_sums_of_large_tensors_are_accurate():
    """Float32 per-tensor sums stay at float32 rounding for millions of entries (a naive
    float32 accumulation, as in torch._foreach_norm on CPU, is off by ~1e-4 here)."""
    from torch import nn

    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(2000, 1200), nn.Tanh(), nn.Linear(1200, 3)).eval()
    x = torch.randn(3, 2000, generator=torch.Generator().manual_seed(1))
    for strategy in ("loop", "hooks", "vmap"):
        eng = GradientEngine(big, params="all", strategy=strategy, chunk_size=2)
        g = eng.batch(x).double()
        red = eng.reduce(x, NormReducer((1, 2, INF)))
        for p in (1, 2, INF):
            np_ref = ref_norms(g, p)
            assert float(((red.norm(p) - np_ref).abs() / np_ref).max()) < 1e-6, (strategy, p)
