"""``gradspace grad-scores`` end to end on a tiny prepared dataset, read back through the
generic fit/score commands with the ``stored_grad_score`` detector; GROOD's synthetic
prototype through a FitContext that names the ID-train data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradspace.detectors.base import FitContext, build_detector
from gradspace.store import open_store

models = pytest.importorskip("gradspace.models")
if not hasattr(models, "load_model"):
    pytest.skip("gradspace.models.load_model not available in this checkout", allow_module_level=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from gradspace.data import prepare_dataset
    from gradspace.models import save_model
    from gradspace.models.architectures import build_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gradscores")
    data = root / "id_train"
    prepare_dataset("id_train", {"role": "id_train", "source": {"kind": "mnist_demo"}, "num_classes": 10,
                                 "test_fraction": 0.2, "train_subsample": 40, "shards": 2,
                                 "image_size": 12, "channels": 1}, seed=0, out=data)
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, widths=(4, 6, 8))
    save_model(root / "model.pt", model)
    return root, data


MEAN, STD = [0.1307], [0.3081]


def test_grad_scores_command_writes_store(setup):
    from gradspace.cli import main
    from gradspace.data.loader import iter_batches, num_samples
    from gradspace.grads.scoring import GradScorer, parse_params
    from gradspace.models import load_model

    root, data = setup
    params = {"params": "all", "mean": MEAN, "std": STD, "batch_size": 7, "chunk_size": 4,
              "scores": {"gradnorm_all": {"kind": "gradnorm", "p": 1},
                         "exgrad_all": {"kind": "igoe"},
                         "batchgrad_all": {"kind": "batchgrad"}}}
    import json
    outs = []
    for shard in (0, 1):
        out = root / "gradscores" / f"shard-{shard}.zarr"
        rc = main(["grad-scores", "--model", str(root / "model.pt"), "--data-dir", str(data),
                   "--shard", str(shard), "--params", json.dumps(params), "--ref-data-dir", str(data),
                   "--out", str(out)])
        assert rc == 0
        g = open_store(out)
        assert set(g.array_keys()) == {"gradnorm_all", "exgrad_all", "batchgrad_all", "index", "labels"}
        assert g["index"].shape == (num_samples(data, shard),)
        assert g.attrs["strategy"] in ("vmap", "hooks", "loop")
        outs.append(out)
    idx = np.concatenate([np.asarray(open_store(o)["index"][:]) for o in outs])
    assert sorted(idx.tolist()) == list(range(num_samples(data)))
    # same values as the scorer applied directly
    model, _ = load_model(root / "model.pt", "cpu")
    from gradspace.grads.scoring import reference_batch

    p = parse_params(params)
    scorer = GradScorer(model, p, reference_batch(data, 10, p, torch.device("cpu")))
    x, _, rows = next(iter(iter_batches(data, shard=0, batch_size=7, mean=MEAN, std=STD)))
    direct = scorer(x)
    g0 = open_store(outs[0])
    for k in ("gradnorm_all", "exgrad_all", "batchgrad_all"):
        np.testing.assert_allclose(np.asarray(g0[k][:7]), direct[k], rtol=1e-5)

    # read back by the generic fit/score commands
    from gradspace.detectors.jobs import fit_detector, score_fitted

    fitted = root / "det.npz"
    fit_detector("stored_grad_score", {"key": "gradnorm_all"}, [], fitted, space="feature")
    scores = score_fitted(fitted, root / "s.npy", shards=[str(o) for o in outs])
    assert scores.shape == (num_samples(data),)
    np.testing.assert_allclose(scores[np.asarray(g0["index"][:])], np.asarray(g0["gradnorm_all"][:]))


def test_grad_scores_bad_params_exit_2(setup, capsys):
    from gradspace.cli import main

    root, data = setup
    rc = main(["grad-scores", "--model", str(root / "model.pt"), "--data-dir", str(data), "--shard", "0",
               "--params", '{"mean": [0.1], "std": [0.3], "scores": {"a": {"kind": "batchgrad"}}}',
               "--out", str(root / "never.zarr")])
    assert rc == 2
    assert "ref-data-dir" in capsys.readouterr().err
    assert not (root / "never.zarr").exists()


def test_grood_synthetic_fit_through_context(setup):
    from gradspace.data.loader import iter_batches
    from gradspace.detectors.grood import synthetic_ood_prototype
    from gradspace.models import load_model

    root, data = setup
    model, _ = load_model(root / "model.pt", "cpu")
    feats, logits, labels = [], [], []
    with torch.no_grad():
        for x, y, _ in iter_batches(data, batch_size=16, mean=MEAN, std=STD):
            feats.append(model.forward_features(x).numpy())
            logits.append(model(x).numpy())
            labels.append(y.numpy())
    train = {"features": np.concatenate(feats), "logits": np.concatenate(logits),
             "labels": np.concatenate(labels)}
    # make every sample "correct" so the bank is non-empty with an untrained model
    train["logits"][np.arange(len(train["labels"])), train["labels"]] += 100.0
    ctx = FitContext(model_path=str(root / "model.pt"), seed=0,
                     extra={"data_dir": str(data), "compute": {"device": "cpu", "batch_size": 16,
                                                              "mean": MEAN, "std": STD}})
    det = build_detector("grood", {"ood_prototype": "synthetic", "lam": 0.5})
    det.fit(train, ctx)
    ref = synthetic_ood_prototype(
        model, lambda: iter_batches(data, batch_size=16, mean=MEAN, std=STD), 10, "block1", 0.5)
    np.testing.assert_allclose(det.state["ood_prototype"], ref, rtol=1e-10)
    s = det.score({"features": train["features"], "logits": train["logits"]})
    assert s.shape == (len(train["labels"]),) and np.all(s <= 0)
