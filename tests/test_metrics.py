"""Metrics against hand-computed values (both conventions), ties and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from gradspace.errors import ConfigError, DataError, NumericalError
from gradspace.metrics import (
    card_id_accuracy,
    evaluate,
    load_scores,
    ood_metrics,
    parse_score_path,
)


def test_hand_case_papers_convention():
    # ID [0.9, 0.8, 0.7, 0.6], OOD [0.65, 0.5, 0.4, 0.3]
    # AUROC = P(s_id > s_ood): 0.9, 0.8, 0.7 beat all 4 OOD (12 pairs); 0.6 beats 0.5, 0.4,
    #         0.3 but not 0.65 (3 pairs) -> 15 / 16.
    # FPR95: TPR_ID >= 0.95 needs all 4 ID accepted -> threshold 0.6 -> OOD >= 0.6 is {0.65}
    #        -> 1 / 4.
    # AUPR-In: ranking .9I .8I .7I .65O .6I; precision at each ID hit 1, 1, 1, 4/5
    #          -> (1 + 1 + 1 + 0.8) / 4 = 0.95.
    # AUPR-Out: ranking by -s: .3O .4O .5O .6I .65O; precision at OOD hits 1, 1, 1, 4/5 -> 0.95.
    m = ood_metrics([0.9, 0.8, 0.7, 0.6], [0.65, 0.5, 0.4, 0.3])
    assert m["auroc"] == pytest.approx(15 / 16)
    assert m["fpr95"] == pytest.approx(0.25)
    assert m["aupr_in"] == pytest.approx(0.95)
    assert m["aupr_out"] == pytest.approx(0.95)


def test_asymmetric_case_both_conventions():
    # ID [0.9, 0.8, 0.3], OOD [0.7, 0.2, 0.1, 0.05]
    # AUROC: 0.9 and 0.8 beat 4 each, 0.3 beats 3 -> 11 / 12 (both conventions).
    # positive=id:  accept all 3 ID (2/3 < 0.95) -> t = 0.3 -> OOD >= 0.3: {0.7} -> 1/4.
    # positive=ood: flag all 4 OOD (3/4 < 0.95) -> flag s <= 0.7 -> ID <= 0.7: {0.3} -> 1/3.
    # AUPR-In: .9I .8I .7O .3I -> precision 1, 1, 3/4 -> 2.75 / 3 = 11/12.
    # AUPR-Out: -s ranking .05O .1O .2O .3I .7O -> precision 1, 1, 1, 4/5 -> 3.8 / 4 = 0.95.
    ids, oods = [0.9, 0.8, 0.3], [0.7, 0.2, 0.1, 0.05]
    m_id = ood_metrics(ids, oods, positive="id")
    m_ood = ood_metrics(ids, oods, positive="ood")
    assert m_id["fpr95"] == pytest.approx(1 / 4)
    assert m_ood["fpr95"] == pytest.approx(1 / 3)
    for m in (m_id, m_ood):
        assert m["auroc"] == pytest.approx(11 / 12)
        assert m["aupr_in"] == pytest.approx(11 / 12)
        assert m["aupr_out"] == pytest.approx(0.95)


def test_fpr95_takes_first_threshold_reaching_95_percent():
    # 20 ID scores 1..20: TPR >= 0.95 first at 19/20 accepted -> threshold 2.
    # OOD [0.5, 1.5, 2.5, 3]: scores >= 2 are {2.5, 3} -> FPR95 = 2/4 (threshold 1, i.e.
    # TPR = 1, would give 3/4; interpolating would give something in between).
    m = ood_metrics(np.arange(1, 21, dtype=float), [0.5, 1.5, 2.5, 3.0])
    assert m["fpr95"] == pytest.approx(0.5)
    # OpenOOD: 20 OOD scores -1..-20, TPR_OOD >= 0.95 first at 19 flagged -> flag s <= -2;
    # ID [-2.5, -1.5, 0, 1] -> only -2.5 flagged -> 1/4.
    m = ood_metrics([-2.5, -1.5, 0.0, 1.0], -np.arange(1, 21, dtype=float), positive="ood")
    assert m["fpr95"] == pytest.approx(0.25)


@pytest.mark.parametrize("positive", ["id", "ood"])
def test_perfect_and_reversed_separation(positive):
    ids, oods = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0])
    m = ood_metrics(ids, oods, positive=positive)
    assert m == {"fpr95": 0.0, "auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0}
    r = ood_metrics(oods, ids, positive=positive)
    assert r["auroc"] == 0.0
    assert r["fpr95"] == 1.0
    # reversed: the ID hits come after all 3 OOD: precision 1/4, 2/5, 3/6 -> mean
    assert r["aupr_in"] == pytest.approx((1 / 4 + 2 / 5 + 3 / 6) / 3)


def test_ties():
    # ID [1, 1, 0], OOD [1, 0, 0]: of 9 pairs, ID 1 vs OOD 1 tie (0.5) twice, ID 1 vs OOD 0
    # wins 4 times, ID 0 vs OOD 0 ties twice (0.5 each) -> (1 + 4 + 1) / 9 = 2/3.
    # FPR95: all ID needs threshold 0 -> every OOD accepted -> 1.
    # AUPR-In: threshold 1 admits {I, I, O}: P = 2/3 at R = 2/3; threshold 0: P = 3/6 at R = 1
    #          -> 2/3 * 2/3 + 1/3 * 1/2 = 11/18; AUPR-Out is the mirror image -> 11/18.
    m = ood_metrics([1.0, 1.0, 0.0], [1.0, 0.0, 0.0])
    assert m["auroc"] == pytest.approx(2 / 3)
    assert m["fpr95"] == pytest.approx(1.0)
    assert m["aupr_in"] == pytest.approx(11 / 18)
    assert m["aupr_out"] == pytest.approx(11 / 18)
    # a tied block is accepted whole: ID = [3] + [1]*19, 95% needs 19 -> threshold 1 accepts
    # all 20 ID and the OOD samples scoring 1 -> FPR95 = 2/4
    m = ood_metrics([3.0] + [1.0] * 19, [1.0, 1.0, 0.0, 0.0])
    assert m["fpr95"] == pytest.approx(0.5)


def test_ties_are_order_independent():
    rng = np.random.default_rng(0)
    ids, oods = rng.integers(0, 5, 40).astype(float), rng.integers(0, 4, 30).astype(float)
    ref = ood_metrics(ids, oods)
    for _ in range(3):
        assert ood_metrics(rng.permutation(ids), rng.permutation(oods)) == ref


@pytest.mark.parametrize("positive", ["id", "ood"])
def test_fpr95_matches_definition_on_random_ties(positive):
    """Brute force over the distinct thresholds, written from the definition."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 12, 57).astype(float) + 2
    oods = rng.integers(0, 12, 43).astype(float)
    pos, neg = (ids, oods) if positive == "id" else (-oods, -ids)
    # largest threshold t with mean(pos >= t) >= 0.95; FPR = mean(neg >= t)
    ts = np.unique(np.concatenate([pos, neg]))[::-1]
    t = next(t for t in ts if np.mean(pos >= t) >= 0.95)
    assert ood_metrics(ids, oods, positive=positive)["fpr95"] == pytest.approx(np.mean(neg >= t))


def test_bad_input():
    with pytest.raises(NumericalError):
        ood_metrics([0.1, np.nan], [0.2])
    with pytest.raises(NumericalError):
        ood_metrics([0.1], [np.inf])
    with pytest.raises(DataError):
        ood_metrics([], [0.2])
    with pytest.raises(ConfigError, match="positive"):
        ood_metrics([0.1], [0.2], positive="both")


def test_load_scores_names_file(tmp_path):
    bad = tmp_path / "scores" / "feature" / "msp" / "photos.npy"
    bad.parent.mkdir(parents=True)
    np.save(bad, np.array([0.1, np.nan, 0.3]))
    with pytest.raises(NumericalError, match=r"photos\.npy.*sample 1"):
        load_scores(bad)
    np.save(bad, np.zeros((2, 2)))
    with pytest.raises(DataError, match="1-D"):
        load_scores(bad)
    with pytest.raises(DataError, match="does not exist"):
        load_scores(tmp_path / "missing.npy")


def test_parse_score_path():
    assert parse_score_path("results/x/scores/pca/knn/textures.npy") == ("pca", "knn", "textures")
    with pytest.raises(DataError):
        parse_score_path("results/x/scores/pca/knn/textures.csv")


def test_card_accuracy():
    assert card_id_accuracy({"id_accuracy": 0.9875}) == pytest.approx(98.75)
    assert card_id_accuracy({"test_accuracy": 76.13}) == pytest.approx(76.13)
    assert card_id_accuracy({"arch": "x"}) is None


def _tree(tmp_path, layout):
    paths = []
    rng = np.random.default_rng(0)
    for (space, det, ds), n in layout.items():
        p = tmp_path / "scores" / space / det / f"{ds}.npy"
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, rng.normal(1.0 if ds.startswith("id") else 0.0, 1.0, n))
        paths.append(str(p))
    return paths


def test_evaluate_rows_average_and_metadata(tmp_path):
    paths = _tree(tmp_path, {("feature", "msp", "id_test"): 30, ("feature", "msp", "a"): 20,
                             ("feature", "msp", "b"): 10, ("feature", "msp", "id_train"): 50,
                             ("pca", "msp", "id_test"): 30, ("pca", "msp", "a"): 20,
                             ("pca", "msp", "b"): 10})
    df = evaluate(paths, detectors={"pca/msp": {"method": "msp", "embedding": "gradient"}})
    assert len(df) == 2 * 3  # id_train is not an OOD set
    assert set(df["ood_dataset"]) == {"a", "b", "average"}
    # rows follow --detectors order first
    assert list(df["space"]) == ["pca"] * 3 + ["feature"] * 3
    emb = dict(zip(df["space"], df["embedding"], strict=True))
    assert emb == {"pca": "gradient", "feature": "feature"}
    for (_, _), g in df.groupby(["space", "detector"]):
        per = g[g["ood_dataset"] != "average"]
        avg = g[g["ood_dataset"] == "average"].iloc[0]
        for col in ("fpr95", "auroc", "aupr_in", "aupr_out"):
            assert avg[col] == pytest.approx(per[col].mean())
        assert avg["n_ood"] == 30 and avg["n_id"] == 30
    # default embedding for a non-feature space without --detectors entry: the space name
    assert evaluate(paths)["embedding"].tolist()[-1] == "pca"


def test_evaluate_missing_files(tmp_path):
    paths = _tree(tmp_path, {("feature", "msp", "id_test"): 5, ("feature", "msp", "a"): 5,
                             ("feature", "knn", "id_test"): 5})
    with pytest.raises(DataError, match=r"feature/knn.*\['a'\]"):
        evaluate(paths)
    paths = _tree(tmp_path / "x", {("feature", "msp", "a"): 5})
    with pytest.raises(DataError, match="ID dataset 'id_test'"):
        evaluate(paths, ood_datasets=["a"])
