"""One real Snakemake run of the whole workflow on a tiny config, plus lint/dry-run checks."""

import csv

import numpy as np
import pytest

from conftest import REPO, TINY, run_snakemake

DETECTORS = ["msp", "maxlogit", "energy", "odin", "react", "bats", "mahalanobis", "knn", "vim"]
OOD = ["textures", "digits8x8"]


@pytest.fixture(scope="module")
def tiny_run(tiny_workdir):
    return tiny_workdir / "results" / "tiny"


def read_metrics(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_metrics_has_every_detector_and_ood_set(tiny_run):
    rows = read_metrics(tiny_run / "metrics.csv")
    for col in ["detector", "embedding", "ood_dataset", "fpr95", "auroc", "aupr_in", "aupr_out"]:
        assert col in rows[0]
    seen = {(r["detector"], r["ood_dataset"]) for r in rows}
    for det in DETECTORS:
        for ood in OOD + ["average"]:
            assert (det, ood) in seen, (det, ood)
    for r in rows:
        for col in ["fpr95", "auroc", "aupr_in", "aupr_out"]:
            assert 0.0 <= float(r[col]) <= 1.0
    # even a 2-epoch model separates texture crops from digits with its energy score
    energy_tex = [r for r in rows if r["detector"] == "energy" and r["ood_dataset"] == "textures"][0]
    assert float(energy_tex["auroc"]) > 0.8


def test_report_and_card(tiny_run):
    html = (tiny_run / "report" / "index.html").read_text()
    for det in DETECTORS:
        assert det in html
    for ood in OOD:
        assert ood in html
    import json

    card = json.loads((tiny_run / "model" / "card.json").read_text())
    assert card["num_parameters"] > 0
    assert 0.5 < card["id_accuracy"] <= 1.0


def test_stores_hold_consistent_embeddings(tiny_run):
    from gradspace.store import load_arrays, open_store

    shards = sorted((tiny_run / "embeddings" / "id_train").glob("shard-*.zarr"))
    assert len(shards) == 2
    arrs = load_arrays(shards, ["logits", "features", "labels", "preds"])
    n = arrs["logits"].shape[0]
    assert n == 800 and arrs["features"].shape[0] == n
    logits = np.asarray(arrs["logits"])
    assert np.array_equal(np.asarray(arrs["preds"]), logits.argmax(1))
    g = open_store(shards[0])
    assert g.attrs["gradspace"]["complete"]
    scores = np.load(tiny_run / "scores" / "feature" / "energy" / "textures.npy")
    assert scores.shape == (120,) and np.isfinite(scores).all()


def test_rerun_is_a_no_op(tiny_run):
    work = tiny_run.parent.parent
    proc = run_snakemake(work, "--configfile", "config.yaml", "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_lint_is_clean():
    proc = run_snakemake(REPO, "--lint", check=False, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Congratulations" in out or "no lints" in out.lower(), out


def test_unknown_detector_is_named(tmp_path):
    cfg = (TINY.read_text()).replace("  msp: {}", "  msp: {}\n  nosuch: {}")
    (tmp_path / "config.yaml").write_text(cfg)
    proc = run_snakemake(tmp_path, "--configfile", "config.yaml", "-n", check=False)
    assert proc.returncode != 0
    assert "unknown detector 'nosuch'" in proc.stdout + proc.stderr


def test_unknown_config_key_is_named(tmp_path):
    cfg = TINY.read_text().replace("seed: 0", "seed: 0\nsede: 1")
    (tmp_path / "config.yaml").write_text(cfg)
    proc = run_snakemake(tmp_path, "--configfile", "config.yaml", "-n", check=False)
    assert proc.returncode != 0
    assert "sede" in proc.stdout + proc.stderr


def test_missing_dataset_path_fails_cleanly(tmp_path):
    cfg = TINY.read_text().replace(
        "    digits8x8: {kind: sklearn_digits, n: 120}",
        "    digits8x8: {kind: sklearn_digits, n: 120}\n"
        f"    places: {{kind: imagefolder, path: {tmp_path}/nope}}")
    (tmp_path / "config.yaml").write_text(cfg)
    proc = run_snakemake(tmp_path, "--configfile", "config.yaml", "--cores", "1",
                         "results/tiny/data/places", check=False)
    assert proc.returncode != 0
    log = (tmp_path / "logs" / "tiny" / "prepare" / "places.log").read_text()
    assert "nope" in log
    assert not (tmp_path / "results" / "tiny" / "data" / "places").exists()
    assert not list((tmp_path / "results" / "tiny" / "data").glob(".*tmp*"))


def test_slurm_profile_plans_the_real_workflow(tmp_path):
    """`snakemake -n --profile profiles/slurm` plans every job of the workflow, GPU rules with
    a GPU request and CPU rules without (no cluster needed for a dry run)."""
    (tmp_path / "config.yaml").write_text(TINY.read_text())
    proc = run_snakemake(tmp_path, "--configfile", "config.yaml", "-n", "--profile",
                         str(REPO / "profiles" / "slurm"), env={"GRADSPACE_SLURM_PARTITION": "gpu"})
    out = proc.stdout
    assert "Job stats" in out and "pca_pass" in out and "project" in out
    blocks = out.split("\n\n")
    extract = next(b for b in blocks if "rule extract:" in b)
    evaluate = next(b for b in blocks if "rule evaluate:" in b)
    assert "gpu=1" in extract and "slurm_partition=gpu" in extract
    assert "gpu=" not in evaluate


def test_grad_detector_d_above_k_is_named_at_parse_time(tmp_path):
    """subspace.detectors' d is checked against subspace.k before any job starts (issue 11)."""
    cfg = TINY.read_text().replace("react: {method: grad_react, d: 4,", "react: {method: grad_react, d: 12,")
    assert "d: 12" in cfg
    (tmp_path / "config.yaml").write_text(cfg)
    proc = run_snakemake(tmp_path, "--configfile", "config.yaml", "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "subspace.detectors.react (grad_react): d = 12" in out and "subspace.k = 8" in out, out[-3000:]
