"""The ``classes`` source option (open-set protocol) and OOD groups in metrics (issue 12)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from gradspace.data import prepare_dataset
from gradspace.data.sources import Catalog, check_classes, subset_classes
from gradspace.errors import ConfigError
from gradspace.metrics import (
    AVERAGE,
    evaluate,
    group_averages,
    ood_sets,
    paper_table,
    render_markdown,
    table_columns,
)


def params(role="ood", source=None, **kw):
    p = {"role": role, "source": source or {"kind": "sklearn_digits"}, "shards": 1,
         "image_size": 8, "channels": 1}
    p.update(kw)
    return p


def _manifest(path):
    return pd.read_csv(path / "manifest.csv")


def _catalog():
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 3], dtype=np.int64)
    idx = np.arange(labels.size, dtype=np.int64)
    return Catalog(index=idx, ids=idx.astype(str).astype(object), labels=labels, num_classes=4,
                   description="toy", class_names=["a", "b", "c", "d"])


def test_subset_classes_remaps_in_listed_order():
    cat = subset_classes("x", _catalog(), [3, 1], remap=True)
    assert cat.index.tolist() == [1, 3, 5, 7, 8]  # source order kept
    assert cat.labels.tolist() == [1, 0, 1, 0, 0]  # 3 -> 0, 1 -> 1 (position in the list)
    assert cat.num_classes == 2 and cat.class_names == ["d", "b"]
    ood = subset_classes("x", _catalog(), [3, 1], remap=False)
    assert ood.labels.tolist() == [1, 3, 1, 3, 3] and ood.num_classes == 4
    assert subset_classes("x", _catalog(), None, remap=True).labels.size == 9


@pytest.mark.parametrize("bad", [[], [1, 1], [-1], ["a"], [True], 3])
def test_check_classes_rejects(bad):
    with pytest.raises(ConfigError, match="classes"):
        check_classes("x", bad)


def test_subset_classes_unknown_class_is_error():
    with pytest.raises(ConfigError, match=r"lists \[7\]"):
        subset_classes("x", _catalog(), [0, 7], remap=True)


def test_prepare_id_subset_is_disjoint_from_heldout_ood(tmp_path):
    keep, held = [0, 2, 4, 6, 8], [1, 3, 5, 7, 9]
    src = {"kind": "sklearn_digits", "classes": keep}
    common = dict(num_classes=5, test_fraction=0.25)
    tr = prepare_dataset("id_train", params("id_train", src, **common), 0, tmp_path / "tr")
    prepare_dataset("id_test", params("id_test", src, **common), 0, tmp_path / "te")
    prepare_dataset("near", params("ood", {"kind": "sklearn_digits", "classes": held}), 0,
                          tmp_path / "ood")
    assert tr["num_classes"] == 5 and tr["source"]["classes"] == keep
    m_tr, m_te, m_ood = (_manifest(tmp_path / d) for d in ("tr", "te", "ood"))
    assert sorted(m_tr["label"].unique()) == [0, 1, 2, 3, 4]  # remapped
    assert set(m_ood["label"]) == {-1}
    from sklearn.datasets import load_digits

    target = load_digits().target
    # ID samples are exactly the kept classes, split without overlap; OOD the held-out ones
    assert set(target[m_tr["index"]]) == set(keep) and set(target[m_ood["index"]]) == set(held)
    assert np.array_equal(np.asarray(keep)[m_tr["label"]], target[m_tr["index"]])
    assert not set(m_tr["index"]) & set(m_te["index"])
    assert len(m_tr) + len(m_te) == int(np.isin(target, keep).sum())
    assert len(m_ood) == int(np.isin(target, held).sum())


def test_prepare_num_classes_must_match_subset(tmp_path):
    src = {"kind": "sklearn_digits", "classes": [0, 1, 2]}
    from gradspace.errors import DataError

    with pytest.raises(DataError, match="3 classes but num_classes is 10"):
        prepare_dataset("id_train", params("id_train", src, num_classes=10, test_fraction=0.2), 0,
                        tmp_path / "x")


def test_prepare_without_classes_is_unchanged(tmp_path):
    """Configs without `classes` keep their info.json (no 'classes' key, same description)."""
    info = prepare_dataset("d", params(), 0, tmp_path / "d")
    assert "classes" not in info["source"]
    assert info["description"].startswith("scikit-learn 8x8") and "classes" not in info["description"]
    on_disk = json.loads((tmp_path / "d" / "info.json").read_text())
    assert on_disk["source"] == {"kind": "sklearn_digits"}


def test_schema_accepts_classes_and_groups():
    import yaml
    from snakemake.utils import validate

    cfg = yaml.safe_load(open("config/presets/fashion-mnist-nearood.yaml"))
    validate(cfg, "workflow/schemas/config.schema.yaml")
    assert cfg["data"]["id"]["num_classes"] == len(cfg["data"]["id"]["source"]["classes"])
    held = cfg["data"]["ood"]["fmnist_heldout"]["classes"]
    assert not set(held) & set(cfg["data"]["id"]["source"]["classes"])
    assert set(held) | set(cfg["data"]["id"]["source"]["classes"]) == set(range(10))
    groups = cfg["metrics"]["groups"]
    assert sorted(m for g in groups.values() for m in g) == sorted(cfg["data"]["ood"])


# ------------------------------------------------------------------------ OOD groups
def _tree(tmp_path, dets=("msp", "knn"), sets=("near1", "far1", "far2")):
    paths = []
    rng = np.random.default_rng(0)
    shift = {"near1": 0.3, "far1": 2.0, "far2": 3.0}
    for det in dets:
        for ds in ("id_test",) + tuple(sets):
            p = tmp_path / "scores" / "feature" / det / f"{ds}.npy"
            p.parent.mkdir(parents=True, exist_ok=True)
            np.save(p, rng.normal(shift.get(ds, 0.0) * (1 if det == "msp" else 0.5) if ds != "id_test"
                                  else 0.0, 1.0, 40) * (-1 if ds != "id_test" else 1))
            paths.append(str(p))
    return paths


def test_evaluate_group_rows(tmp_path):
    paths = _tree(tmp_path)
    plain = evaluate(paths)
    df = evaluate(paths, groups={"near": ["near1"], "far": ["far1", "far2"]})
    # without groups nothing changes; with groups the extra rows come after "average"
    assert plain.equals(df[~df["ood_dataset"].str.startswith("average:")].reset_index(drop=True))
    assert list(df["ood_dataset"][:6]) == ["near1", "far1", "far2", AVERAGE, "average:near",
                                           "average:far"]
    for _det, g in df.groupby("detector"):
        per = g.set_index("ood_dataset")
        assert per.loc["average:near", "auroc"] == pytest.approx(per.loc["near1", "auroc"])
        assert per.loc["average:far", "fpr95"] == pytest.approx(per.loc[["far1", "far2"], "fpr95"].mean())
        assert per.loc["average:far", "n_ood"] == 80
    assert ood_sets(df) == ["near1", "far1", "far2"]
    assert group_averages(df) == ["average:near", "average:far"]
    assert table_columns(df) == ["near1", "far1", "far2", "average:near", "average:far", AVERAGE]
    header, rows, _ = paper_table(df)
    assert header[-3:] == ["near avg FPR95↓ / AUROC↑", "far avg FPR95↓ / AUROC↑",
                           "Average FPR95↓ / AUROC↑"]
    md = render_markdown(df)
    assert "## Averages per OOD group" in md and "AUROC spread across detectors, near avg" in md
    assert "## Averages per OOD group" not in render_markdown(plain)


def test_evaluate_group_with_unknown_set_is_error(tmp_path):
    with pytest.raises(ConfigError, match=r"group 'near' lists \['cifar'\]"):
        evaluate(_tree(tmp_path), groups={"near": ["cifar"]})
    with pytest.raises(ConfigError, match="must list OOD set names"):
        evaluate(_tree(tmp_path), groups={"near": "near1"})
