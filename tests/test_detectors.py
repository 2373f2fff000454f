"""Unit tests of the output/feature detectors: each formula against a direct
computation on small hand-made arrays, persistence, and error handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp as sp_logsumexp
from scipy.special import softmax as sp_softmax
from torch import nn

from gradspace.detectors import jobs
from gradspace.detectors.base import FitContext, build_detector, get_detector, known_detectors
from gradspace.detectors.vim import default_dim
from gradspace.errors import ConfigError, DataError, NumericalError

ARRAY_DETECTORS = ["msp", "maxlogit", "energy", "react", "mahalanobis", "knn", "vim"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def toy():
    """Three Gaussian classes in 6-d features, a random linear head, logits = head(h)."""
    rng = np.random.default_rng(0)
    C, D, n = 3, 6, 40
    centers = rng.normal(0, 3, size=(C, D))
    labels = np.repeat(np.arange(C), n)
    feats = centers[labels] + rng.normal(size=(C * n, D))
    W = rng.normal(size=(C, D))
    b = rng.normal(size=C)
    logits = feats @ W.T + b
    test = centers[rng.integers(0, C, 25)] + rng.normal(size=(25, D)) * 1.5
    return {
        "train": {"features": feats, "logits": logits, "labels": labels},
        "test": {"features": test, "logits": test @ W.T + b},
        "ctx": FitContext(head_weight=W, head_bias=b, num_classes=C, seed=0),
        "W": W, "b": b,
    }


# -- output detectors ---------------------------------------------------------------------
def test_msp_hand_computed():
    logits = np.array([[0.0, np.log(3.0)], [2.0, 2.0], [10.0, 0.0]])
    expected = [0.75, 0.5, 1.0 / (1.0 + np.exp(-10.0))]
    np.testing.assert_allclose(build_detector("msp").score({"logits": logits}), expected, rtol=1e-12)


def test_maxlogit():
    logits = np.array([[0.5, -1.0, 3.0], [-2.0, -3.0, -1.5]])
    np.testing.assert_array_equal(build_detector("maxlogit").score({"logits": logits}), [3.0, -1.5])


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_energy_matches_scipy(T):
    logits = np.random.default_rng(1).normal(0, 5, size=(7, 4))
    got = build_detector("energy", {"temperature": T}).score({"logits": logits})
    np.testing.assert_allclose(got, T * sp_logsumexp(logits / T, axis=1), rtol=1e-12)


def test_energy_is_stable_for_large_logits():
    got = build_detector("energy").score({"logits": np.array([[1000.0, 1000.0]])})
    np.testing.assert_allclose(got, [1000.0 + np.log(2.0)])


def test_energy_rejects_nonpositive_temperature():
    with pytest.raises(ConfigError, match="temperature"):
        build_detector("energy", {"temperature": 0})


# -- ReAct --------------------------------------------------------------------------------
def test_react_threshold_is_percentile_and_score_is_clipped_energy(toy):
    det = build_detector("react", {"percentile": 90})
    det.fit(toy["train"], toy["ctx"])
    c = np.percentile(toy["train"]["features"], 90)
    assert det.state["threshold"] == pytest.approx(c, rel=1e-12)
    assert det.state["exact"]
    h = toy["test"]["features"]
    expected = sp_logsumexp(np.minimum(h, c) @ toy["W"].T + toy["b"], axis=1)
    np.testing.assert_allclose(det.score(toy["test"]), expected, rtol=1e-12)
    # clipping changes some samples, so this is not plain energy
    assert (h > c).any()


def test_react_chunked_and_sampled_fit(toy):
    feats = toy["train"]["features"]
    chunks = [{"features": feats[i:i + 17]} for i in range(0, len(feats), 17)]
    exact = build_detector("react")
    exact.fit_chunks(chunks, toy["ctx"])
    assert exact.state["threshold"] == pytest.approx(np.percentile(feats, 90), rel=1e-12)
    # a sample of 300 of the 720 values: deterministic given the seed, close to exact
    a, b = build_detector("react", {"sample_size": 300}), build_detector("react", {"sample_size": 300})
    a.fit_chunks(chunks, toy["ctx"])
    b.fit_chunks(chunks, toy["ctx"])
    assert not a.state["exact"]
    assert a.state["threshold"] == b.state["threshold"]
    lo, hi = np.percentile(feats, [85, 95])
    assert lo < a.state["threshold"] < hi


def test_react_needs_head(toy):
    with pytest.raises(ConfigError, match="--model"):
        build_detector("react").fit(toy["train"], FitContext())


# -- Mahalanobis --------------------------------------------------------------------------
def test_mahalanobis_matches_direct_numpy(toy):
    from sklearn.covariance import EmpiricalCovariance

    det = build_detector("mahalanobis")
    det.fit(toy["train"], toy["ctx"])
    X, y = toy["train"]["features"], toy["train"]["labels"]
    means = np.stack([X[y == c].mean(0) for c in range(3)])
    centred = X - means[y]
    cov = centred.T @ centred / len(X)
    prec = np.linalg.inv(cov)
    np.testing.assert_allclose(prec, EmpiricalCovariance().fit(centred).precision_, rtol=1e-8)
    z = toy["test"]["features"]
    diff = z[:, None, :] - means[None]
    d = np.einsum("ncd,de,nce->nc", diff, prec, diff)
    np.testing.assert_allclose(det.score(toy["test"]), -d.min(1), rtol=1e-9, atol=1e-9)


def test_mahalanobis_streaming_equals_one_shot(toy):
    tr = toy["train"]
    perm = np.random.default_rng(3).permutation(len(tr["labels"]))  # classes spread over chunks
    chunks = [{k: tr[k][perm[i:i + 11]] for k in ("features", "labels")} for i in range(0, len(perm), 11)]
    a, b = build_detector("mahalanobis"), build_detector("mahalanobis")
    a.fit(tr, toy["ctx"])
    b.fit_chunks(chunks, toy["ctx"])
    np.testing.assert_allclose(a.score(toy["test"]), b.score(toy["test"]), rtol=1e-9)


def test_mahalanobis_rejects_ood_labels(toy):
    tr = dict(toy["train"], labels=np.where(np.arange(120) == 5, -1, toy["train"]["labels"]))
    with pytest.raises(DataError, match="negative"):
        build_detector("mahalanobis").fit(tr, toy["ctx"])


# -- KNN ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5])
def test_knn_matches_brute_force(toy, k):
    det = build_detector("knn", {"k": k})
    det.fit(toy["train"], toy["ctx"])
    bank = toy["train"]["features"] / np.linalg.norm(toy["train"]["features"], axis=1, keepdims=True)
    q = toy["test"]["features"] / np.linalg.norm(toy["test"]["features"], axis=1, keepdims=True)
    dist = np.linalg.norm(q[:, None, :] - bank[None], axis=2)
    expected = -np.sort(dist, axis=1)[:, k - 1]
    np.testing.assert_allclose(det.score(toy["test"]), expected, atol=1e-5)


def test_knn_k_larger_than_bank(toy):
    with pytest.raises(ConfigError, match="exceeds"):
        build_detector("knn", {"k": 500}).fit(toy["train"], toy["ctx"])
    with pytest.raises(ConfigError, match="positive integer"):
        build_detector("knn", {"k": 0})


# -- ViM ----------------------------------------------------------------------------------
def _vim_reference(train_h, train_logits, test_h, test_logits, W, b, dim):
    from sklearn.covariance import EmpiricalCovariance

    u = -np.linalg.pinv(W) @ b
    ec = EmpiricalCovariance(assume_centered=True).fit(train_h - u)
    eigval, eigvec = np.linalg.eig(ec.covariance_)
    NS = np.ascontiguousarray(eigvec.real[:, np.argsort(eigval.real)[::-1][dim:]])
    alpha = train_logits.max(1).mean() / np.linalg.norm((train_h - u) @ NS, axis=1).mean()
    vlogit = np.linalg.norm((test_h - u) @ NS, axis=1) * alpha
    return sp_logsumexp(test_logits, axis=1) - vlogit, alpha


def test_vim_matches_reference(toy):
    det = build_detector("vim", {"dim": 2})
    tr = toy["train"]
    chunks = [{k: tr[k][i:i + 32] for k in ("features", "logits")} for i in range(0, 120, 32)]
    det.fit_chunks(iter(chunks), toy["ctx"])  # one-shot iterator: read twice internally
    expected, alpha = _vim_reference(tr["features"], tr["logits"], toy["test"]["features"],
                                     toy["test"]["logits"], toy["W"], toy["b"], 2)
    assert det.state["alpha"] == pytest.approx(alpha, rel=1e-9)
    np.testing.assert_allclose(det.score(toy["test"]), expected, rtol=1e-9, atol=1e-9)


def test_vim_default_dim_rule():
    assert default_dim(2048) == 1000
    assert default_dim(768) == 512
    assert default_dim(512) == 256
    assert default_dim(6) == 3
    det = build_detector("vim")
    assert det.hparams["dim"] is None


def test_vim_dim_must_be_below_feature_dim(toy):
    with pytest.raises(ConfigError, match="below the feature dimension"):
        build_detector("vim", {"dim": 6}).fit(toy["train"], toy["ctx"])


# -- model-pass detectors -----------------------------------------------------------------
class TinyNet(nn.Module):
    """Same API as gradspace.models: forward, forward_features, head, typical_set_bn."""

    def __init__(self, with_bn=True, channels=2, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if with_bn else nn.Identity()
        self.head = nn.Linear(4, classes)
        if with_bn:
            with torch.no_grad():
                self.bn.running_mean.normal_()
                self.bn.running_var.uniform_(0.5, 2.0)
                self.bn.weight.copy_(torch.tensor([1.0, -0.5, 2.0, 0.3]))
                self.bn.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.5]))
        self.eval()

    def pre_act(self, x):
        return self.bn(self.conv(x))

    def forward_features(self, x):
        return torch.relu(self.pre_act(x)).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.forward_features(x))

    def typical_set_bn(self):
        return self.bn if isinstance(self.bn, nn.BatchNorm2d) else None


class LinearNet(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(1)
        self.head = nn.Linear(2 * 4 * 4, 5).to(dtype)

    def forward(self, x):
        return self.head(x.flatten(1))


def test_odin_eps_zero_is_temperature_scaled_msp():
    model = TinyNet()
    x = torch.randn(6, 2, 5, 5)
    det = build_detector("odin", {"temperature": 10.0, "epsilon": 0.0})
    got = det.score_batch(model, x).numpy()
    with torch.no_grad():
        logits = model(x).double().numpy()
    np.testing.assert_allclose(got, sp_softmax(logits / 10.0, axis=1).max(1), rtol=1e-10)


@pytest.mark.parametrize("T,dtype", [(1.0, torch.float32), (1000.0, torch.float64)])
def test_odin_perturbation_increases_max_softmax(T, dtype):
    model = LinearNet(dtype)
    x = torch.randn(8, 2, 4, 4, dtype=dtype)
    plain = build_detector("odin", {"temperature": T, "epsilon": 0.0}).score_batch(model, x)
    pert = build_detector("odin", {"temperature": T, "epsilon": 0.01}).score_batch(model, x)
    assert (pert > plain).all()


def test_odin_step_is_divided_by_std():
    model = LinearNet(torch.float64)
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    det = build_detector("odin", {"temperature": 5.0, "epsilon": 0.02})
    det.set_input_normalization(mean=[0.5, 0.5], std=[0.5, 0.25])
    got = det.score_batch(model, x)
    # manual reference: x~ = x - eps/std * sign(grad_x CE(f(x)/T, yhat))
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    loss = nn.functional.cross_entropy(logits / 5.0, logits.argmax(1), reduction="sum")
    (g,) = torch.autograd.grad(loss, xg)
    scale = torch.tensor([0.02 / 0.5, 0.02 / 0.25], dtype=torch.float64).view(1, 2, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(model(x - scale * torch.sign(g)) / 5.0, dim=1).amax(1)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ConfigError, match="channels"):
        det.set_input_normalization(mean=[0, 0, 0], std=[1, 1, 1])
        det.score_batch(model, x)


def test_bats_clamps_bn_output_to_typical_set():
    model = TinyNet()
    det = build_detector("bats", {"lam": 0.5})
    det.fit({}, FitContext(extra={"model": model}))
    gamma = model.bn.weight.detach().double().numpy()
    np.testing.assert_array_equal(det.state["gamma"], gamma)
    x = torch.randn(5, 2, 6, 6) * 3
    got = det.score_batch(model, x)
    with torch.no_grad():
        pre = model.pre_act(x)
        lo = (model.bn.bias - 0.5 * model.bn.weight.abs()).view(1, -1, 1, 1)
        hi = (model.bn.bias + 0.5 * model.bn.weight.abs()).view(1, -1, 1, 1)
        assert ((pre < lo) | (pre > hi)).any()  # the clamp is active on this batch
        clamped = torch.minimum(torch.maximum(pre, lo), hi)
        logits = model.head(torch.relu(clamped).mean(dim=(2, 3)))
        expected = torch.logsumexp(logits.double(), dim=1)
        torch.testing.assert_close(got, expected)
        # the hook is removed afterwards: the plain forward pass is unchanged
        plain = model(x)
        assert not torch.allclose(plain, logits)
        torch.testing.assert_close(plain, model.head(torch.relu(pre).mean(dim=(2, 3))))
    assert not model.bn._forward_hooks


def test_bats_not_applicable_without_bn():
    with pytest.raises(ConfigError, match="not applicable.*remove 'bats'"):
        build_detector("bats").fit({}, FitContext(extra={"model": TinyNet(with_bn=False)}))


# -- registry, persistence, errors --------------------------------------------------------
def test_registry_lists_all_nine():
    assert set(known_detectors()) >= {"msp", "maxlogit", "energy", "odin", "react", "bats",
                                      "mahalanobis", "knn", "vim"}


def test_unknown_detector_lists_known():
    with pytest.raises(ConfigError, match="unknown detector 'nope'.*knn.*msp"):
        get_detector("nope")


@pytest.mark.parametrize("method", ARRAY_DETECTORS + ["odin", "bats"])
def test_unknown_hyperparameter(method):
    with pytest.raises(ConfigError, match="unknown hyperparameter.*'bogus'"):
        build_detector(method, {"bogus": 1})


@pytest.mark.parametrize("method", ARRAY_DETECTORS)
def test_state_round_trip(tmp_path, toy, method):
    params = {"dim": 3} if method == "vim" else ({"k": 4} if method == "knn" else {})
    det = build_detector(method, params)
    det.fit(toy["train"], toy["ctx"])
    path = tmp_path / f"{method}.npz"
    jobs.save_fitted(path, det, f"{method}-x", "feature", {"features": "features"})
    loaded, meta = jobs.load_fitted(path)
    assert meta["method"] == method and meta["name"] == f"{method}-x"
    assert loaded.hparams == det.hparams
    np.testing.assert_array_equal(loaded.score(toy["test"]), det.score(toy["test"]))
    assert [p.name for p in tmp_path.iterdir()] == [f"{method}.npz"]  # no temp leftovers


def test_bats_state_round_trip(tmp_path):
    model = TinyNet()
    det = build_detector("bats")
    det.fit({}, FitContext(extra={"model": model}))
    jobs.save_fitted(tmp_path / "b.npz", det, "bats", "feature", {})
    loaded, _ = jobs.load_fitted(tmp_path / "b.npz")
    x = torch.randn(3, 2, 5, 5)
    torch.testing.assert_close(loaded.score_batch(model, x), det.score_batch(model, x))


@pytest.mark.parametrize("method", ARRAY_DETECTORS)
def test_nan_input_names_the_array(toy, method):
    det = build_detector(method, {"k": 3} if method == "knn" else {})
    bad_name = "logits" if method in ("msp", "maxlogit", "energy") else "features"
    if det.needs_fit:
        bad_train = {k: v.copy() for k, v in toy["train"].items()}
        bad_train[bad_name][4, 1] = np.nan
        with pytest.raises(NumericalError, match=bad_name):
            det.fit(bad_train, toy["ctx"])
        det.fit(toy["train"], toy["ctx"])
    bad_test = {k: v.copy() for k, v in toy["test"].items()}
    bad_test[bad_name][2, 0] = np.inf
    with pytest.raises(NumericalError, match=rf"{bad_name}.*\[2, 0\]"):
        det.score(bad_test)
