"""The near-OOD benchmark, reduced (tests/nearood_reduced.yaml), run for real: the
regression guard of issue 12 and the hyperparameter selection it relies on.

- Regression guard: every detector's validation-selected test AUROC (near, far and overall
  averages) must not drop more than TOLERANCE below the recorded reference
  (tests/reference/nearood_reduced.json). Update the reference only on purpose, with a note
  saying why: ``GRADSPACE_UPDATE_REFERENCE="<why>" pytest tests/test_benchmark_guard.py``
  rewrites it from this run and records the note, the date and the previous figures' worst
  change; commit it with that explanation.
- Selection: the test sets are scored only with the chosen hyperparameters; changing one
  detector's grid reruns only that detector's selection and scores; a validation OOD set
  that is a test set is refused.

Needs Debian's dataset-fashion-mnist (``apt-get install -y dataset-fashion-mnist``): skipped
without it unless GRADSPACE_REQUIRE_DATA is set (CI sets it and installs the package).
"""

import datetime
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, planned_jobs, run_snakemake

CONFIG = REPO / "tests" / "nearood_reduced.yaml"
REFERENCE = REPO / "tests" / "reference" / "nearood_reduced.json"
#: the largest tolerated drop of a detector's test AUROC (fraction: 0.02 = 2 points)
TOLERANCE = 0.02
SCOPES = ("average:near", "average:far", "average")
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

if not FASHION.exists():
    if os.environ.get("GRADSPACE_REQUIRE_DATA"):
        raise RuntimeError(f"GRADSPACE_REQUIRE_DATA is set but {FASHION} is missing "
                           "(apt-get install -y dataset-fashion-mnist)")
    pytestmark = pytest.mark.skip(reason="dataset-fashion-mnist is not installed "
                                         "(apt-get install -y dataset-fashion-mnist)")
else:
    pytestmark = pytest.mark.slow

R = "results/nearood_reduced"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    work = tmp_path_factory.mktemp("nearood")
    shutil.copy(CONFIG, work / "config.yaml")
    run_snakemake(work, "--configfile", "config.yaml", "--cores", "2", timeout=1800)
    return work


def _label(row):
    return row["detector"] if row["space"] == "feature" else f"{row['space']}/{row['detector']}"


def selected_aurocs(work) -> dict:
    df = pd.read_csv(work / R / "metrics.csv")
    df = df[df["ood_dataset"].isin(SCOPES)]
    return {f"{_label(r)} @ {r['ood_dataset']}": round(float(r["auroc"]), 6) for _, r in df.iterrows()}


def test_validation_selected_auroc_does_not_regress(bench):
    now = selected_aurocs(bench)
    why = os.environ.get("GRADSPACE_UPDATE_REFERENCE")
    old = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else None
    if why:
        worst = None
        if old:
            common = set(old["auroc"]) & set(now)
            worst = min((now[k] - old["auroc"][k] for k in common), default=None)
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps({
            "note": why, "date": datetime.date.today().isoformat(), "config": "tests/nearood_reduced.yaml",
            "tolerance": TOLERANCE, "worst_change_from_previous": worst, "auroc": now}, indent=1,
            sort_keys=True) + "\n")
        pytest.skip(f"reference rewritten ({len(now)} figures): {why}")
    assert old is not None, f"no reference at {REFERENCE}: run with GRADSPACE_UPDATE_REFERENCE='<why>'"
    missing = sorted(set(old["auroc"]) - set(now))
    assert not missing, f"detectors/scopes of the reference missing from this run: {missing}"
    drops = {k: (old["auroc"][k], now[k]) for k in old["auroc"] if now[k] < old["auroc"][k] - TOLERANCE}
    lines = "\n".join(f"  {k}: {a:.4f} -> {b:.4f}" for k, (a, b) in sorted(drops.items()))
    assert not drops, f"test AUROC fell more than {100 * TOLERANCE:.1f} points below the reference:\n" + lines


def test_near_ood_does_not_saturate(bench):
    near = {k: v for k, v in selected_aurocs(bench).items() if k.endswith("@ average:near")}
    assert max(near.values()) < 0.95, near
    assert max(near.values()) - min(near.values()) > 0.05, near


def test_test_sets_are_scored_with_the_chosen_hyperparameters_only(bench):
    from gradspace.detectors.jobs import read_fitted_meta
    from gradspace.selection import read_selection

    sel = bench / R / "selection"
    records = sorted(sel.glob("*/*.json"))
    spaces = Counter(p.parent.name for p in records)
    assert spaces == Counter({"feature": 5, "pca": 1, "ag": 1, "ensemble_pca": 1, "ensemble_ag": 1})
    for rec_path in records:
        rec = read_selection(rec_path)
        assert rec["validation"] == {"id": "id_val", "ood": ["fmnist_heldout_train"]}
        aurocs = [c["auroc"] for c in rec["candidates"]]
        assert rec["candidates"][rec["chosen"]]["auroc"] == max(aurocs)
        if rec["space"].startswith("ensemble_"):
            continue
        meta = read_fitted_meta(bench / R / "detectors" / rec["space"] / f"{rec['name']}.npz")
        for key, value in rec["chosen_hparams"].items():
            assert meta["hparams"][key] == value, (rec_path, key)
    # candidates were scored on the validation sets only
    scored = {p.stem for p in sel.glob("*/*/cand-*/*.npy")}
    assert scored == {"id_val", "fmnist_heldout_train"}
    # the ensemble's test scores use the chosen alpha
    rec = read_selection(sel / "ensemble_pca" / "knn.json")
    f = np.load(bench / R / "scores/feature/knn/id_test.npy")
    g = np.load(bench / R / "scores/pca/knn/id_test.npy")
    e = np.load(bench / R / "scores/ensemble_pca/knn/id_test.npy")
    assert np.allclose(e, f + rec["chosen_hparams"]["alpha"] * g)
    # id_val is held out of the ID-train pool: no shared sample
    from gradspace.data.manifest import read_manifest

    ids = {ds: set(read_manifest(bench / R / "data" / ds)["id"]) for ds in ("id_train", "id_val", "id_test")}
    assert len(ids["id_val"]) == 400
    assert not ids["id_val"] & ids["id_train"] and not ids["id_val"] & ids["id_test"]


def test_report_shows_the_validation_table(bench):
    table = pd.read_csv(bench / R / "selection.csv")
    assert (table.groupby("detector")["chosen"].apply(lambda c: (c == "yes").sum()) == 1).all()
    assert set(table["detector"]) >= {"knn", "odin", "pca/knn", "ag/knn", "ensemble_pca/knn"}
    html = (bench / R / "report" / "index.html").read_text()
    assert "Hyperparameter selection on validation data" in html


def _write(work, name, change):
    cfg = yaml.safe_load(CONFIG.read_text())
    change(cfg)
    (work / name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return name


def test_changing_one_grid_reruns_only_that_detector(bench):
    name = _write(bench, "c_grid.yaml",
                  lambda c: c["detectors"]["react"]["grid"].update(percentile=[80, 95, 99]))
    jobs = planned_jobs(bench, name)
    counts = Counter(r for r, _ in jobs)
    # only the changed candidate (index 1: 90 -> 95) is fitted and scored again
    assert counts == Counter({"fit_candidate": 1, "score_candidate": 2, "select_detector": 1,
                              "score_detector": 4, "selection_table": 1, "evaluate": 1, "findings": 1,
                              "report": 1, "all": 1}), counts
    assert {w.get("detector") for r, w in jobs if "detector" in w} == {"react"}
    assert {w.get("cand") for r, w in jobs if r == "fit_candidate"} == {"1"}
    # a gradient detector's grid: its candidates, selection, scores and its ensemble only
    name = _write(bench, "c_ggrid.yaml",
                  lambda c: c["subspace"]["detectors"]["knn"]["grid"].update(k=[5, 10, 20]))
    counts = Counter(r for r, _ in planned_jobs(bench, name))
    assert counts["fit_grad_candidate"] == 2 and counts["select_grad_detector"] == 2
    assert not {"fit_candidate", "select_detector", "project", "extract", "pca_pass"} & set(counts), counts
    # the ensemble's alpha grid: the alpha selections and the ensemble scores only
    name = _write(bench, "c_alpha.yaml",
                  lambda c: c["subspace"]["ensemble"]["grid"].update(alpha=[0.5, 1.0]))
    counts = Counter(r for r, _ in planned_jobs(bench, name))
    assert counts["select_ensemble_alpha"] == 2 and counts["ensemble"] == 8
    unrelated = {"fit_candidate", "fit_grad_candidate", "select_detector", "score_detector"}
    assert not unrelated & set(counts), counts


def test_a_validation_set_that_is_a_test_set_is_refused(bench):
    def same_as_test(c):
        c["validation"]["ood"] = {"near_val": dict(c["data"]["ood"]["fmnist_heldout"], n=100)}

    proc = run_snakemake(bench, "--configfile", _write(bench, "c_bad.yaml", same_as_test), "-n", check=False)
    assert proc.returncode != 0
    assert "validation.ood.near_val may share samples with the test OOD set data.ood.fmnist_heldout" in (
        proc.stdout + proc.stderr)
