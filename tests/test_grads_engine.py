"""Per-sample gradient engine: every strategy against a naive one-sample-at-a-time autograd
loop, for each parameter selection, on a small CNN and a small ResNet with BatchNorm
(eval mode); loss formulas; streaming; errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from gradspace.errors import ConfigError, NumericalError
from gradspace.grads import GradientEngine, select_params
from gradspace.grads import losses as L


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


class Adapter(nn.Module):
    """The gradspace model API over an ordered list of named stages and a linear head."""

    def __init__(self, stages: list[tuple[str, nn.Module]], head: nn.Linear):
        super().__init__()
        self.stages = nn.ModuleDict(stages)
        self.head = head

    @property
    def stage_names(self):
        return list(self.stages.keys())

    def forward_until(self, name, x):
        for n, m in self.stages.items():
            x = m(x)
            if n == name:
                return x
        raise KeyError(name)

    def forward_from(self, name, h):
        names = self.stage_names
        for n in names[names.index(name) + 1:]:
            h = self.stages[n](h)
        return self.head(h)

    def forward_features(self, x):
        for m in self.stages.values():
            x = m(x)
        return x

    def forward(self, x):
        return self.head(self.forward_features(x))


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


def tiny_cnn(num_classes=5, dtype=torch.float64) -> Adapter:
    torch.manual_seed(0)
    stages = [
        ("block1", nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(2))),
        ("block2", nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6),
                                 nn.ReLU(inplace=True))),
        ("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())),
    ]
    m = Adapter(stages, nn.Linear(6, num_classes))
    _randomize_bn(m)
    return m.to(dtype).eval()


def tiny_resnet(num_classes=4, dtype=torch.float64) -> Adapter:
    """A two-block ResNet with BatchNorm, in-place ReLUs, residual '+=' and a strided
    1×1 downsample (torchvision's BasicBlock)."""
    torch.manual_seed(1)
    down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    stages = [
        ("stem", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                               nn.ReLU(inplace=True))),
        ("layer1", BasicBlock(4, 4)),
        ("layer2", BasicBlock(4, 8, stride=2, downsample=down)),
        ("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())),
    ]
    m = Adapter(stages, nn.Linear(8, num_classes))
    _randomize_bn(m, 1)
    return m.to(dtype).eval()


def naive_loop(model, params, loss, x, T=1.0, target=None):
    """Reference: one sample at a time, plain autograd (the reference code's way)."""
    sel = select_params(model, params)
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        out = model(x[i:i + 1])
        t = None if target is None else target[i:i + 1]
        L.loss_value(loss, out, T, t).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1).clone() for p in sel.values()]))
    model.zero_grad()
    return torch.stack(rows)


MODELS = {
    "cnn": (tiny_cnn, (1, 8, 8), ["block2"]),
    "resnet": (tiny_resnet, (3, 8, 8), ["layer2"]),
}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("params", ["last", "last_weight", "block", "all"])
@pytest.mark.parametrize("strategy", ["closed_form", "vmap", "hooks", "loop"])
def test_engine_matches_naive_loop(arch, params, strategy):
    build, shape, block = MODELS[arch]
    model = build()
    spec = block if params == "block" else params
    if strategy == "closed_form" and params not in ("last", "last_weight"):
        with pytest.raises(ConfigError, match="closed_form"):
            GradientEngine(model, params=spec, strategy=strategy)
        return
    x = torch.randn(7, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for loss in ("energy", "kl_uniform", "ce_pred"):
        ref = naive_loop(model, spec, loss, x, T=2.0)
        eng = GradientEngine(model, params=spec, loss=loss, temperature=2.0, strategy=strategy,
                             chunk_size=3)
        got = eng.batch(x)
        assert eng.strategy_used == strategy
        assert got.shape == (7, eng.num_params) == ref.shape
        assert _rel(got, ref) < 1e-10, (loss, _rel(got, ref))
    # BatchNorm stays in eval mode: running statistics untouched
    assert not model.training


def test_fp32_tolerance_all_params_resnet():
    model = tiny_resnet(dtype=torch.float32)
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = naive_loop(tiny_resnet(dtype=torch.float64), "all", "energy", x.double()).float()
    for strategy in ("vmap", "hooks", "loop"):
        got = GradientEngine(model, params="all", strategy=strategy, chunk_size=2).batch(x)
        assert _rel(got, ref) < 1e-5


def test_param_layout_and_selection():
    model = tiny_cnn()
    assert list(select_params(model, "last")) == ["head.weight", "head.bias"]
    assert list(select_params(model, "last_weight")) == ["head.weight"]
    blk = select_params(model, ["block1"])
    assert list(blk) == ["stages.block1.0.weight", "stages.block1.0.bias",
                         "stages.block1.1.weight", "stages.block1.1.bias"]
    assert select_params(model, {"blocks": ["block1"]}).keys() == blk.keys()
    eng = GradientEngine(model, params="all")
    assert eng.num_params == sum(p.numel() for p in model.parameters())
    assert eng.param_names == [n for n, _ in model.named_parameters()]
    assert eng.param_shapes[-2] == tuple(model.head.weight.shape)
    with pytest.raises(ConfigError, match="nosuch"):
        select_params(model, ["nosuch"])
    with pytest.raises(ConfigError, match="strategy"):
        GradientEngine(model, strategy="magic")
    with pytest.raises(ConfigError, match="loss"):
        GradientEngine(model, loss="hinge")
    with pytest.raises(ConfigError, match="CUDA"):
        GradientEngine(model, precision="bf16")


def test_auto_strategy_rule():
    model = tiny_cnn()
    assert GradientEngine(model, params="last").strategy_used == "closed_form"
    assert GradientEngine(model, params="last_weight").strategy_used == "closed_form"
    # on CPU: small selections use layer hooks when every layer has a rule, else vmap;
    # a plain nn.Module without forward_features gets no closed form
    assert GradientEngine(model, params="all").strategy_used == "hooks"
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).double()
    assert GradientEngine(plain, params="last").strategy_used == "hooks"
    ln = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    assert GradientEngine(ln, params="all").strategy_used == "vmap"


def test_losses_and_logit_gradients():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    T = 1.7
    p = torch.softmax(f / T, 1)
    # energy: E = −T logsumexp(f/T)
    assert torch.allclose(L.loss_value("energy", f, T), -T * torch.logsumexp(f / T, 1))
    # KL(u‖p) = Σ u log(u/p)
    kl = (0.2 * (torch.log(torch.tensor(0.2, dtype=f.dtype)) - torch.log(p))).sum(1)
    assert torch.allclose(L.loss_value("kl_uniform", f, T), kl)
    assert torch.allclose(L.loss_value("ce_pred", f, T), -torch.log(p.max(1).values))
    t = torch.tensor([[0, 1], [2, 2], [4, 0], [1, 1], [3, 2], [0, 0]])
    ce2 = -(torch.log(p.gather(1, t)).mean(1))
    assert torch.allclose(L.loss_value("ce_label", f, T, t), ce2)
    for name, target in [("energy", None), ("kl_uniform", None), ("ce_pred", None),
                         ("ce_label", t), ("ce_pred_dist", None)]:
        auto = torch.autograd.grad(L.loss_value(name, f, T, target).sum(), f)[0]
        closed = L.logit_grad(name, f.detach(), T, target)
        assert torch.allclose(auto, closed, atol=1e-14), name
    # ∇ E_{Y~p}[log p_Y] with p held constant is identically zero
    assert float(L.logit_grad("ce_pred_dist", f.detach(), T).abs().max()) == 0.0
    assert math.isclose(float(L.loss_value("kl_uniform", torch.zeros(1, 5)).item()), 0.0, abs_tol=1e-7)


def test_ce_label_targets_match_naive():
    model = tiny_resnet()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 3, 1, 1, 2])
    ref = naive_loop(model, "all", "ce_label", x, target=y)
    for strategy in ("vmap", "hooks", "loop"):
        got = GradientEngine(model, params="all", loss="ce_label", strategy=strategy,
                             chunk_size=2).batch(x, target=y)
        assert _rel(got, ref) < 1e-10
    with pytest.raises(ConfigError, match="target"):
        GradientEngine(model, params="all", loss="ce_label").batch(x)


def test_iter_chunks_streams_rows_in_order():
    model = tiny_cnn()
    x = torch.randn(10, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    eng = GradientEngine(model, params="all", strategy="vmap", chunk_size=3)
    full = eng.batch(x)
    batches = [(x[:6], torch.zeros(6), torch.arange(100, 106)),
               (x[6:], torch.zeros(4), torch.arange(106, 110))]
    chunks = list(eng.iter_chunks(batches))
    assert [c[1].shape[0] for c in chunks] == [3, 3, 3, 1]
    assert torch.equal(torch.cat([c[0] for c in chunks]), torch.arange(100, 110))
    assert torch.allclose(torch.cat([c[1] for c in chunks]), full)
    # bare tensors get consecutive row numbers
    rows = torch.cat([r for r, _ in eng.iter_chunks([x[:4], x[4:]])])
    assert torch.equal(rows, torch.arange(10))


def test_return_logits_and_empty_batch():
    model = tiny_cnn()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    for strategy in ("closed_form", "vmap", "hooks", "loop"):
        eng = GradientEngine(model, params="last", strategy=strategy)
        g, logits = eng.batch(x, return_logits=True)
        assert torch.allclose(logits, model(x).detach(), atol=1e-12)
    assert eng.batch(x[:0]).shape == (0, eng.num_params)


def test_non_finite_gradient_names_sample_and_parameter():
    model = tiny_cnn()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    x[3, 0, 2, 2] = float("nan")
    for strategy in ("closed_form", "vmap", "hooks", "loop"):
        eng = GradientEngine(model, params="last" if strategy == "closed_form" else "all",
                             strategy=strategy, chunk_size=2)
        with pytest.raises(NumericalError, match="sample 3"):
            eng.batch(x)
    with pytest.raises(NumericalError, match="sample 53"):
        list(GradientEngine(model, params="all", chunk_size=2).iter_chunks([(x, None, torch.arange(50, 55))]))


def test_hooks_reject_unsupported_layers():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    with pytest.raises(ConfigError, match="LayerNorm"):
        GradientEngine(model, params="all", strategy="hooks")
    # the other strategies handle it
    x = torch.randn(3, 4, dtype=torch.float64)
    ref = naive_loop(model, "all", "energy", x)
    assert _rel(GradientEngine(model, params="all", strategy="vmap").batch(x), ref) < 1e-10


def test_memory_is_bounded_by_chunk():
    """The per-chunk work never sees more than chunk_size samples."""
    model = tiny_cnn()
    seen = []
    handle = model.stages["block1"].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        GradientEngine(model, params="all", strategy="hooks", chunk_size=4).batch(
            torch.randn(10, 1, 8, 8, dtype=torch.float64))
    finally:
        handle.remove()
    assert max(seen) == 4
