"""Hyperparameter selection on validation data (gradspace.selection, issue 12): grids,
the criterion, the validation/test overlap checks and the ID hold-out."""

import json

import numpy as np
import pytest

from gradspace.cli import main
from gradspace.data.manifest import read_manifest
from gradspace.data.prepare import prepare_dataset
from gradspace.data.prepare import select as select_positions
from gradspace.errors import ConfigError, DataError
from gradspace.selection import (
    check_disjoint,
    check_validation,
    choose,
    grid_candidates,
    read_selection,
    select,
    select_alpha,
    selection_sets,
    selection_table,
    sources_overlap,
    split_grid,
)


def test_grid_candidates_cover_every_combination_in_a_fixed_order():
    cfg = {"method": "odin", "epsilon": 0.0, "grid": {"temperature": [1, 1000], "epsilon": [0.0, 0.002]}}
    hp, grid = split_grid(cfg, "detectors.odin")
    assert grid == {"temperature": [1, 1000], "epsilon": [0.0, 0.002]} and "grid" not in hp
    cands = grid_candidates(hp, grid)
    # keys sorted (epsilon before temperature), values as listed
    assert [(c["epsilon"], c["temperature"]) for c in cands] == [(0.0, 1), (0.0, 1000), (0.002, 1),
                                                                 (0.002, 1000)]
    assert all(c["method"] == "odin" for c in cands)
    assert grid_candidates({"k": 5}, {}) == [{"k": 5}]


@pytest.mark.parametrize("grid, match", [
    ({"k": []}, "non-empty list"),
    ({"k": 5}, "non-empty list"),
    ([1, 2], "mapping"),
    ({"method": ["knn", "vim"]}, "'method' cannot be searched"),
])
def test_malformed_grids_name_the_detector(grid, match):
    with pytest.raises(ConfigError, match=match) as err:
        split_grid({"k": 5, "grid": grid}, "detectors.knn")
    assert "detectors.knn" in str(err.value)


def test_choose_orders_by_the_criterion_then_grid_order():
    rows = [{"auroc": 0.80, "fpr95": 0.50}, {"auroc": 0.90, "fpr95": 0.60},
            {"auroc": 0.90, "fpr95": 0.40}, {"auroc": 0.70, "fpr95": 0.30}]
    assert choose(rows, ["auroc"]) == 1           # tie 1/2 on AUROC: the earlier
    assert choose(rows, ["auroc", "fpr95"]) == 2  # FPR95 breaks the tie (lower is better)
    assert choose(rows, ["fpr95", "auroc"]) == 3
    with pytest.raises(ConfigError, match="unknown selection criterion"):
        choose(rows, ["accuracy"])


def _val_scores(rng, sep):
    """Validation scores where ID sits `sep` above both OOD sets (higher = more ID)."""
    return {"id_val": rng.normal(sep, 1, 300), "a": rng.normal(0, 1, 200), "b": rng.normal(0, 1, 200)}


def test_select_picks_the_candidate_that_separates_validation_sets_best():
    rng = np.random.default_rng(0)
    cands = [{"k": 1}, {"k": 5}, {"k": 20}]
    scores = [_val_scores(rng, s) for s in (0.5, 3.0, 1.0)]
    rec = select(cands, scores, ["a", "b"], ["auroc", "fpr95"])
    assert rec["chosen"] == 1 and rec["chosen_hparams"] == {"k": 5}
    rows = rec["candidates"]
    assert rows[1]["auroc"] > rows[2]["auroc"] > rows[0]["auroc"]
    # the average is the mean of the per-set metrics
    assert rows[0]["auroc"] == pytest.approx((rows[0]["auroc:a"] + rows[0]["auroc:b"]) / 2)
    # alpha of the ensemble: a gradient score that only adds noise gets the smallest alpha
    feat = _val_scores(rng, 3.0)
    noise = {k: rng.normal(0, 1, v.shape[0]) for k, v in feat.items()}
    rec = select_alpha([2.0, 0.1, 1.0], feat, noise, ["a", "b"], ["auroc"])
    assert rec["chosen_hparams"] == {"alpha": 0.1}


def _cfg(val_ood, test_ood=None, holdout=100):
    return {"data": {"id": {"source": {"kind": "mnist_demo"}},
                     "ood": test_ood or {"fm": {"kind": "fashion_mnist", "split": "test", "classes": [3, 4]},
                                         "tex": {"kind": "skimage_textures", "n": 100}}},
            "validation": {"id_holdout": holdout, "ood": val_ood, "criterion": ["auroc"]}}


def test_validation_sets_that_are_or_may_overlap_test_sets_are_refused():
    ok = {"fm_val": {"kind": "fashion_mnist", "split": "train", "classes": [3, 4]},
          "fm_other": {"kind": "fashion_mnist", "split": "test", "classes": [6, 7]}}
    check_validation(_cfg(ok))
    assert selection_sets(_cfg(ok), any_grid=True) == ["id_val", "fm_val", "fm_other"]
    assert selection_sets(_cfg(ok), any_grid=False) == []
    with pytest.raises(ConfigError, match="'fm' is also a test OOD set"):
        check_validation(_cfg({"fm": ok["fm_val"]}))
    with pytest.raises(ConfigError, match="validation.ood.tex2 may share samples with the test OOD set "
                                          "data.ood.tex"):
        check_validation(_cfg({"tex2": {"kind": "skimage_textures", "n": 50}}))
    with pytest.raises(ConfigError, match="data.ood.fm"):
        check_validation(_cfg({"fm4": {"kind": "fashion_mnist", "split": "test", "classes": [4, 9]}}))
    with pytest.raises(ConfigError, match="reserved"):
        check_validation(_cfg({"id_val": ok["fm_val"]}))
    with pytest.raises(ConfigError, match="validation data is not configured"):
        selection_sets(_cfg({}), any_grid=True)
    with pytest.raises(ConfigError, match="validation data is not configured"):
        selection_sets(_cfg(ok, holdout=None), any_grid=True)
    assert not sources_overlap({"kind": "fashion_mnist", "split": "test"}, {"kind": "mnist_demo"})
    assert sources_overlap({"kind": "fashion_mnist"}, {"kind": "fashion_mnist", "classes": [1]})


def test_id_holdout_is_disjoint_from_id_train_and_deterministic():
    labels = np.repeat(np.arange(4), 50)
    kw = dict(random_split=True, test_fraction=0.25, seed=3, holdout=30)
    train = select_positions("x", "id_train", labels, subsample=None, **kw)
    val = select_positions("x", "id_val", labels, subsample=None, **kw)
    test = select_positions("x", "id_test", labels, subsample=None, **kw)
    assert len(val) == 30 and len(train) == 150 - 30 and len(test) == 50
    assert not set(val) & set(train) and not set(val) & set(test)
    assert np.array_equal(val, select_positions("x", "id_val", labels, subsample=None, **kw))
    # train_subsample draws from what the hold-out left
    sub = select_positions("x", "id_train", labels, subsample=40, **kw)
    assert len(sub) == 40 and not set(sub) & set(val)
    # no hold-out: the selection the runs without validation always had
    assert np.array_equal(select_positions("x", "id_train", labels, subsample=None, random_split=True,
                                           test_fraction=0.25, seed=3),
                          np.sort(np.concatenate([train, val])))
    with pytest.raises(DataError, match="leaves no ID-train samples"):
        select_positions("x", "id_train", labels, subsample=None, random_split=True, test_fraction=0.25,
                         seed=3, holdout=150)


def _prep(tmp_path, name, role, holdout=None, source=None, **kw):
    p = {"role": role, "source": source or {"kind": "sklearn_digits"}, "shards": 1, "image_size": 8,
         "channels": 1, "num_classes": 10 if role != "ood" else None,
         "test_fraction": 0.25 if role != "ood" else None, **kw}
    if holdout is not None:
        p["holdout"] = holdout
    prepare_dataset(name, p, seed=0, out=tmp_path / name)
    return tmp_path / name


def test_prepared_validation_sets_are_checked_on_sample_ids(tmp_path):
    tr = _prep(tmp_path, "id_train", "id_train", holdout=100)
    val = _prep(tmp_path, "id_val", "id_val", holdout=100)
    te = _prep(tmp_path, "id_test", "id_test")
    assert len(read_manifest(val)) == 100
    check_disjoint({"id_val": str(val)}, {"id_train": str(tr), "id_test": str(te)})
    # an OOD set drawn from the same digits shares samples with id_test: refused, named
    ood = _prep(tmp_path, "digits_val", "ood", n=400)
    with pytest.raises(DataError, match=r"validation set 'digits_val' .* shares \d+ sample\(s\) with 'id_"):
        check_disjoint({"digits_val": str(ood)}, {"id_train": str(tr), "id_test": str(te)})
    with pytest.raises(ConfigError, match="role id_val needs params 'holdout'"):
        _prep(tmp_path, "id_val2", "id_val")
    # the command writes a record only when the check passes
    out = tmp_path / "ok.json"
    assert main(["check-validation", "--validation", f"id_val={val}", "--test", f"id_train={tr}",
                 f"id_test={te}", "--out", str(out)]) in (0, None)
    assert json.loads(out.read_text())["shared_samples"] == 0
    bad = tmp_path / "bad.json"
    assert main(["check-validation", "--validation", f"digits_val={ood}", "--test", f"id_test={te}",
                 "--out", str(bad)]) == 2
    assert not bad.exists()


def test_select_command_copies_the_chosen_fitted_detector(tmp_path):
    rng = np.random.default_rng(1)
    fitted, scores = [], []
    for i, sep in enumerate((0.2, 2.5)):
        f = tmp_path / f"cand-{i}.npz"
        np.savez(f, marker=np.array([i]))
        fitted.append(str(f))
        for ds, arr in _val_scores(rng, sep).items():
            p = tmp_path / f"cand-{i}" / f"{ds}.npy"
            p.parent.mkdir(exist_ok=True)
            np.save(p, arr)
            scores.append(f"{i}={p}")
    out, rec = tmp_path / "chosen.npz", tmp_path / "knn.json"
    rc = main(["select", "--name", "knn", "--space", "feature", "--ood", "a", "b", "--criterion", "auroc",
               "fpr95", "--positive", "id", "--candidates", json.dumps([{"k": 1}, {"k": 5}]),
               "--fitted", *fitted, "--scores", *scores, "--out-fitted", str(out), "--out", str(rec)])
    assert rc in (0, None)
    assert int(np.load(out)["marker"][0]) == 1
    r = read_selection(rec)
    assert r["chosen"] == 1 and r["chosen_hparams"] == {"k": 5} and r["name"] == "knn"
    df = selection_table([str(rec)])
    assert list(df["chosen"]) == ["", "yes"] and list(df["detector"]) == ["knn", "knn"]
    assert df["val_auroc"].iloc[1] > df["val_auroc"].iloc[0]
