"""`gradspace fit` / `gradspace score` on tiny synthetic embedding stores."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from gradspace.cli import main
from gradspace.detectors import jobs
from gradspace.detectors.base import FitContext, build_detector
from gradspace.errors import ConfigError
from gradspace.store import ShardWriter

C, D = 3, 5


def _write_store(path, logits, feats, labels, index):
    n = len(labels)
    with ShardWriter(path, n_rows=n, attrs={"dataset": "toy"}) as w:
        w.put("logits", logits.astype(np.float32))
        w.put("features", feats.astype(np.float32))
        w.put("labels", labels.astype(np.int64))
        w.put("preds", logits.argmax(1).astype(np.int64))
        w.put("index", index.astype(np.int64))
        w.put("reduced", (feats[:, :3] * 2).astype(np.float32))
    return str(path)


def _dataset(tmp_path, name, n, seed, ood=False):
    """Two shards with interleaved manifest positions (shard 0: even rows, shard 1: odd)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    centers = np.arange(C * D).reshape(C, D) / 3.0
    feats = centers[labels] + rng.normal(size=(n, D)) * (3.0 if ood else 0.5)
    W = np.random.default_rng(99).normal(size=(C, D))
    logits = feats @ W.T
    labels = np.full(n, -1) if ood else labels
    stores = [_write_store(tmp_path / name / f"shard-{k}.zarr", logits[k::2], feats[k::2],
                           labels[k::2], np.arange(n)[k::2]) for k in range(2)]
    return stores, {"logits": logits, "features": feats, "labels": labels}, W


@pytest.fixture
def data(tmp_path):
    train, train_arr, W = _dataset(tmp_path, "id_train", 60, 0)
    test, test_arr, _ = _dataset(tmp_path, "ood", 21, 1, ood=True)
    return {"train": train, "train_arr": train_arr, "test": test, "test_arr": test_arr, "W": W}


def _as_f32(arrays):
    return {k: (v.astype(np.float32).astype(np.float64) if v.dtype.kind == "f" else v)
            for k, v in arrays.items()}


@pytest.mark.parametrize("method,params", [
    ("msp", {}), ("maxlogit", {}), ("energy", {"temperature": 2.0}),
    ("mahalanobis", {}), ("knn", {"k": 3}),
])
def test_fit_score_cli_matches_in_memory(tmp_path, data, method, params):
    fitted = tmp_path / "detectors" / "feature" / f"{method}.npz"
    rc = main(["fit", "--method", method, "--name", f"{method}_x", "--params", json.dumps(params),
               "--space", "feature", "--train", *data["train"], "--seed", "0", "--rows", "7",
               "--out", str(fitted)])
    assert rc == 0 and fitted.exists()
    meta = jobs.read_fitted_meta(fitted)
    assert meta["method"] == method and meta["name"] == f"{method}_x" and meta["embedding"] == "feature"
    out = tmp_path / "scores" / "feature" / method / "ood.npy"
    rc = main(["score", "--fitted", str(fitted), "--shards", *data["test"], "--rows", "4", "--out", str(out)])
    assert rc == 0
    scores = np.load(out)
    assert scores.dtype == np.float64 and scores.shape == (21,)
    # reference: the same detector on the whole arrays in manifest order
    ref = build_detector(method, params)
    if ref.needs_fit:
        ref.fit(_as_f32(data["train_arr"]), FitContext())
    np.testing.assert_allclose(scores, ref.score(_as_f32(data["test_arr"])), rtol=1e-6, atol=1e-5)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ood.npy"]


def test_react_cli_uses_model_head(tmp_path, data, monkeypatch):
    W = data["W"]
    b = np.array([0.1, -0.2, 0.3])
    seen = {}

    def fake_context(model_path, seed, data_dir=None, compute=None):
        seen["model"] = model_path
        return FitContext(head_weight=W, head_bias=b, num_classes=C, seed=seed)

    monkeypatch.setattr(jobs, "_model_context", fake_context)
    fitted = tmp_path / "react.npz"
    assert main(["fit", "--method", "react", "--params", '{"percentile": 80}', "--train", *data["train"],
                 "--model", "model.pt", "--out", str(fitted)]) == 0
    assert seen["model"] == "model.pt"
    out = tmp_path / "react.npy"
    assert main(["score", "--fitted", str(fitted), "--shards", *data["test"], "--out", str(out)]) == 0
    train = data["train_arr"]["features"].astype(np.float32).astype(np.float64)
    c = np.percentile(train, 80)
    feats = data["test_arr"]["features"].astype(np.float32).astype(np.float64)
    expected = np.log(np.exp(np.minimum(feats, c) @ W.T + b).sum(1))
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-9)


def test_map_reads_another_array(tmp_path, data):
    fitted = tmp_path / "knn_reduced.npz"
    assert main(["fit", "--method", "knn", "--params", '{"k": 2}', "--space", "pca", "--map",
                 "features=reduced", "--train", *data["train"], "--out", str(fitted)]) == 0
    meta = jobs.read_fitted_meta(fitted)
    assert meta["arrays"] == {"features": "reduced"}
    assert meta["space"] == "pca" and meta["embedding"] == "gradient"
    out = tmp_path / "s.npy"
    assert main(["score", "--fitted", str(fitted), "--shards", *data["test"], "--out", str(out)]) == 0
    ref = build_detector("knn", {"k": 2})
    ref.fit({"features": data["train_arr"]["features"][:, :3] * 2}, FitContext())
    np.testing.assert_allclose(np.load(out), ref.score({"features": data["test_arr"]["features"][:, :3] * 2}),
                               atol=1e-5)


def test_map_of_unread_array_is_an_error(tmp_path, data, capsys):
    rc = main(["fit", "--method", "msp", "--map", "features=reduced", "--out", str(tmp_path / "m.npz")])
    assert rc == 2 and "reads no array named ['features']" in capsys.readouterr().err


def test_unknown_method_exits_2(tmp_path, data, capsys):
    out = tmp_path / "x.npz"
    rc = main(["fit", "--method", "nope", "--train", *data["train"], "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown detector 'nope'" in err and "mahalanobis" in err
    assert not out.exists()


def test_unknown_hparam_exits_2(tmp_path, data, capsys):
    rc = main(["fit", "--method", "knn", "--params", '{"kk": 3}', "--train", *data["train"],
               "--out", str(tmp_path / "x.npz")])
    assert rc == 2 and "'kk'" in capsys.readouterr().err


def test_nan_in_store_names_store_and_row(tmp_path, data, capsys):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(6, D))
    feats[4, 2] = np.nan
    bad = _write_store(tmp_path / "bad" / "shard-0.zarr", rng.normal(size=(6, C)), feats,
                       np.zeros(6), np.arange(6))
    fitted = tmp_path / "knn.npz"
    assert main(["fit", "--method", "knn", "--params", '{"k": 2}', "--train", *data["train"],
                 "--out", str(fitted)]) == 0
    out = tmp_path / "bad.npy"
    rc = main(["score", "--fitted", str(fitted), "--shards", bad, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "'features'" in err and "shard-0.zarr" in err and "row 4" in err
    assert not out.exists()


def test_missing_shard_is_an_error(tmp_path, data, capsys):
    fitted = tmp_path / "msp.npz"
    assert main(["fit", "--method", "msp", "--out", str(fitted)]) == 0
    rc = main(["score", "--fitted", str(fitted), "--shards", data["test"][1],
               "--out", str(tmp_path / "s.npy")])
    assert rc == 2 and "every shard" in capsys.readouterr().err


def test_fit_without_train_stores_is_an_error(tmp_path, capsys):
    rc = main(["fit", "--method", "knn", "--out", str(tmp_path / "k.npz")])
    assert rc == 2 and "--train" in capsys.readouterr().err


def test_model_pass_detector_needs_model_and_data(tmp_path, capsys):
    fitted = tmp_path / "odin.npz"
    assert main(["fit", "--method", "odin", "--out", str(fitted)]) == 0
    rc = main(["score", "--fitted", str(fitted), "--out", str(tmp_path / "o.npy")])
    assert rc == 2 and "--model and --data-dir" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown key"):
        jobs.compute_params({"batch_size": 8, "bogus": 1})


class _LinearModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(x.flatten(1))

    def typical_set_bn(self):
        return None


def test_model_pass_scores_in_manifest_order(tmp_path, monkeypatch):
    """ODIN through `gradspace score` with stand-ins for the loader and model modules:
    batches arrive out of manifest order and are placed by their rows."""
    x_all = torch.randn(10, 1, 2, 2)
    model = _LinearModel()
    calls = {}

    def iter_batches(data_dir, shard=None, batch_size=256, shuffle=False, seed=0, num_workers=0,
                     mean=(), std=(), device=None):
        calls.update(batch_size=batch_size, mean=mean, std=std)
        order = torch.tensor([7, 2, 9, 0, 4, 1, 8, 3, 6, 5])
        for start in range(0, 10, batch_size):
            rows = order[start:start + batch_size]
            yield x_all[rows], torch.full((len(rows),), -1), rows

    loader = types.ModuleType("gradspace.data.loader")
    loader.iter_batches = iter_batches
    loader.num_samples = lambda data_dir, shard=None: 10
    models = types.ModuleType("gradspace.models")
    models.load_model = lambda path, device: (model, {"num_classes": 3})
    monkeypatch.setitem(sys.modules, "gradspace.data.loader", loader)
    monkeypatch.setitem(sys.modules, "gradspace.models", models)

    fitted = tmp_path / "odin.npz"
    assert main(["fit", "--method", "odin", "--params", '{"temperature": 2.0, "epsilon": 0.0}',
                 "--out", str(fitted)]) == 0
    out = tmp_path / "odin.npy"
    params = {"batch_size": 3, "device": "cpu", "num_workers": 0, "mean": [0.5], "std": [0.25]}
    assert main(["score", "--fitted", str(fitted), "--model", "m.pt", "--data-dir", "d",
                 "--params", json.dumps(params), "--out", str(out)]) == 0
    assert calls == {"batch_size": 3, "mean": [0.5], "std": [0.25]}
    with torch.no_grad():
        expected = torch.softmax(model(x_all).double() / 2.0, dim=1).amax(1).numpy()
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-12)

    # BATS on a model without a BatchNorm before the features: a clear config error
    rc = main(["fit", "--method", "bats", "--model", "m.pt", "--out", str(tmp_path / "b.npz")])
    assert rc == 2 and not (tmp_path / "b.npz").exists()
