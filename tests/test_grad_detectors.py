"""Gradient-norm detectors: exact identities (GradNorm eq. 9, ExGrad's decomposition,
GROOD's closed form) and every closed form against brute-force autograd; the model-pass
scorer behind ``gradspace grad-scores``."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from gradspace.detectors.base import FitContext, build_detector, known_detectors
from gradspace.errors import ConfigError
from gradspace.grads import lastlayer

C, D, N, T = 5, 7, 12, 1.5


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(C, D))
    b = rng.normal(size=C)
    h = np.abs(rng.normal(size=(N, D))) * (rng.random((N, D)) > 0.2)  # post-ReLU-like
    logits = h @ W.T + b
    return {"W": W, "b": b, "features": h, "logits": logits}


def autograd_last_layer(W, b, h, loss_fn, bias=False):
    """Per-sample gradient of loss_fn(logits) w.r.t. (W[, b]) by plain autograd, flattened."""
    Wt = torch.tensor(W, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    rows = []
    for i in range(len(h)):
        f = Wt @ torch.tensor(h[i]) + bt
        gW, gb = torch.autograd.grad(loss_fn(f), (Wt, bt))
        rows.append(torch.cat([gW.reshape(-1), gb]) if bias else gW.reshape(-1))
    return torch.stack(rows).numpy()


def log_p(f, y):
    return torch.log_softmax(f / T, dim=0)[y]


def kl_uniform(f):
    return -(torch.log_softmax(f / T, dim=0)).mean() - np.log(C)


P_GRID = [0.3, 0.5, 0.8, 1, 2, 3, 4, 5, 6, "inf"]


@pytest.mark.parametrize("p", P_GRID)
@pytest.mark.parametrize("bias", [False, True])
def test_gradnorm_is_norm_of_autograd_gradient(data, p, bias):
    g = autograd_last_layer(data["W"], data["b"], data["features"], kl_uniform, bias)
    det = build_detector("gradnorm", {"p": p, "temperature": T, "bias": bias})
    got = det.score(data)
    ref = lastlayer.lp_norm(g, lastlayer.check_p(p), axis=1)
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_gradnorm_eq9_decomposition(data):
    """S = (1/(C·T))·U·V, U = ‖h‖₁, V = Σ_c |1 − C·softmax(f/T)_c| (Huang et al. eq. 9)."""
    prob = lastlayer.softmax_t(data["logits"], T)
    U = np.abs(data["features"]).sum(1)
    V = np.abs(1 - C * prob).sum(1)
    got = build_detector("gradnorm", {"temperature": T}).score(data)
    np.testing.assert_allclose(got, U * V / (C * T), rtol=1e-12)
    # Igoe eq. 4: ‖h‖₁·TV = (T/2)·GradNorm
    tv = build_detector("hnorm_v", {"p": 1, "v_term": "tv", "temperature": T}).score(data)
    np.testing.assert_allclose(tv, T / 2 * got, rtol=1e-12)


def test_gradnorm_onehot_target(data):
    def ce_pred(f):
        return -log_p(f, int(f.argmax()))
    g = autograd_last_layer(data["W"], data["b"], data["features"], ce_pred)
    got = build_detector("gradnorm", {"target": "onehot", "temperature": T}).score(data)
    np.testing.assert_allclose(got, -np.abs(g).sum(1), rtol=1e-10)


def test_exgrad_decomposition(data):
    """ExGrad = E_{Y~p}‖∇_W log p^(Y)‖₁ = (2/T)·‖h‖₁·Σ_k p_k(1 − p_k) (Igoe et al. eq. 5)."""
    prob = lastlayer.softmax_t(data["logits"], T)
    brute = np.zeros(N)
    for y in range(C):
        g = autograd_last_layer(data["W"], data["b"], data["features"], lambda f, y=y: log_p(f, y))
        brute += prob[:, y] * np.abs(g).sum(1)
    # the detector returns -ExGrad: ExGrad is larger for OOD inputs, detectors score ID-ness
    got = -build_detector("exgrad", {"temperature": T}).score(data)
    closed = 2 / T * np.abs(data["features"]).sum(1) * (prob * (1 - prob)).sum(1)
    np.testing.assert_allclose(got, closed, rtol=1e-12)
    np.testing.assert_allclose(got, brute, rtol=1e-10)


@pytest.mark.parametrize("order,dist,norm,weight", [
    c for c in itertools.product(["exp_norm", "norm_exp"], ["pred", "uniform"], ["l1", "l2sq"],
                                 ["none", "logp_over_p"])
    if not (c[0] == "norm_exp" and c[3] != "none")])
@pytest.mark.parametrize("bias", [False, True])
def test_igoe_table1_variants_against_autograd(data, order, dist, norm, weight, bias):
    prob = lastlayer.softmax_t(data["logits"], T)
    q = prob if dist == "pred" else np.full_like(prob, 1 / C)
    grads = [autograd_last_layer(data["W"], data["b"], data["features"], lambda f, y=y: log_p(f, y), bias)
             for y in range(C)]

    def nrm(g):
        return np.abs(g).sum(1) if norm == "l1" else (g * g).sum(1)
    if order == "exp_norm":
        w = q * (np.log(prob) / prob if weight == "logp_over_p" else 1.0)
        ref = sum(w[:, y] * nrm(grads[y]) for y in range(C))
    else:
        ref = nrm(sum(q[:, y:y + 1] * grads[y] for y in range(C)))
    det = build_detector("igoe_grad", {"order": order, "dist": dist, "norm": norm, "weight": weight,
                                       "temperature": T, "bias": bias})
    got = det.score(data) * (-1.0 if dist == "pred" else 1.0)  # p-label variants are negated
    if order == "norm_exp" and dist == "pred":
        # Σ_y p_y ∇log p_y = ∇Σ_y p_y = 0: the exact score vanishes
        assert np.abs(got).max() == 0.0 and np.abs(ref).max() < 1e-12
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_igoe_monte_carlo_is_deterministic_and_chunk_invariant(data):
    det = build_detector("igoe_grad", {"order": "norm_exp", "dist": "pred", "samples": 3, "seed": 7})
    full = det.score(data)
    parts = np.concatenate([det.score({k: v[i:i + 5] for k, v in data.items() if k in ("features", "logits")})
                            for i in range(0, N, 5)])
    np.testing.assert_array_equal(full, parts)
    assert np.all(-full > 0)  # a finite-sample estimate of a zero mean is not zero (negated: p labels)
    # against brute force with the same labels
    labels = lastlayer.sample_labels(lastlayer.softmax_t(data["logits"], 1.0), 3, 7,
                                     lastlayer.row_keys(data["logits"]))
    W, b, h = data["W"], data["b"], data["features"]
    Wt = torch.tensor(W, requires_grad=True)
    ref = []
    for i in range(N):
        f = Wt @ torch.tensor(h[i]) + torch.tensor(b)
        lp = torch.log_softmax(f, 0)
        g, = torch.autograd.grad(lp[torch.tensor(labels[i])].mean(), Wt)
        ref.append(float(g.abs().sum()))
    np.testing.assert_allclose(-full, ref, rtol=1e-10)
    other = build_detector("igoe_grad", {"order": "norm_exp", "dist": "pred", "samples": 3, "seed": 8})
    assert not np.array_equal(other.score(data), full)


@pytest.mark.parametrize("v", ["msp", "energy", "varsum", "tv", "none"])
@pytest.mark.parametrize("p", [None, 0, 0.1, 0.3, 1, 2, "inf"])
def test_hnorm_v_formulas(data, v, p):
    if p is None and v == "none":
        with pytest.raises(ConfigError):
            build_detector("hnorm_v", {"p": p, "v_term": v})
        return
    prob = lastlayer.softmax_t(data["logits"], T)
    V = {"msp": prob.max(1),
         "energy": T * np.log(np.exp(data["logits"] / T).sum(1)),
         "varsum": 1 - (prob * (1 - prob)).sum(1),
         "tv": 0.5 * np.abs(1 / C - prob).sum(1),
         "none": np.ones(N)}[v]
    h = data["features"]
    U = {None: 1.0, 0: (h != 0).sum(1), 0.1: (h ** 0.1).sum(1) ** 10, 0.3: (h ** 0.3).sum(1) ** (1 / 0.3),
         1: h.sum(1), 2: np.sqrt((h * h).sum(1)), "inf": h.max(1)}[p]
    got = build_detector("hnorm_v", {"p": p, "v_term": v, "temperature": T}).score(data)
    np.testing.assert_allclose(got, U * V, rtol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
def test_batchgrad_against_autograd(data, bias):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, C, size=N)
    labels[:C] = np.arange(C)
    det = build_detector("batchgrad", {"temperature": T, "bias": bias, "seed": 3})
    train = {**data, "labels": labels}
    det.fit_chunks([{k: v[:6] for k, v in train.items() if k != "W" and k != "b"},
                    {k: v[6:] for k, v in train.items() if k != "W" and k != "b"}], FitContext())
    # the same reference whatever the chunking
    det2 = build_detector("batchgrad", {"temperature": T, "bias": bias, "seed": 3})
    det2.fit({k: v for k, v in train.items() if k not in ("W", "b")}, FitContext())
    np.testing.assert_array_equal(det.state["reference"], det2.state["reference"])
    # which reference points: recover them and brute-force eq. 6
    keys = lastlayer._hash_uniform(3, np.arange(N), 1)[:, 0]
    ref_idx = [np.flatnonzero(labels == c)[np.argmin(keys[labels == c])] for c in range(C)]
    W, b, h = data["W"], data["b"], data["features"]
    Wt, bt = torch.tensor(W, requires_grad=True), torch.tensor(b, requires_grad=True)

    def grad_of(total):
        gW, gb = torch.autograd.grad(total, (Wt, bt), retain_graph=True)
        return torch.cat([gW.reshape(-1), gb]) if bias else gW.reshape(-1)
    ref_total = sum(log_p(Wt @ torch.tensor(h[i]) + bt, c) for c, i in enumerate(ref_idx))
    prob = lastlayer.softmax_t(data["logits"], T)
    brute = np.zeros(N)
    for n in range(N):
        for y in range(C):
            g = grad_of(log_p(Wt @ torch.tensor(h[n]) + bt, y) + ref_total)
            brute[n] += prob[n, y] * float(g.abs().sum())
    # Y ~ p as in ExGrad: larger for OOD, so the detector returns −S (higher = more ID)
    np.testing.assert_allclose(det.score(data), -brute, rtol=1e-10)


# -- GROOD -------------------------------------------------------------------------------------
def test_grood_closed_form_matches_autograd():
    from gradspace.detectors.grood import grood_gradients

    rng = np.random.default_rng(2)
    z = rng.normal(size=(9, D))
    protos = rng.normal(size=(C, D))
    p_ood = rng.normal(size=D)
    logits = rng.normal(size=(9, C))
    got = grood_gradients(z, protos, p_ood)
    po = torch.tensor(p_ood, requires_grad=True)
    for i in range(9):
        zi = torch.tensor(z[i])
        s = torch.cat([-(zi - torch.tensor(protos)).norm(dim=1), -(zi - po).norm().view(1)])
        y = int(np.argmax(logits[i]))
        loss = torch.nn.functional.cross_entropy(s.view(1, -1), torch.tensor([y]))
        g, = torch.autograd.grad(loss, po)
        np.testing.assert_allclose(got[i], g.numpy(), rtol=1e-10, atol=1e-14)


def _grood_train(seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(C, D)) * 4
    labels = np.repeat(np.arange(C), 8)
    feats = centers[labels] + rng.normal(size=(len(labels), D))
    W = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    logits = feats @ W.T
    return {"features": feats, "logits": logits, "labels": labels}


def test_grood_fit_score_mean_prototype():
    from gradspace.detectors.grood import grood_gradients

    train = _grood_train()
    det = build_detector("grood", {"ood_prototype": "mean"})
    det.fit(train, FitContext())
    protos = np.stack([train["features"][train["labels"] == c].mean(0) for c in range(C)])
    np.testing.assert_allclose(det.state["prototypes"], protos, rtol=1e-12)
    np.testing.assert_allclose(det.state["ood_prototype"], protos.mean(0), rtol=1e-12)
    correct = train["logits"].argmax(1) == train["labels"]
    assert det.state["bank"].shape == (int(correct.sum()), D)
    # a training sample in the bank is its own nearest neighbour
    s_train = det.score({k: train[k][correct] for k in ("features", "logits")})
    assert np.abs(s_train).max() < 1e-5
    # scoring = −distance to the nearest bank gradient (exact search)
    rng = np.random.default_rng(5)
    q = {"features": rng.normal(size=(6, D)) * 4, "logits": rng.normal(size=(6, C))}
    g = grood_gradients(q["features"], protos, protos.mean(0))
    bank = grood_gradients(train["features"][correct], protos, protos.mean(0))
    ref = -np.sqrt(((g[:, None, :] - bank[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(det.score(q), ref, rtol=1e-4, atol=1e-5)
    # round trip through the state dict
    det2 = build_detector("grood", {"ood_prototype": "mean"})
    det2.load_state_dict(det.state_dict())
    np.testing.assert_array_equal(det2.score(q), det.score(q))


class _TinyModel(nn.Module):
    """gradspace model API: two stages + linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.s1 = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU())
        self.s2 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                nn.Flatten())
        self.head = nn.Linear(4, 3)
        self.stage_names = ["s1", "s2"]

    def forward_until(self, name, x):
        return self.s1(x) if name == "s1" else self.s2(self.s1(x))

    def forward_from(self, name, h):
        return self.head(self.s2(h)) if name == "s1" else self.head(h)

    def forward_features(self, x):
        return self.s2(self.s1(x))

    def forward(self, x):
        return self.head(self.forward_features(x))


def test_grood_synthetic_prototype_is_mean_of_mixups():
    from gradspace.detectors.grood import synthetic_ood_prototype

    model = _TinyModel().double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 1, 6, 6, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, -1])
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    got = synthetic_ood_prototype(model, lambda: iter(batches), 3, None, 0.5)
    with torch.no_grad():
        e = model.s1(x)
        early = torch.stack([e[y == c].mean(0) for c in range(3)])
        second = model(x).topk(2, dim=1).indices[:, 1]
        mixed = 0.5 * e + 0.5 * early[second]
        ref = model.s2(mixed).mean(0).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_grood_noise_and_synthetic_via_fit_context():
    model = _TinyModel().eval()
    rng = np.random.default_rng(0)
    train = {"features": rng.normal(size=(30, 4)), "logits": rng.normal(size=(30, 3)),
             "labels": np.arange(30) % 3}
    train["logits"][np.arange(30), train["labels"]] += 5  # mostly correct
    det = build_detector("grood", {"ood_prototype": "noise", "noise_n": 20, "noise_keep": 0.25})
    ctx = FitContext(seed=0, extra={"model": model, "image_shape": (1, 6, 6),
                                    "compute": {"device": "cpu", "mean": [0.5], "std": [0.5]}})
    det.fit(train, ctx)
    assert det.state["ood_prototype"].shape == (4,)
    det_again = build_detector("grood", {"ood_prototype": "noise", "noise_n": 20, "noise_keep": 0.25})
    det_again.fit(train, ctx)
    np.testing.assert_array_equal(det.state["ood_prototype"], det_again.state["ood_prototype"])
    with pytest.raises(ConfigError, match="data_dir"):
        build_detector("grood", {}).fit(train, FitContext(extra={"model": model, "compute": {
            "device": "cpu", "mean": [0.5], "std": [0.5]}}))


def test_registry_and_bad_hparams():
    names = set(known_detectors())
    assert {"gradnorm", "exgrad", "igoe_grad", "hnorm_v", "batchgrad", "grood", "stored_grad_score"} <= names
    for method, bad in [("gradnorm", {"p": -1}), ("gradnorm", {"target": "x"}), ("gradnorm", {"q": 1}),
                        ("igoe_grad", {"order": "x"}), ("igoe_grad", {"order": "norm_exp",
                                                                      "weight": "logp_over_p"}),
                        ("igoe_grad", {"samples": 0}), ("hnorm_v", {"v_term": "entropy"}),
                        ("grood", {"k": 0}), ("grood", {"ood_prototype": "ood_data"}),
                        ("stored_grad_score", {})]:
        with pytest.raises(ConfigError):
            build_detector(method, bad)
    for name in ("gradnorm", "exgrad", "igoe_grad", "hnorm_v", "batchgrad", "grood"):
        cls = type(build_detector(name))
        assert cls.embedding == "gradient"
        assert set(getattr(cls, "score_requires", cls.requires)) <= {"logits", "features"}


def test_stored_grad_score_reads_named_array():
    det = build_detector("stored_grad_score", {"key": "gradnorm_all"})
    assert det.score_requires == ("gradnorm_all",) and det.requires == ()
    np.testing.assert_array_equal(det.score({"gradnorm_all": np.array([1.0, 2.0])}), [1.0, 2.0])


# -- model-pass scores (gradspace grad-scores) -----------------------------------------------------
def _scorer_model():
    from test_grads_engine import tiny_cnn  # same tests directory (pytest rootdir import)

    return tiny_cnn(num_classes=4)


def test_grad_scorer_last_layer_equals_closed_form_detectors():
    """With params='last_weight', the engine-based scores reproduce the closed forms."""
    from gradspace.grads.scoring import GradScorer, parse_params

    model = _scorer_model()
    x = torch.randn(9, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y_ref = torch.arange(4)
    x_ref = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scores = {"gn1": {"kind": "gradnorm", "p": 1}, "gn2": {"kind": "gradnorm", "p": 2},
              "gnoh": {"kind": "gradnorm", "target": "onehot"},
              "ex": {"kind": "igoe"}, "exu2": {"kind": "igoe", "dist": "uniform", "norm": "l2sq"},
              "exw": {"kind": "igoe", "norm": "l2sq", "weight": "logp_over_p"},
              "neu": {"kind": "igoe", "order": "norm_exp", "dist": "uniform"},
              "nep": {"kind": "igoe", "order": "norm_exp", "dist": "pred"},
              "bg": {"kind": "batchgrad"}}
    p = parse_params({"params": "last_weight", "mean": [0.0], "std": [1.0], "scores": scores,
                      "strategy": "vmap", "chunk_size": 4})
    out = GradScorer(model, p, (x_ref, y_ref))(x)
    with torch.no_grad():
        emb = {"features": model.forward_features(x).numpy(), "logits": model(x).numpy()}
        ref_emb = {"features": model.forward_features(x_ref).numpy(), "logits": model(x_ref).numpy()}
    np.testing.assert_allclose(out["gn1"], build_detector("gradnorm").score(emb), rtol=1e-10)
    np.testing.assert_allclose(out["gn2"], build_detector("gradnorm", {"p": 2}).score(emb), rtol=1e-10)
    np.testing.assert_allclose(out["gnoh"], build_detector("gradnorm", {"target": "onehot"}).score(emb),
                               rtol=1e-10)
    np.testing.assert_allclose(out["ex"], build_detector("exgrad").score(emb), rtol=1e-10)
    for key, hp in [("exu2", {"dist": "uniform", "norm": "l2sq"}),
                    ("exw", {"norm": "l2sq", "weight": "logp_over_p"}),
                    ("neu", {"order": "norm_exp", "dist": "uniform"})]:
        np.testing.assert_allclose(out[key], build_detector("igoe_grad", hp).score(emb), rtol=1e-10)
    assert np.abs(out["nep"]).max() < 1e-12
    B = lastlayer.batchgrad_reference(ref_emb["features"], ref_emb["logits"], np.arange(4))
    np.testing.assert_allclose(out["bg"], -lastlayer.batchgrad(emb["features"], emb["logits"], B),
                               rtol=1e-10)


def test_grad_scorer_all_params_matches_naive_loop():
    from gradspace.grads.scoring import GradScorer, parse_params
    from test_grads_engine import naive_loop

    model = _scorer_model()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    p = parse_params({"params": "all", "mean": [0.0], "std": [1.0], "strategy": "hooks",
                      "scores": {"gn": {"kind": "gradnorm", "p": 1}, "ex": {"kind": "igoe"}}})
    out = GradScorer(model, p)(x)
    g = naive_loop(model, "all", "kl_uniform", x).numpy()
    np.testing.assert_allclose(out["gn"], np.abs(g).sum(1), rtol=1e-10)
    with torch.no_grad():
        prob = torch.softmax(model(x), 1).numpy()
    ex = sum(prob[:, y] * np.abs(naive_loop(model, "all", "ce_label", x,
                                            target=torch.full((6,), y)).numpy()).sum(1) for y in range(4))
    np.testing.assert_allclose(out["ex"], -ex, rtol=1e-10)  # stored ID-oriented: -ExGrad


def test_grad_scores_params_validation():
    from gradspace.grads.scoring import parse_params

    with pytest.raises(ConfigError, match="mean"):
        parse_params({})
    base = {"mean": [0.0], "std": [1.0]}
    with pytest.raises(ConfigError, match="kind"):
        parse_params({**base, "scores": {"a": {"kind": "nope"}}})
    with pytest.raises(ConfigError, match="reserved"):
        parse_params({**base, "scores": {"index": {"kind": "gradnorm"}}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_params({**base, "scores": {"a": {"kind": "gradnorm", "norm": "l1"}}})
    p = parse_params(base)
    assert set(p["scores"]) == {"gradnorm_all", "exgrad_all"}
