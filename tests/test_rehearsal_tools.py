"""Unit tests of benchmarks/rehearsal.py's tools (log-to-rule parser, disk sampler); the
rehearsal itself is not run here."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "rehearsal.py"


@pytest.fixture(scope="module")
def rh():
    spec = importlib.util.spec_from_file_location("rehearsal", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LOG = """Building DAG of jobs...
[Thu Dec  3 12:33:36 2026]
localrule prepare:
    output: results/x/data/id_train
    log: logs/x/prepare/id_train.log
    jobid: 3
    benchmark: results/x/benchmarks/prepare/id_train.tsv
    reason: Missing output files: results/x/data/id_train
    wildcards: dataset=id_train
    resources: tmpdir=/tmp, runtime=30
Shell command: gradspace prepare --dataset id_train --out results/x/data/id_train > log 2>&1
[Thu Dec  3 12:33:37 2026]
rule pca_gv:
    input: results/x/model/model.pt, results/x/data/id_train
    output: results/x/subspace/pca/pass-000/gv/group-1/part-0.zarr, results/x/other.json
    jobid: 7
    benchmark: results/x/benchmarks/pca_gv/pass-000/group-1/part-0.tsv
    wildcards: it=000, group=1, part=0
Shell command: GRADSPACE_THREADS=1 gradspace pca-gv --data-dir results/x/data/id_train --shards 0 1 --out o
[Thu Dec  3 12:33:38 2026]
localcheckpoint pca_diagnostics:
    output: results/x/subspace/pca/diagnostics/pass-000.json
    jobid: 9
    benchmark: results/x/benchmarks/pca_diagnostics/pass-000.tsv
Shell command: gradspace pca-diagnostics --out results/x/subspace/pca/diagnostics/pass-000.json
localrule all:
    input: results/x/metrics.csv
    jobid: 0
    reason: Input files updated by another job
Finished jobid: 0 (Rule: all)
"""


def test_log_parser_rules_outputs_benchmarks(rh):
    p = rh.LogParser()
    cut = LOG.index("wildcards: it")  # fed in two pieces, split inside a line
    p.feed(LOG[:cut])
    p.feed(LOG[cut:])
    p.close()
    assert [j["rule"] for j in p.jobs] == ["prepare", "pca_gv", "pca_diagnostics", "all"]
    gv = p.jobs[1]
    assert gv["output"] == ["results/x/subspace/pca/pass-000/gv/group-1/part-0.zarr", "results/x/other.json"]
    assert gv["benchmark"] == "results/x/benchmarks/pca_gv/pass-000/group-1/part-0.tsv"
    assert gv["wildcards"] == {"it": "000", "group": "1", "part": "0"}
    assert gv["jobid"] == 7 and gv["shell"].startswith("GRADSPACE_THREADS=1 gradspace pca-gv")
    assert p.jobs[3]["output"] == [] and p.jobs[3]["shell"] is None
    outs = p.outputs()
    assert outs["results/x/data/id_train"] == "prepare"
    assert outs["results/x/subspace/pca/diagnostics/pass-000.json"] == "pca_diagnostics"


def test_owner_directory_outputs_and_atomic_siblings(rh):
    outs = {"results/x/a/store.zarr": "extract", "results/x/b.json": "evaluate"}
    assert rh.owner("results/x/a/store.zarr/logits/c/0/0", outs) == "results/x/a/store.zarr"
    assert rh.owner("results/x/a/.store.zarr.tmp-123-abcdef12/zarr.json", outs) == "results/x/a/store.zarr"
    assert rh.owner("results/x/.b.json.tmp-9-00000000", outs) == "results/x/b.json"
    assert rh.owner("results/x/b.json", outs) == "results/x/b.json"
    assert rh.owner("results/x/a/other", outs) is None


def test_job_samples_from_shell(rh):
    counts = {"id_train": {0: 5, 1: 7}, "sun": {0: 4}}
    job = {"rule": "pca_gv",
           "shell": "gradspace pca-gv --data-dir results/x/data/id_train --shards 0 1 --out o"}
    assert rh.job_samples(job, counts, 16) == 12
    job = {"rule": "extract",
           "shell": "gradspace extract --data-dir results/x/data/id_train --shard 1 --out o"}
    assert rh.job_samples(job, counts, 16) == 7
    job = {"rule": "score_model_detector", "shell": "gradspace score --data-dir results/x/data/sun --out o"}
    assert rh.job_samples(job, counts, 16) == 4
    assert rh.job_samples({"rule": "evaluate", "shell": "gradspace evaluate --out o"}, counts, 16) is None
    assert rh.job_samples({"rule": "gradient_diagnostics", "shell": ""}, counts, 6) == 6 + 4


def test_disk_sampler_counts_deleted_temp_outputs(rh, tmp_path):
    res = tmp_path / "results" / "x"
    log = tmp_path / "snakemake.log"
    log.write_text(LOG)
    s = rh.DiskSampler(tmp_path, log, interval=0.01)
    part = tmp_path / "results/x/subspace/pca/pass-000/gv/group-1/part-0.zarr"
    (part / "V").mkdir(parents=True)
    (part / "V" / "0").write_bytes(b"x" * 3000)
    (part / "zarr.json").write_bytes(b"x" * 100)
    (res / "data" / "id_train").mkdir(parents=True)
    (res / "data" / "id_train" / "manifest.csv").write_bytes(b"y" * 50)
    s.sample()
    assert s.peak_total == 3150
    # the temporary part is deleted, a later output grows
    for f in (part / "V" / "0", part / "zarr.json"):
        f.unlink()
    (res / "other.json").write_bytes(b"z" * 10)
    s.sample()
    (res / "unrelated.txt").write_bytes(b"q" * 7)
    s.sample()
    s.read_log(final=True)
    assert s.peak_total == 3150
    by_rule = s.bytes_by_rule()
    assert by_rule == {"pca_gv": 3110, "prepare": 50}
    assert s.rule_peak["pca_gv"] == 3100 and s.rule_peak["prepare"] == 50
    assert s.file_max["results/x/subspace/pca/pass-000/gv/group-1/part-0.zarr/V/0"] == 3000


def test_disk_sampler_thread(rh, tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "f").write_bytes(b"a" * 64)
    s = rh.DiskSampler(tmp_path, None, interval=0.01).start()
    s.stop()
    assert s.ticks >= 2 and s.peak_total == 64
