"""Extraction: one forward pass -> logits/features/labels/preds/index store."""

from __future__ import annotations

import argparse
import sys
import types

import numpy as np
import pytest
import torch

import gradspace.data  # noqa: F401 - the real package first: _fake_loader replaces only its loader module
from gradspace.errors import ConfigError, NumericalError
from gradspace.extract import extract_arrays, extract_shard
from gradspace.models import build_model, save_model
from gradspace.store import open_store


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batches(x, y, batch_size, offset=0):
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size], torch.arange(i, i + len(x[i:i + batch_size])) + offset


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = build_model("small_cnn", 5, 1, widths=(4, 8))
    m.train()
    m(torch.randn(16, 1, 12, 12))  # non-trivial BN running statistics
    return m.eval()


def test_extract_arrays_matches_direct_forward(model):
    x = torch.randn(23, 1, 12, 12)
    y = torch.randint(-1, 5, (23,))
    out = extract_arrays(model, _batches(x, y, 7, offset=100), torch.device("cpu"))
    assert set(out) == {"logits", "features", "labels", "preds", "index"}
    assert out["logits"].shape == (23, 5) and out["logits"].dtype == np.float32
    assert out["features"].shape == (23, 8) and out["features"].dtype == np.float32
    for k in ("labels", "preds", "index"):
        assert out[k].shape == (23,) and out[k].dtype == np.int64
    with torch.no_grad():
        np.testing.assert_allclose(out["logits"], model(x).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["features"], model.forward_features(x).numpy(), rtol=1e-5,
                                   atol=1e-6)
    np.testing.assert_array_equal(out["preds"], out["logits"].argmax(1))
    np.testing.assert_array_equal(out["labels"], y.numpy())
    np.testing.assert_array_equal(out["index"], np.arange(100, 123))


def test_extract_arrays_nan_names_row(model):
    x = torch.randn(10, 1, 12, 12)
    x[6, 0, 3, 3] = float("nan")
    with pytest.raises(NumericalError, match="row 46"):
        extract_arrays(model, _batches(x, torch.zeros(10, dtype=torch.long), 4, offset=40),
                       torch.device("cpu"))


def _fake_loader(monkeypatch, data_dir, x, y, shards, name="toyset"):
    """Stand-in for gradspace.data.loader (contiguous shards, rows = manifest positions)."""
    mod = types.ModuleType("gradspace.data.loader")
    calls = []

    def _rows(shard):
        rows = torch.arange(len(x))
        return rows if shard is None else rows[(rows * shards) // len(x) == shard]

    def iter_batches(d, shard=None, batch_size=256, shuffle=False, seed=0, num_workers=0,
                     mean=None, std=None, device=None, image_size=None, channels=None):
        assert str(d) == str(data_dir)
        calls.append({"batch_size": batch_size, "mean": mean, "std": std, "shuffle": shuffle})
        m = torch.tensor(mean or [0.0]).reshape(1, -1, 1, 1)
        s = torch.tensor(std or [1.0]).reshape(1, -1, 1, 1)
        rows = _rows(shard)
        for i in range(0, len(rows), batch_size):
            r = rows[i:i + batch_size]
            yield (x[r] - m) / s, y[r], r

    mod.iter_batches = iter_batches
    mod.num_samples = lambda d, shard=None: len(_rows(shard))
    mod.read_info = lambda d: {"name": name, "role": "ood", "n": len(x), "shards": shards,
                               "channels": x.shape[1], "num_classes": None}
    monkeypatch.setitem(sys.modules, "gradspace.data.loader", mod)
    (data_dir / "manifest.csv").parent.mkdir(parents=True, exist_ok=True)
    ids = "\n".join(f"{i},img{i:03d},-1,{(i * shards) // len(x)}" for i in range(len(x)))
    (data_dir / "manifest.csv").write_text("index,id,label,shard\n" + ids + "\n")
    return calls


def test_extract_shard_store_round_trip(model, tmp_path, monkeypatch):
    x = torch.randn(30, 1, 12, 12)
    y = torch.full((30,), -1)
    data_dir = tmp_path / "data" / "toyset"
    calls = _fake_loader(monkeypatch, data_dir, x, y, shards=3)
    mpath = tmp_path / "model.pt"
    save_model(mpath, model, {})
    out = tmp_path / "emb" / "shard-1.zarr"
    attrs = extract_shard(mpath, data_dir, 1, out, {"batch_size": 4, "mean": [0.5], "std": [2.0]},
                          progress=False)
    assert calls[-1] == {"batch_size": 4, "mean": [0.5], "std": [2.0], "shuffle": False}
    g = open_store(out, require=["logits", "features", "labels", "preds", "index"])
    assert g["logits"].shape == (10, 5) and g["features"].shape == (10, 8)
    assert g["logits"].dtype == np.float32 and g["index"].dtype == np.int64
    np.testing.assert_array_equal(g["index"][:], np.arange(10, 20))
    np.testing.assert_array_equal(g["labels"][:], -np.ones(10))
    with torch.no_grad():
        xs = (x[10:20] - 0.5) / 2.0
        np.testing.assert_allclose(g["logits"][:], model(xs).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g["features"][:], model.forward_features(xs).numpy(), rtol=1e-5,
                                   atol=1e-6)
    np.testing.assert_array_equal(g["preds"][:], g["logits"][:].argmax(1))
    a = dict(g.attrs)
    assert a["dataset"] == "toyset" and a["shard"] == 1 and a["n"] == 10
    assert a["model"] == str(mpath) and a["precision"] == "fp32"
    assert a["timing"]["seconds"] > 0 and a["timing"]["samples_per_s"] > 0
    assert attrs["n"] == 10
    assert sorted(p.name for p in out.parent.iterdir()) == ["shard-1.zarr"]


def test_extract_shard_nan_leaves_no_store(tmp_path, monkeypatch):
    torch.manual_seed(0)
    m = build_model("small_cnn", 3, 1, widths=(4,)).eval()
    x = torch.randn(12, 1, 8, 8)
    x[9] = float("inf")  # row 9 is in shard 1 (rows 6..11)
    data_dir = tmp_path / "toyset"
    _fake_loader(monkeypatch, data_dir, x, torch.zeros(12, dtype=torch.long), shards=2)
    mpath = tmp_path / "model.pt"
    save_model(mpath, m, {})
    out = tmp_path / "emb" / "shard-1.zarr"
    with pytest.raises(NumericalError) as err:
        extract_shard(mpath, data_dir, 1, out, {"batch_size": 2}, progress=False)
    msg = str(err.value)
    assert "toyset" in msg and "shard 1" in msg and "row 9" in msg and "img009" in msg
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary store left behind
    # the clean shard still works
    extract_shard(mpath, data_dir, 0, tmp_path / "emb" / "shard-0.zarr", {"batch_size": 4},
                  progress=False)
    assert open_store(tmp_path / "emb" / "shard-0.zarr")["logits"].shape == (6, 3)


def test_extract_params_validation_and_cli(model, tmp_path, monkeypatch):
    from gradspace.cli.extract import register

    data_dir = tmp_path / "toyset"
    _fake_loader(monkeypatch, data_dir, torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 1)
    mpath = tmp_path / "model.pt"
    save_model(mpath, model, {})
    with pytest.raises(ConfigError, match="unknown key"):
        extract_shard(mpath, data_dir, 0, tmp_path / "a.zarr", {"batchsize": 4})
    with pytest.raises(ConfigError, match="precision"):
        extract_shard(mpath, data_dir, 0, tmp_path / "a.zarr", {"precision": "fp8"})
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "b.zarr"
    args = parser.parse_args(["extract", "--model", str(mpath), "--data-dir", str(data_dir),
                              "--shard", "0", "--params", '{"batch_size": 3, "precision": "bf16"}',
                              "--out", str(out), "--no-progress"])
    args.func(args)  # bf16 on CPU falls back to fp32
    g = open_store(out)
    assert g["logits"].shape == (4, 5)
    assert dict(g.attrs)["precision"] == "fp32" and dict(g.attrs)["precision_requested"] == "bf16"
