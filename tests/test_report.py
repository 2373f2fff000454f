"""`gradspace evaluate` and `gradspace report` on synthetic score files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from gradspace.cli import main
from gradspace.errors import DataError
from gradspace.metrics import CSV_COLUMNS
from gradspace.report import markdown_to_html, read_benchmarks

OODS = ["textures", "photos"]
DETECTORS = [("feature", "msp"), ("feature", "energy"), ("pca", "energy_grad")]
BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


@pytest.fixture
def experiment(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "results" / "t"
    paths = []
    for space, det in DETECTORS:
        for ds, mu, n in [("id_test", 2.0, 60), ("id_train", 2.0, 80), ("textures", 0.0, 40),
                          ("photos", 1.0, 30)]:
            p = root / "scores" / space / det / f"{ds}.npy"
            p.parent.mkdir(parents=True, exist_ok=True)
            np.save(p, rng.normal(mu, 1.0, n))
            paths.append(str(p))
    card = root / "model" / "card.json"
    card.parent.mkdir(parents=True)
    card.write_text(json.dumps({"arch": "small_cnn", "num_params": 1234, "id_accuracy": 0.9712}))
    detectors = {"msp": {"method": "msp", "embedding": "feature"},
                 "energy": {"method": "energy", "embedding": "feature"},
                 "pca/energy_grad": {"method": "energy", "embedding": "gradient"}}
    bench = tmp_path / "benchmarks" / "t"
    (bench / "extract").mkdir(parents=True)
    (bench / "train").mkdir()
    (bench / "extract" / "id_test-0.tsv").write_text(
        BENCH_HEADER + "2.0\t0:00:02\t300.5\t900\t250\t260\t0.1\t2\t95\t1.9\n"
        + "4.0\t0:00:04\t310.5\t900\t250\t260\t0.1\t2\t95\t3.9\n")
    (bench / "train" / "model.tsv").write_text(
        BENCH_HEADER + "40.0\t0:00:40\t800\t1900\t-\t-\t-\t-\t180\t70\n")
    return {"root": root, "scores": paths, "card": str(card), "detectors": json.dumps(detectors),
            "bench": sorted(str(p) for p in bench.rglob("*.tsv"))}


def _evaluate(exp, *extra):
    root = exp["root"]
    rc = main(["evaluate", "--scores", *exp["scores"], "--id-dataset", "id_test",
               "--detectors", exp["detectors"], "--card", exp["card"], "--positive", "id",
               "--out-csv", str(root / "metrics.csv"), "--out-md", str(root / "metrics.md"), *extra])
    return rc, root / "metrics.csv", root / "metrics.md"


def test_evaluate_cli(experiment):
    rc, csv, md = _evaluate(experiment)
    assert rc == 0
    df = pd.read_csv(csv)
    assert list(df.columns) == list(CSV_COLUMNS)
    assert len(df) == len(DETECTORS) * (len(OODS) + 1)
    assert list(df["ood_dataset"].unique()) == OODS + ["average"]  # order of the score files
    assert df[["fpr95", "auroc", "aupr_in", "aupr_out"]].to_numpy().min() >= 0
    assert df[["fpr95", "auroc", "aupr_in", "aupr_out"]].to_numpy().max() <= 1  # fractions
    avg = df[df["ood_dataset"] == "average"].set_index("detector")
    per = df[df["ood_dataset"] != "average"].groupby("detector")["auroc"].mean()
    assert np.allclose(avg.loc[per.index, "auroc"], per)
    assert (avg["n_ood"] == 70).all()
    assert df.set_index("detector").loc["energy_grad", "embedding"].iloc[0] == "gradient"

    text = md.read_text()
    assert "ID accuracy: 97.12%" in text
    for _, det in DETECTORS:
        assert f"| {det}" in text or f"/{det} |" in text
    # the Table-3 layout appears: energy has a feature and a gradient row
    assert "Feature vs gradient" in text
    assert "| energy | Feature |" in text and "|  | Gradient |" in text
    # percent with two decimals in the Markdown
    msp_tex = df[(df.detector == "msp") & (df.ood_dataset == "textures")].iloc[0]
    assert f"{100 * msp_tex.fpr95:.2f}" in text and f"{100 * msp_tex.auroc:.2f}" in text
    # no temporary files left behind
    assert not [p for p in csv.parent.iterdir() if p.name.startswith(".")]


def test_evaluate_bad_scores_exit_2(experiment, capsys):
    bad = [p for p in experiment["scores"] if p.endswith("msp/photos.npy")][0]
    np.save(bad, np.array([0.0, np.nan]))
    rc, csv, _ = _evaluate(experiment)
    assert rc == 2
    assert "photos.npy" in capsys.readouterr().err
    assert not csv.exists()


def test_report_cli(experiment, tmp_path):
    rc, csv, _ = _evaluate(experiment)
    assert rc == 0
    extra_csv = tmp_path / "diag.csv"
    extra_csv.write_text("k,explained\n1,0.5\n2,0.75\n")
    sections = tmp_path / "sections.json"
    sections.write_text(json.dumps([
        {"title": "Subspace diagnostics", "caption": "explained variance", "csv": str(extra_csv)},
        {"title": "Notes <x>", "markdown": "| a | b |\n|---|---|\n| 1 | **2** |\n\n- point"}]))
    timing = tmp_path / "timing.json"
    timing.write_text(json.dumps({"vmap": {"s": 1.5, "peak_mb": 12}, "loop": {"s": 9.0}}))
    out = tmp_path / "report"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    rc = main(["report", "--metrics", str(csv), "--card", experiment["card"],
               "--scores", *experiment["scores"], "--benchmarks", *experiment["bench"],
               "--timing", str(timing), "--sections", str(sections), "--title", "Test report",
               "--out-dir", str(out)])
    assert rc == 0
    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for _, det in DETECTORS:
        assert det in page
    for ood in OODS:
        assert ood in page
    assert "97.12%" in page and "small_cnn" in page
    assert "Feature vs gradient" in page
    # run time table: jobs and rules from the benchmark file names; repeated rows averaged
    assert "extract/id_test-0" in page and "train/model" in page
    assert "<td>3.00</td>" in page  # mean of 2.0 and 4.0 s
    # timing and extra sections, in order, escaped
    assert "Timing: timing" in page and "vmap" in page
    assert page.index("Subspace diagnostics") < page.index("Notes &lt;x&gt;")
    assert "<td>0.75</td>" in page and "<b>2</b>" in page
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert figs == sorted(["heatmap.png", "roc.png", "hist_feature_msp.png", "hist_feature_energy.png",
                           "hist_pca_energy_grad.png"])
    for f in figs:
        assert (out / "figures" / f).read_bytes().startswith(b"\x89PNG")
    assert page.count("data:image/png;base64,") == len(figs)
    # the old directory was replaced as a whole, and no temporary siblings remain
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_report_without_scores_and_bad_sections(experiment, tmp_path, capsys):
    rc, csv, _ = _evaluate(experiment)
    out = tmp_path / "r2"
    rc = main(["report", "--metrics", str(csv), "--out-dir", str(out)])
    assert rc == 0
    assert [p.name for p in (out / "figures").iterdir()] == ["heatmap.png"]
    rc = main(["report", "--metrics", str(csv), "--sections", '[{"markdown": "x"}]',
               "--out-dir", str(tmp_path / "r3")])
    assert rc == 2
    assert "'title'" in capsys.readouterr().err
    assert not (tmp_path / "r3").exists()


def test_markdown_subset():
    html = markdown_to_html("# Head\n\nSome *it* and `code` <tag>\n\n"
                            "| x | y |\n|:--|--:|\n| a | 1 |\n\n- one\n- two")
    assert "<h3>Head</h3>" in html
    assert "<i>it</i>" in html and "<code>code</code>" in html and "&lt;tag&gt;" in html
    assert '<td class="l">a</td><td>1</td>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html


def test_read_benchmarks_flat_dir(tmp_path):
    (tmp_path / "prepare_mnist.tsv").write_text(BENCH_HEADER + "1.0\t0:00:01\t10\t1\t1\t1\t0\t0\t1\t1\n")
    (tmp_path / "train.tsv").write_text(BENCH_HEADER + "5.0\t0:00:05\tNA\t1\t1\t1\t0\t0\t1\t1\n")
    jobs, rules = read_benchmarks(sorted(tmp_path.glob("*.tsv")))
    assert list(jobs["job"]) == ["prepare_mnist", "train"]
    assert list(rules["rule"]) == ["prepare_mnist", "train"]
    assert np.isnan(jobs.set_index("job").loc["train", "max_rss"])


def test_read_benchmarks_skips_empty_and_rejects_foreign(tmp_path):
    (tmp_path / "a.tsv").write_text(BENCH_HEADER + "1.0\t0:00:01\t10\t1\t1\t1\t0\t0\t1\t1\n")
    (tmp_path / "empty.tsv").write_text("")
    (tmp_path / "header_only.tsv").write_text(BENCH_HEADER)
    jobs, _ = read_benchmarks(sorted(tmp_path.glob("*.tsv")))
    assert list(jobs["job"]) == ["a"]
    (tmp_path / "foreign.tsv").write_text("x\ty\n1\t2\n")
    with pytest.raises(DataError, match="foreign.tsv"):
        read_benchmarks(sorted(tmp_path.glob("*.tsv")))
