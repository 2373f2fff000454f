"""The gradspace workflow end to end through a real SLURM scheduler (profiles/slurm plus
the test overlay): same metrics as a local run, and a run interrupted mid-way (snakemake
killed, its running SLURM jobs cancelled) resumes without redoing finished jobs and ends
with identical results. Needs the one-node cluster of tests/slurm/setup_cluster.sh."""

import csv
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, REPO, incomplete_outputs, run_snakemake, snakemake_cmd

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CONFIG = REPO / "tests" / "slurm_config.yaml"
SLURM_ARGS = ("--profile", str(REPO / "profiles" / "slurm"),
              "--workflow-profile", str(REPO / "tests" / "slurm" / "profile"))
ENV = {"GRADSPACE_SLURM_ACCOUNT": "", "GRADSPACE_SLURM_PARTITION": ""}


def _cluster_ready():
    if shutil.which("sinfo") is None:
        return "SLURM client tools not installed (bash tests/slurm/setup_cluster.sh)"
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer"
    if res.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in res.stdout.split()):
        return f"no usable SLURM node: {res.stdout.strip()} {res.stderr.strip()}"
    return None


_PROBLEM = _cluster_ready()
if _PROBLEM and os.environ.get("GRADSPACE_REQUIRE_SLURM"):
    raise RuntimeError(f"GRADSPACE_REQUIRE_SLURM is set but {_PROBLEM}")
requires_cluster = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


def metrics(workdir):
    with open(workdir / "results" / "micro" / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_metrics(a, b):
    assert [(r["detector"], r["ood_dataset"]) for r in a] == [(r["detector"], r["ood_dataset"]) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for col in ("fpr95", "auroc", "aupr_in", "aupr_out"):
            assert float(ra[col]) == pytest.approx(float(rb[col]), abs=1e-9), (ra["detector"], col)


def snapshot(results: Path) -> dict:
    return {str(p.relative_to(results)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(results.rglob("*"))
            if p.is_file() and ".tmp-" not in str(p) and "benchmarks" not in p.parts}


def our_slurm_jobs(workdir):
    out = subprocess.run(["squeue", "-h", "-o", "%i %Z"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if str(workdir) in line]


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("micro_local")
    shutil.copy(CONFIG, work / "config.yaml")
    run_snakemake(work, "--configfile", "config.yaml", "--cores", "2")
    return work


@requires_cluster
def test_slurm_run_matches_local_run(tmp_path, local_reference):
    work = tmp_path / "slurm"
    work.mkdir()
    shutil.copy(CONFIG, work / "config.yaml")
    proc = run_snakemake(work, "--configfile", "config.yaml", *SLURM_ARGS, env=ENV, timeout=1500)
    assert "slurm" in (proc.stdout + proc.stderr).lower()
    logs = list((work / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert any("rule_train" in str(p) for p in logs) and any("rule_pca_pass" in str(p) for p in logs)
    assert_same_metrics(metrics(local_reference), metrics(work))
    again = run_snakemake(work, "--configfile", "config.yaml", *SLURM_ARGS, "-n", env=ENV)
    assert "Nothing to be done" in again.stdout + again.stderr


@requires_cluster
def test_interrupted_slurm_run_resumes(tmp_path, local_reference):
    work = tmp_path / "interrupted"
    work.mkdir()
    shutil.copy(CONFIG, work / "config.yaml")
    results = work / "results" / "micro"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **ENV)
    cmd = snakemake_cmd("--directory", str(work), "--configfile", "config.yaml", *SLURM_ARGS)
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    # wait until some work is finished (the model: extraction has started) and jobs are in flight
    deadline = time.time() + 900
    while not (results / "embeddings" / "id_test" / "shard-0.zarr").exists() or not our_slurm_jobs(work):
        assert proc.poll() is None, "workflow ended before it could be interrupted"
        assert time.time() < deadline, "the run never reached the point of interruption"
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)  # the submitting snakemake dies ...
    proc.wait()
    running = our_slurm_jobs(work)
    subprocess.run(["scancel", *running], check=False)  # ... and the scheduler loses its jobs
    for _ in range(120):
        if not our_slurm_jobs(work):
            break
        time.sleep(1)
    # what survived is finished work, except outputs Snakemake itself marked incomplete
    # (a job cancelled after writing its output but before reporting success)
    incomplete = incomplete_outputs(work, "results/micro/")
    finished = {k: v for k, v in snapshot(results).items()
                if not any(k.startswith(i) for i in incomplete)}
    assert "model/model.pt" in finished
    from gradspace.store import open_store

    for store in (results / "embeddings").rglob("shard-*.zarr"):
        if str(store.relative_to(results)) not in incomplete:
            open_store(store)  # nothing half-written looks complete

    run_snakemake(work, "--configfile", "config.yaml", *SLURM_ARGS, "--unlock", env=ENV)
    run_snakemake(work, "--configfile", "config.yaml", *SLURM_ARGS, env=ENV, timeout=1500)
    final = snapshot(results)
    assert {k: final[k] for k in finished} == finished  # finished outputs untouched, not redone
    assert_same_metrics(metrics(local_reference), metrics(work))
