"""The Python API (gradspace.api): the README's example as written, and its pieces checked
against independent computations."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

import gradspace as gs
from conftest import REPO
from gradspace.errors import ConfigError, DataError, StoreError


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README's 'From Python' section has one Python example"
    return blocks[0]


def sine(A, B) -> float:
    qa, _ = np.linalg.qr(np.asarray(A, np.float64))
    qb, _ = np.linalg.qr(np.asarray(B, np.float64))
    return float(np.linalg.norm(qa - qb @ (qb.T @ qa), 2))


@pytest.mark.slow
def test_readme_example_runs_as_written(tiny_workdir, tmp_path, monkeypatch, capsys):
    """The example, unchanged, with results/demo standing for a finished tiny run."""
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "demo").symlink_to(tiny_workdir / "results" / "tiny")
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "readme_example"}
    exec(compile(readme_example(), "README.md (From Python)", "exec"), ns)
    out = capsys.readouterr().out
    assert "energy: AUROC" in out and "grad_knn on PCA: AUROC" in out

    P = sum(p.numel() for p in ns["model"].parameters())
    assert tuple(ns["G"].shape) == (8, P)
    pca = ns["pca"]
    assert pca.k == 8 and pca.info["converged"] and pca.info["max_residual"] <= 1e-2
    B = pca.basis()
    assert B.shape == (P, 8)
    np.testing.assert_allclose(B.T @ B, np.eye(8), atol=1e-5)
    assert ns["z_train"].shape == (512, 8) and ns["z_ood"].shape == (128, 8)
    # images without a band are far from the trained classes' gradients
    assert ns["m"]["auroc"] > 0.95
    assert ns["ag"].k == 2  # 3 classes, centred means: rank C - 1
    assert len(ns["metrics"]) > 0
    assert ns["emb"]["features"].shape[0] == len(ns["s_id"]) == len(ns["emb"]["labels"])
    V = ns["V"]
    np.testing.assert_allclose(V.T @ V, np.eye(V.shape[1]), atol=1e-4)


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 3))


def small_data(n=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def normalized_gradients(model, x, sub):
    g = gs.per_sample_gradients(model, x).double().numpy()
    return (g - sub.stats.mean) * sub.stats.scale


def test_pca_subspace_is_the_top_eigenspace_of_the_normalized_gradients():
    model, (x, y) = small_model(), small_data()
    sub = gs.fit_subspace(model, (x, y), kind="pca", k=3, oversample=6, tol=1e-5, method="persample")
    G = normalized_gradients(model, x, sub)
    w, E = np.linalg.eigh(G.T @ G)
    assert w[-3] / w[-10] > 2  # a separated top-3
    assert sine(sub.basis(), E[:, -3:]) < 1e-3
    exact = gs.fit_subspace(model, (x, y), kind="pca", k=3, solver="exact")
    assert sine(exact.basis(), E[:, -3:]) < 1e-5
    # projections are V^T G_i
    np.testing.assert_allclose(sub.project(model, x[:10]), G[:10] @ sub.basis(), rtol=1e-3, atol=1e-4)


def test_ag_subspace_spans_the_centred_class_means():
    model, (x, y) = small_model(), small_data()
    sub = gs.fit_subspace(model, (x, y), kind="ag")
    G = normalized_gradients(model, x, sub)
    means = np.stack([G[y.numpy() == c].mean(0) for c in range(3)], 1)
    n_c = np.bincount(y.numpy(), minlength=3).astype(float)
    centred = means - np.outer(means @ n_c, n_c) / (n_c @ n_c)
    U, s, _ = np.linalg.svd(centred, full_matrices=False)
    assert sub.k == 2 and sine(sub.basis(), U[:, :2]) < 1e-5
    assert sub.info["counts"] == n_c.astype(int).tolist()


def test_loader_and_tensors_give_the_same_subspace():
    model, (x, y) = small_model(), small_data()
    a = gs.fit_subspace(model, (x, y), k=3, oversample=6, tol=1e-4, batch_size=32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    b = gs.fit_subspace(model, loader, k=3, oversample=6, tol=1e-4)
    np.testing.assert_allclose(a.basis(), b.basis(), atol=1e-5)


def test_detectors_fit_on_arrays_and_score_higher_for_id():
    rng = np.random.default_rng(0)
    tr = rng.normal(size=(300, 8))
    ood = rng.normal(size=(100, 8)) * 4
    det = gs.detector("mahalanobis").fit({"features": tr, "labels": np.zeros(300, int)})
    assert isinstance(det, gs.Detector)
    m = gs.ood_metrics(det.score({"features": rng.normal(size=(100, 8))}),
                       det.score({"features": ood}))
    assert m["auroc"] > 0.9
    assert "grad_knn" in gs.list_detectors() and "energy" in gs.list_detectors()
    with pytest.raises(ConfigError, match="unknown hyperparameter"):
        gs.detector("knn", kk=3)


def test_package_exports_the_api_lazily():
    """gradspace's lazy names (gradspace._API, kept so that jobs never import the API) are
    exactly gradspace.api.__all__, and a job's import of gradspace does not load it."""
    import subprocess

    import gradspace.api

    assert sorted(gs._API) == sorted(gradspace.api.__all__)
    out = subprocess.run([sys.executable, "-c", "import sys, gradspace.cli; "
                          "print('gradspace.api' in sys.modules)"], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_bad_data_gets_a_gradspace_error():
    model, (x, y) = small_model(), small_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    with pytest.raises(ConfigError, match="one-shot iterator"):
        gs.fit_subspace(model, iter(loader), k=3)
    with pytest.raises(DataError, match="labels are needed"):
        gs.fit_subspace(model, x, kind="ag")
    with pytest.raises(DataError, match="batch 0 has inputs of shape"):
        gs.fit_subspace(model, [torch.zeros(5)], k=3)
    with pytest.raises(DataError, match="96 inputs but 10 labels"):
        gs.fit_subspace(model, (x, y[:10]), k=3)
    with pytest.raises(StoreError, match="no such run directory"):
        gs.open_run("no/such/run")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
