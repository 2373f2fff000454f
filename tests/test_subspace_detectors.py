"""Detectors on reduced gradients (low-dimensional gradient paper §3.3) on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradspace.detectors.base import FitContext, build_detector, get_detector, logsumexp, softmax
from gradspace.detectors.gradient import ensemble_scores, head_bn, head_fc, train_head
from gradspace.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def blobs(n=300, K=12, C=3, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % C
    centers = rng.standard_normal((C, K)) * 3
    return (centers[y] + rng.standard_normal((n, K)) + shift).astype(np.float32), y


def test_registered_as_gradient_detectors():
    for name in ("grad_msp", "grad_energy", "grad_react", "grad_bats", "grad_mahalanobis", "grad_knn"):
        cls = get_detector(name)
        assert cls.embedding == "gradient" and cls.requires == ("reduced", "labels")
        assert cls.score_requires == ("reduced",) and cls.needs_fit
    with pytest.raises(ConfigError, match="unknown hyperparameter"):
        build_detector("grad_react", {"q": 1})


def test_head_is_seeded_and_learns():
    X, y = blobs()
    a = train_head(X, y, 3, lr=0.01, batch_size=64, epochs=3, seed=5)
    b = train_head(X, y, 3, lr=0.01, batch_size=64, epochs=3, seed=5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    acc = (head_fc(a, head_bn(a, X)).argmax(1) == y).mean()
    assert acc > 0.95


def test_msp_and_energy_formulas_share_the_head():
    X, y = blobs()
    ctx = FitContext(num_classes=3, seed=1)
    msp = build_detector("grad_msp", {"batch_size": 64})
    en = build_detector("grad_energy", {"batch_size": 64, "temperature": 2.0})
    msp.fit({"reduced": X, "labels": y}, ctx)
    en.fit({"reduced": X, "labels": y}, ctx)
    for k in ("fc_weight", "bn_mean"):
        np.testing.assert_array_equal(msp.state[k], en.state[k])
    Xt, _ = blobs(20, seed=3)
    logits = head_fc(msp.state, head_bn(msp.state, Xt))
    np.testing.assert_allclose(msp.score({"reduced": Xt}), softmax(logits).max(1))
    np.testing.assert_allclose(en.score({"reduced": Xt}), 2.0 * logsumexp(logits / 2.0))
    # BN in eval mode: (g − running mean)/sqrt(running var + eps)·γ + β
    st = msp.state
    z = (Xt[:1] - st["bn_mean"]) / np.sqrt(st["bn_var"] + 1e-5) * st["bn_weight"] + st["bn_bias"]
    np.testing.assert_allclose(head_bn(st, Xt[:1]), z)


def test_react_and_bats_clip_only_the_last_d_dims():
    X, y = blobs(K=10)
    ctx = FitContext(num_classes=3, seed=0)
    react = build_detector("grad_react", {"d": 4, "percentile": 70, "batch_size": 64})
    react.fit({"reduced": X, "labels": y}, ctx)
    st = react.state
    z_train = head_bn(st, X)
    assert st["threshold"] == pytest.approx(np.percentile(z_train[:, -4:], 70))
    Xt = X[:5].copy()
    Xt[:, -1] += 100.0   # extreme values in the last dims are clipped ...
    z = head_bn(st, Xt)
    zc = z.copy()
    zc[:, -4:] = np.minimum(zc[:, -4:], st["threshold"])
    np.testing.assert_allclose(react.score({"reduced": Xt}), logsumexp(head_fc(st, zc)))
    assert np.array_equal(zc[:, :6], z[:, :6])          # ... the first K − d are not
    bats = build_detector("grad_bats", {"d": 4, "lam": 0.1, "batch_size": 64})
    bats.fit({"reduced": X, "labels": y}, ctx)
    st = bats.state
    z = head_bn(st, Xt)
    lo = st["bn_bias"][-4:] - 0.1 * np.abs(st["bn_weight"][-4:])
    hi = st["bn_bias"][-4:] + 0.1 * np.abs(st["bn_weight"][-4:])
    z[:, -4:] = np.clip(z[:, -4:], lo, hi)
    np.testing.assert_allclose(bats.score({"reduced": Xt}), logsumexp(head_fc(st, z)))


def test_mahalanobis_formula():
    X, y = blobs(K=5)
    det = build_detector("grad_mahalanobis")
    det.fit({"reduced": X, "labels": y}, FitContext())
    mus = np.stack([X[y == c].mean(0) for c in range(3)]).astype(np.float64)
    R = X - mus[y]
    P = np.linalg.inv(R.T.astype(np.float64) @ R / len(X))
    q = np.random.default_rng(2).standard_normal((7, 5))
    ref = np.max([-np.einsum("ij,jk,ik->i", q - m, P, q - m) for m in mus], axis=0)
    np.testing.assert_allclose(det.score({"reduced": q}), ref, rtol=1e-6)


def test_knn_formula_and_state_roundtrip():
    X, y = blobs(n=60, K=6)
    det = build_detector("grad_knn", {"k": 5})
    det.fit({"reduced": X, "labels": y}, FitContext())
    q = np.random.default_rng(4).standard_normal((9, 6)).astype(np.float32)
    bank = X / np.linalg.norm(X, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    d = np.sort(np.linalg.norm(qn[:, None] - bank[None], axis=2), axis=1)[:, 4]
    np.testing.assert_allclose(det.score({"reduced": q}), -d, rtol=1e-4)
    other = build_detector("grad_knn", {"k": 5})
    other.load_state_dict(det.state_dict())
    np.testing.assert_array_equal(other.score({"reduced": q}), det.score({"reduced": q}))
    with pytest.raises(DataError, match="negative"):
        det.fit({"reduced": X, "labels": -np.ones(60, int)}, FitContext())


def test_ensemble():
    f, b = np.array([1.0, 2.0]), np.array([0.5, -1.0])
    np.testing.assert_allclose(ensemble_scores(f, b, 2.0), [2.0, 0.0])
    with pytest.raises(DataError):
        ensemble_scores(f, b[:1])


# -- parse-time d check (issue 11) ------------------------------------------------------------

def test_reduced_dims_pca_k_and_ag_rank_bound():
    from gradspace.detectors.gradient import reduced_dims

    assert reduced_dims(["pca", "ag"], 32, 10) == {"pca": 32, "ag": 9}
    assert reduced_dims(["ag"], 32, 10, centred=False) == {"ag": 10}
    assert reduced_dims(["ag"], 32, 10, orthonormalize=False) == {"ag": 10}
    with pytest.raises(ConfigError, match="nosuch"):
        reduced_dims(["nosuch"], 8, 10)


def test_check_dims_d_above_k_is_an_error_naming_detector_d_and_k():
    from gradspace.detectors.gradient import check_dims

    dets = {"react": {"method": "grad_react", "d": 40}, "knn": {"method": "grad_knn", "k": 10}}
    with pytest.raises(ConfigError, match=r"subspace\.detectors\.react \(grad_react\): d = 40.*PCA.*"
                                          r"subspace\.k = 32"):
        check_dims(dets, ["pca", "ag"], 32, 10)
    # the default d (50) counts when d is not given
    with pytest.raises(ConfigError, match=r"bats \(grad_bats\): d = 50"):
        check_dims({"bats": {"method": "grad_bats"}}, ["pca"], 20, 10)
    with pytest.raises(ConfigError, match="d must be >= 1"):
        check_dims({"react": {"method": "grad_react", "d": 0}}, ["pca"], 20, 10)
    assert check_dims(dets, ["ag"], 32, 100) == []  # no PCA: k does not bound d
    assert check_dims({"react": {"method": "grad_react", "d": 32}}, ["pca"], 32, 10) == []


def test_check_dims_d_above_ag_dimension_is_capped_with_a_warning():
    from gradspace.detectors.gradient import check_dims

    dets = {"react": {"method": "grad_react", "d": 16}, "bats": {"method": "grad_bats", "d": 9},
            "msp": {"method": "grad_msp"}}
    warnings = check_dims(dets, ["pca", "ag"], 32, 10)  # the demo: k 32, 10 classes
    assert len(warnings) == 1
    assert "subspace.detectors.react" in warnings[0] and "d = 16" in warnings[0]
    assert "AG" in warnings[0] and "9" in warnings[0] and "clips all 9" in warnings[0]
    assert len(check_dims(dets, ["ag"], 32, 10, centred=False)) == 1  # 16 > C = 10
    assert check_dims(dets, ["ag"], 32, 17) == []


def test_capped_d_clips_every_dimension_as_the_check_says():
    """The run-time behaviour the AG warning describes: d > K clips all K dimensions."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 5))
    y = np.arange(200) % 3
    a = build_detector("grad_react", {"d": 50, "epochs": 1})
    b = build_detector("grad_react", {"d": 5, "epochs": 1})
    for det in (a, b):
        det.fit({"reduced": X, "labels": y}, FitContext(num_classes=3, seed=0))
    np.testing.assert_array_equal(a.score({"reduced": X}), b.score({"reduced": X}))


# -- dims: the subspace dimension K as a hyperparameter (issue 12) -----------------------------

@pytest.mark.parametrize("method,hp", [("grad_knn", {"k": 5}), ("grad_mahalanobis", {}),
                                       ("grad_energy", {"epochs": 2}), ("grad_react", {"d": 3, "epochs": 2})])
def test_dims_equals_fitting_on_the_first_dims_columns(method, hp, tmp_path):
    """dims = K' is the detector on the top-K' PCA directions: the same scores as fitting on
    the first K' columns, after a save/load roundtrip, and refused above the dimension."""
    from gradspace.detectors.jobs import load_fitted, save_fitted

    X, y = blobs(n=90, K=8)
    q = np.random.default_rng(5).standard_normal((11, 8)).astype(np.float32)
    ctx = FitContext(num_classes=3, seed=0, extra={"space": "pca"})
    cut = build_detector(method, {**hp, "dims": 4})
    cut.fit({"reduced": X, "labels": y}, ctx)
    ref = build_detector(method, hp)
    ref.fit({"reduced": X[:, :4], "labels": y}, FitContext(num_classes=3, seed=0))
    np.testing.assert_allclose(cut.score({"reduced": q}), ref.score({"reduced": q[:, :4]}), rtol=1e-6)
    assert not np.allclose(cut.score({"reduced": q}), build_detector(method, hp).fit(
        {"reduced": X, "labels": y}, FitContext(num_classes=3, seed=0)).score({"reduced": q}))
    save_fitted(tmp_path / "d.npz", cut, "x", "pca", {"reduced": "reduced"})
    back, _ = load_fitted(tmp_path / "d.npz")
    np.testing.assert_array_equal(back.score({"reduced": q}), cut.score({"reduced": q}))
    with pytest.raises(DataError, match="fitted on 4"):
        back.score({"reduced": q[:, :3]})
    with pytest.raises(ConfigError, match=r"dims = 9 must be in \[1, 8\]"):
        build_detector(method, {**hp, "dims": 9}).fit({"reduced": X, "labels": y}, ctx)


def test_dims_is_ignored_on_ag_and_checked_at_parse_time():
    from gradspace.detectors.gradient import check_dims

    X, y = blobs(n=90, K=2)
    q = np.random.default_rng(6).standard_normal((7, 2))
    ag = FitContext(extra={"space": "ag"})
    a = build_detector("grad_knn", {"k": 3, "dims": 1}).fit({"reduced": X, "labels": y}, ag)
    b = build_detector("grad_knn", {"k": 3}).fit({"reduced": X, "labels": y}, ag)
    np.testing.assert_array_equal(a.score({"reduced": q}), b.score({"reduced": q}))
    dets = {"knn": {"method": "grad_knn", "dims": 16}}
    assert check_dims(dets, ["pca"], 32, 10) == []
    warnings = check_dims(dets, ["pca", "ag"], 32, 10)
    assert len(warnings) == 1 and "knn (grad_knn): dims applies to the PCA space only" in warnings[0]
    with pytest.raises(ConfigError, match=r"knn \(grad_knn\): dims = 40 exceeds .*subspace\.k = 32"):
        check_dims({"knn": {"method": "grad_knn", "dims": 40}}, ["pca"], 32, 10)
    with pytest.raises(ConfigError, match="dims must be >= 1"):
        check_dims({"knn": {"method": "grad_knn", "dims": 0}}, ["pca"], 32, 10)
