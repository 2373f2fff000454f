"""Models: wrapper API, sources (torchvision cache, checkpoints), save/load, training, card."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from gradspace.errors import ConfigError, ModelError
from gradspace.models import (
    FeatureClassifier,
    build_model,
    check_num_classes,
    count_parameters,
    load_model,
    resolve_source,
    save_model,
    torchvision_weights_path,
    wrap_torchvision,
)
from gradspace.models.load import load_checkpoint_source, load_torchvision
from gradspace.models.train import TrainSettings, augment_affine, augment_cifar, lr_factor, train_model


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def _fake_resnet18_weights(torch_home):
    """A randomly initialized torchvision resnet18 saved where the cache would hold it."""
    import torchvision

    torch.manual_seed(123)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    path = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    return path, sd


def _check_api(model: FeatureClassifier, x: torch.Tensor, classes: int, dim: int, bn_path: str):
    model.eval()
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        assert logits.shape == (x.shape[0], classes)
        assert feats.shape == (x.shape[0], dim)
        assert isinstance(model.head, nn.Linear)
        assert (model.num_classes, model.feature_dim) == (classes, dim)
        torch.testing.assert_close(model.head(feats), logits)
        # the wrapper computes exactly what the native network computes
        torch.testing.assert_close(model.net(x), logits)
        for s in model.stage_names:
            torch.testing.assert_close(model.forward_from(s, model.forward_until(s, x)), logits)
    assert model.typical_set_bn() is model.net.get_submodule(bn_path)
    assert isinstance(model.typical_set_bn(), nn.BatchNorm2d)
    # every parameter belongs to exactly one stage or to the head
    owned = [n for s in model.stage_names for n in model.stage_parameters(s)]
    owned += list(model.head_parameters())
    assert sorted(owned) == sorted(n for n, _ in model.named_parameters())


def test_small_cnn_api_and_size():
    torch.manual_seed(0)
    m = build_model("small_cnn", 10, 1)
    assert count_parameters(m) == 103_466
    assert m.stage_names == ["block1", "block2", "block3", "block4", "pool"]
    _check_api(m, torch.randn(3, 1, 28, 28), 10, 128, "block4.1")
    # forward_until gives the block's activation map
    assert m.forward_until("block1", torch.randn(2, 1, 28, 28)).shape == (2, 32, 14, 14)


def test_small_cnn_global_pooling_options(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 1, 20, 20)
    for pool, reduce in (("max", lambda h: h.amax((2, 3))), ("avg", lambda h: h.mean((2, 3)))):
        m = build_model("small_cnn", 5, 1, widths=(4, 8), pool=pool).eval()
        h = m.forward_until("block2", x)
        assert torch.allclose(m.forward_features(x), reduce(h), atol=1e-6)
        assert torch.allclose(m(x), m.net(x), atol=1e-6)  # wrapper == native forward
        assert m.typical_set_bn_name() == "block2.1"
        save_model(tmp_path / f"{pool}.pt", m)
        loaded, _ = load_model(tmp_path / f"{pool}.pt")
        assert torch.allclose(loaded(x), m(x), atol=1e-6)
    assert build_model("small_cnn", 5, 1, pool="avg").arch_kwargs == {"pool": "avg"}
    assert build_model("small_cnn", 5, 1).arch_kwargs == {}  # max pooling is the default
    with pytest.raises(ModelError, match="pool 'sum'"):
        build_model("small_cnn", 5, 1, pool="sum")


def test_resnet18_cifar_api_and_size():
    torch.manual_seed(0)
    m = build_model("resnet18_cifar", 10, 3)
    assert count_parameters(m) == 11_173_962
    assert m.net.conv1.kernel_size == (3, 3) and isinstance(m.net.maxpool, nn.Identity)
    assert m.forward_until("layer1", torch.randn(1, 3, 32, 32)).shape == (1, 64, 32, 32)
    _check_api(m, torch.randn(2, 3, 32, 32), 10, 512, "layer4.1.bn2")


def test_torchvision_resnet18_from_cache(torch_home):
    path, sd = _fake_resnet18_weights(torch_home)
    assert torchvision_weights_path("resnet18") == path
    model, meta = resolve_source("torchvision:resnet18", {"num_classes": 1000, "in_channels": 3})
    assert meta["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert meta["weights_file"] == str(path)
    for k, v in sd.items():
        torch.testing.assert_close(model.net.state_dict()[k], v)
    _check_api(model, torch.randn(2, 3, 64, 64), 1000, 512, "layer4.1.bn2")


def test_missing_torchvision_weights_names_the_path(torch_home):
    expected = torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    with pytest.raises(ModelError) as err:
        load_torchvision("resnet50")
    assert str(expected) in str(err.value)
    assert "IMAGENET1K_V1" in str(err.value)
    with pytest.raises(ModelError, match="unknown weights 'NOPE'"):
        load_torchvision("resnet50", "NOPE")


def test_vit_like_model_has_no_typical_set_bn():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16,
                            mlp_dim=32, num_classes=5)
    m = wrap_torchvision(net, "vit_tiny").eval()
    assert m.typical_set_bn() is None
    assert m.stage_names == ["embed", "block0", "block1", "norm", "pool"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), net(x))
        for s in m.stage_names:
            torch.testing.assert_close(m.forward_from(s, m.forward_until(s, x)), m(x))
    assert set(m.stage_parameters("embed")) == {"net.conv_proj.weight", "net.conv_proj.bias",
                                                  "net.class_token", "net.encoder.pos_embedding"}


def test_unknown_arch_and_channels():
    with pytest.raises(ModelError, match="unknown architecture 'lenet'"):
        build_model("lenet", 10, 1)
    with pytest.raises(ModelError, match="3 input channels"):
        build_model("torchvision:resnet18", 10, 1)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    m = build_model("small_cnn", 4, 3, widths=(8, 16))
    # make BN buffers non-trivial so they are part of what is compared
    m.train()
    m(torch.randn(8, 3, 16, 16))
    out = tmp_path / "model" / "model.pt"
    save_model(out, m, {"source": "train", "note": [1, 2]})
    assert [p.name for p in out.parent.iterdir()] == ["model.pt"]  # no temp files left
    loaded, meta = load_model(out, torch.device("cpu"))
    assert not loaded.training
    assert meta["arch"] == "small_cnn" and meta["num_classes"] == 4 and meta["note"] == [1, 2]
    assert meta["feature_dim"] == 16
    for (k, a), (k2, b) in zip(m.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    m.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)


def test_load_model_rejects_non_gradspace_file(tmp_path):
    p = tmp_path / "raw.pt"
    torch.save(build_model("small_cnn", 3, 1, widths=(4,)).state_dict(), p)
    with pytest.raises(ModelError, match="not a gradspace checkpoint"):
        load_model(p)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_raw_state_dict_checkpoint_with_prefixes(tmp_path):
    torch.manual_seed(0)
    m = build_model("small_cnn", 6, 1, widths=(8, 16))
    raw = {f"module.{k[len('net.'):]}": v for k, v in m.state_dict().items()}
    p = tmp_path / "ext.pth"
    torch.save({"state_dict": raw, "epoch": 3}, p)
    loaded, meta = resolve_source(f"checkpoint:{p}", {"arch": "small_cnn", "in_channels": 1,
                                                       "num_classes": 6,
                                                       "arch_kwargs": {"widths": [8, 16]}})
    assert meta["checkpoint_file"] == str(p.resolve())
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_cifar_resnet_key_aliases(tmp_path):
    torch.manual_seed(0)
    m = build_model("resnet18_cifar", 10, 3)
    sd = {k[len("net."):].replace("downsample.", "shortcut.").replace("fc.", "linear."): v
          for k, v in m.state_dict().items()}
    assert "linear.weight" in sd and any("shortcut" in k for k in sd)
    p = tmp_path / "kuangliu.pth"
    torch.save({"net": sd}, p)
    loaded, _ = load_checkpoint_source(p, arch="resnet18_cifar", in_channels=3)
    assert torch.equal(loaded.head.weight, m.head.weight)


def test_checkpoint_mismatch_names_file_and_key(tmp_path):
    torch.manual_seed(0)
    p = tmp_path / "small.pth"
    torch.save(build_model("small_cnn", 10, 1).state_dict(), p)
    with pytest.raises(ModelError) as err:
        load_checkpoint_source(p, arch="resnet18_cifar", in_channels=1)
    assert str(p) in str(err.value) and "'net.conv1.weight'" in str(err.value)
    with pytest.raises(ModelError) as err:
        load_checkpoint_source(p, arch="small_cnn", in_channels=3)
    assert str(p) in str(err.value) and "'net.block1.0.weight'" in str(err.value)
    assert "(32, 1, 3, 3)" in str(err.value)
    with pytest.raises(ModelError, match="raw state dict; set model.arch"):
        load_checkpoint_source(p)
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="garbage.pt is unreadable"):
        load_checkpoint_source(bad, arch="small_cnn")


def test_class_count_mismatch(tmp_path):
    m = build_model("small_cnn", 10, 1, widths=(4, 8))
    with pytest.raises(ModelError, match="mismatched model and config") as err:
        check_num_classes(m, 7, "model.pt")
    assert "10 output classes" in str(err.value) and "num_classes = 7" in str(err.value)
    p = tmp_path / "m.pt"
    save_model(p, m, {})
    with pytest.raises(ModelError, match="mismatched model and config"):
        resolve_source(f"checkpoint:{p}", {"num_classes": 7})
    loaded, _ = resolve_source(f"checkpoint:{p}", {"num_classes": 10})
    assert loaded.num_classes == 10


# --------------------------------------------------------------------------------------
# training


def _separable(n=256, seed=0):
    """Two classes of 1×8×8 images: bright top half vs bright bottom half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.5 * torch.randn(n, 1, 8, 8, generator=g)
    x[y == 0, :, :4] += 1.0
    x[y == 1, :, 4:] += 1.0
    return x, y


def _batches_fn(x, y, batch_size, seed):
    def batches(epoch):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(x), batch_size):
            j = perm[i:i + batch_size]
            yield x[j], y[j], j
    return batches


def _train(seed, augment="none", epochs=4):
    x, y = _separable()
    torch.manual_seed(seed)
    m = build_model("small_cnn", 2, 1, widths=(4, 8))
    s = TrainSettings.from_dict({"epochs": epochs, "batch_size": 32, "lr": 0.05, "augment": augment})
    hist = train_model(m, _batches_fn(x, y, 32, seed), 8, s, seed=seed, mean=[0.0], std=[1.0],
                       progress=False)
    return m, hist, x, y


def test_training_reduces_loss_and_is_deterministic():
    m1, h1, x, y = _train(seed=5)
    losses = [e["loss"] for e in h1["epochs"]]
    assert losses[-1] < 0.5 * losses[0]
    assert h1["steps"] == 4 * 8
    assert (np.diff(losses) < 0).all()
    with torch.no_grad():
        acc = (m1(x).argmax(1) == y).float().mean().item()
    assert acc > 0.95
    assert not m1.training
    m2, h2, _, _ = _train(seed=5)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert [e["loss"] for e in h2["epochs"]] == losses
    m3, _, _, _ = _train(seed=6)
    assert not torch.equal(m1.head.weight, m3.head.weight)


def test_training_with_augmentation_is_deterministic():
    for augment in ("cifar", "affine"):
        m1, h1, _, _ = _train(seed=1, augment=augment, epochs=2)
        m2, _, _, _ = _train(seed=1, augment=augment, epochs=2)
        assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(),
                                                     strict=True))
        assert np.isfinite([e["loss"] for e in h1["epochs"]]).all()


def test_augment_cifar_is_crop_and_flip_of_padded_input():
    x = torch.randn(6, 2, 5, 5)
    pad_value = [-1.0, 2.0]
    out = augment_cifar(x, torch.Generator().manual_seed(0), pad_value, padding=2)
    assert out.shape == x.shape
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    border = torch.ones(9, 9, dtype=torch.bool)
    border[2:7, 2:7] = False
    for c, v in enumerate(pad_value):
        xp[:, c][:, border] = v
    for i in range(6):  # reference: the output is one of the 5×5 windows, maybe mirrored
        cands = [xp[i, :, a:a + 5, b:b + 5] for a in range(5) for b in range(5)]
        cands += [c.flip(-1) for c in cands]
        assert any(torch.equal(out[i], c) for c in cands)
    flips = augment_cifar(x, torch.Generator().manual_seed(0), None, padding=0)
    assert all(torch.equal(flips[i], x[i]) or torch.equal(flips[i], x[i].flip(-1)) for i in range(6))


def _blob(h, w, cy, cx, sigma=1.5):
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    return torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))


def _centre_of_mass(img):  # (x, y) about the image centre, pixel units
    h, w = img.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype),
                            indexing="ij")
    m = img.sum()
    return float((img * xx).sum() / m - (w - 1) / 2), float((img * yy).sum() / m - (h - 1) / 2)


def test_augment_affine_geometry_and_padding():
    n, h, w = 5, 25, 31
    x = _blob(h, w, 10.0, 18.0).expand(n, 1, h, w).float()
    q = np.array([18.0 - (w - 1) / 2, 10.0 - (h - 1) / 2])
    # no jitter: identity
    assert torch.allclose(augment_affine(x, torch.Generator().manual_seed(0), None, 0.0, 0.0, 0.0), x,
                          atol=1e-5)
    # rotation only: content at q moves to R(a) q, a drawn as documented
    out = augment_affine(x, torch.Generator().manual_seed(1), None, degrees=30.0, scale=0.0, translate=0.0)
    u = torch.rand(n, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    for i in range(n):
        a = float(u[i, 0]) * np.deg2rad(30.0)
        want = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ q
        assert np.allclose(_centre_of_mass(out[i, 0].double()), want, atol=0.05)
    # translation only: content moves by t = translate * u * (W, H)
    out = augment_affine(x, torch.Generator().manual_seed(2), None, degrees=0.0, scale=0.0, translate=0.1)
    u = torch.rand(n, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    for i in range(n):
        want = q + 0.1 * np.array([float(u[i, 2]) * w, float(u[i, 3]) * h])
        assert np.allclose(_centre_of_mass(out[i, 0].double()), want, atol=0.05)
    # pixels from outside the image take the pad value (a black raw pixel)
    const = torch.full((n, 2, h, w), -0.5)
    out = augment_affine(const, torch.Generator().manual_seed(3), [-0.5, -0.5], 45.0, 0.3, 0.2)
    assert torch.allclose(out, const, atol=1e-6)
    zero_pad = augment_affine(const, torch.Generator().manual_seed(3), None, 45.0, 0.3, 0.2)
    assert bool((zero_pad > -0.5 + 1e-3).any())


def test_lr_schedules():
    s = TrainSettings.from_dict({"epochs": 4, "schedule": "cosine"})
    assert lr_factor(s, 0, 0, 100) == pytest.approx(1.0)
    assert lr_factor(s, 50, 2, 100) == pytest.approx(0.5)
    assert lr_factor(s, 100, 3, 100) == pytest.approx(0.0)
    s = TrainSettings.from_dict({"epochs": 4, "schedule": "step", "milestones": [0.5, 0.75]})
    assert [lr_factor(s, 0, e, 100) for e in range(4)] == pytest.approx([1, 1, 0.1, 0.01])


def test_train_settings_validation():
    with pytest.raises(ConfigError, match="unknown key"):
        TrainSettings.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="augment"):
        TrainSettings.from_dict({"augment": "mixup"})


# --------------------------------------------------------------------------------------
# commands with a fake loader module (independent of gradspace.data)


def _fake_loader(monkeypatch, datasets: dict):
    """Install a stand-in for gradspace.data.loader serving in-memory tensors."""
    mod = types.ModuleType("gradspace.data.loader")

    def iter_batches(data_dir, shard=None, batch_size=256, shuffle=False, seed=0, num_workers=0,
                     mean=None, std=None, device=None, image_size=None, channels=None):
        x, y, info = datasets[str(data_dir)]
        rows = torch.arange(len(x))
        if shard is not None:
            rows = rows[(rows * info["shards"]) // len(x) == shard]
        if shuffle:
            rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
        for i in range(0, len(rows), batch_size):
            r = rows[i:i + batch_size]
            yield x[r], y[r], r

    def num_samples(data_dir, shard=None):
        return sum(len(b[2]) for b in iter_batches(data_dir, shard, batch_size=10**9))

    mod.iter_batches, mod.num_samples = iter_batches, num_samples
    mod.read_info = lambda data_dir: dict(datasets[str(data_dir)][2])
    monkeypatch.setitem(sys.modules, "gradspace.data.loader", mod)


def test_train_command_and_model_card(tmp_path, monkeypatch):
    from gradspace.models.jobs import model_card_command, train_command
    from gradspace.store import ShardWriter

    x, y = _separable(128)
    data_dir = str(tmp_path / "id_train")
    _fake_loader(monkeypatch, {data_dir: (x, y, {"name": "toy", "num_classes": 2, "channels": 1,
                                                 "n": 128, "shards": 1})})
    params = {"arch": "small_cnn", "arch_kwargs": {"widths": [4, 8]}, "num_classes": 2,
              "train": {"epochs": 2, "batch_size": 32}, "compute": {"device": "cpu"}}
    out = tmp_path / "model" / "model.pt"
    curve = tmp_path / "model" / "train.json"
    training = train_command(data_dir, params, 3, str(out), str(curve), progress=False)
    assert json.loads(curve.read_text())["history"] == training["history"]
    model, meta = load_model(out)
    assert meta["source"] == "train" and meta["training"]["seed"] == 3
    assert model.arch_kwargs == {"widths": [4, 8]}
    with pytest.raises(ConfigError, match="unknown key"):
        train_command(data_dir, {**params, "lr": 0.1}, 0, str(tmp_path / "x.pt"))
    with pytest.raises(Exception, match="num_classes"):
        train_command(data_dir, {**params, "num_classes": 3}, 0, str(tmp_path / "x.pt"))

    # model card from two id_test stores: 3 of 4 labelled predictions correct
    stores = []
    for k, (preds, labels) in enumerate([([0, 1], [0, 1]), ([1, 1, 0], [0, 1, -1])]):
        p = tmp_path / f"shard-{k}.zarr"
        with ShardWriter(p, len(preds)) as w:
            w.put("preds", np.array(preds, np.int64))
            w.put("labels", np.array(labels, np.int64))
        stores.append(str(p))
    card_path = tmp_path / "model" / "card.json"
    model_card_command(str(out), stores, str(card_path))
    card = json.loads(card_path.read_text())
    assert card["id_test"]["n"] == 4 and card["id_test"]["accuracy"] == pytest.approx(0.75)
    assert card["parameters"]["total"] == count_parameters(model)
    assert card["parameters"]["head"] == 8 * 2 + 2
    assert card["feature_dim"] == 8 and card["num_classes"] == 2 and card["arch"] == "small_cnn"
    assert card["training"]["seed"] == 3 and card["typical_set_bn"] == "block2.1"


def test_load_model_command_normalizes_torchvision(torch_home, tmp_path):
    from gradspace.models.jobs import load_model_command

    _, sd = _fake_resnet18_weights(torch_home)
    out = tmp_path / "model.pt"
    load_model_command("torchvision:resnet18", {"num_classes": 1000, "in_channels": 3}, str(out))
    model, meta = load_model(out)
    assert meta["source"] == "torchvision:resnet18" and model.arch == "torchvision:resnet18"
    torch.testing.assert_close(model.head.weight, sd["fc.weight"])
    with pytest.raises(ModelError, match="mismatched model and config"):
        load_model_command("torchvision:resnet18", {"num_classes": 10}, str(tmp_path / "bad.pt"))
    assert not (tmp_path / "bad.pt").exists()
