"""Runs a tiny workflow through a real SLURM cluster with profiles/slurm.

Needs a running cluster (``bash tests/slurm/setup_cluster.sh`` as root brings up a
single-node one); without one the tests skip.  The workflow written here is a
stand-alone two-rule Snakefile (not the gradspace workflow) whose rule names match
the profile's: ``extract`` (three shards, declared ``gpu=1``, listed in
``slurm-array-jobs``) and ``report``.  It checks that

* profiles/slurm and the overlay tests/slurm/profile merge as documented (partition
  ``debug`` from the overlay, ``gpu: 0`` overriding the rule's ``gpu=1``);
* every job really ran inside SLURM (``$SLURM_JOB_ID`` recorded by the job itself,
  the extract shards as one job array, plugin logs, and slurmctld knows the jobs as
  COMPLETED in the run directory, partition ``debug``, no GPU in their TRES);
* a second run has nothing to do.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
OVERLAY = REPO / "tests" / "slurm" / "profile"
RUN_TIMEOUT_S = 300

SNAKEFILE = """\
SHARDS = [0, 1, 2]

rule all:
    input: "report.txt"

rule extract:
    output: "shard-{k}.txt"
    resources: gpu=1
    shell:
        "echo shard={wildcards.k} job=${{SLURM_JOB_ID:-none}} "
        "array=${{SLURM_ARRAY_JOB_ID:-none}} > {output}"

rule report:
    input: expand("shard-{k}.txt", k=SHARDS)
    output: "report.txt"
    shell: "cat {input} > {output}; echo rule=report job=${{SLURM_JOB_ID:-none}} >> {output}"
"""


def _cluster_problem() -> str | None:
    """Return why the SLURM tests cannot run here, or None when a node is usable."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client tools not installed (run: bash tests/slurm/setup_cluster.sh)"
    try:
        res = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s"
    if res.returncode != 0:
        return f"sinfo failed: {res.stderr.strip()}"
    states = res.stdout.split()
    if not any(s.rstrip("*~#!%$@^-").startswith(("idle", "mixed", "alloc")) for s in states):
        return f"no usable SLURM node (states: {states})"
    return None


_PROBLEM = _cluster_problem()
requires_cluster = pytest.mark.skipif(_PROBLEM is not None, reason=f"no SLURM cluster: {_PROBLEM}")


def _snakemake(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run snakemake with the SLURM profile and the test overlay in ``workdir``."""
    cmd = [
        sys.executable, "-m", "snakemake",
        "--profile", str(PROFILE),
        "--workflow-profile", str(OVERLAY),
        *extra,
    ]  # fmt: skip
    env = dict(os.environ, GRADSPACE_SLURM_ACCOUNT="", GRADSPACE_SLURM_PARTITION="")
    proc = subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGINT lets the plugin scancel its jobs before exiting.
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"snakemake did not finish within {RUN_TIMEOUT_S} s:\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def _fields(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split())


def _scontrol_job(job_id: str) -> dict[str, str]:
    res = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=15
    )
    assert res.returncode == 0, f"scontrol does not know job {job_id}: {res.stderr}"
    # An array's first task id also names the whole array: pick the task's own line.
    for line in res.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("JobId") == job_id:
            return fields
    raise AssertionError(f"job {job_id} not in scontrol output:\n{res.stdout}")


@requires_cluster
def test_profile_runs_workflow_through_sbatch(tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(SNAKEFILE)

    run = _snakemake(tmp_path)
    assert run.returncode == 0, f"snakemake failed:\n{run.stdout[-8000:]}"

    # Outputs were written by SLURM jobs.
    shard_lines = [(tmp_path / f"shard-{k}.txt").read_text().strip() for k in range(3)]
    shards = [_fields(line) for line in shard_lines]
    for k, f in enumerate(shards):
        assert f["shard"] == str(k)
        assert f["job"].isdigit(), f"shard {k} did not run under SLURM: {shard_lines[k]}"
    # The three extract jobs were submitted as one job array (slurm-array-jobs).
    array_ids = {f["array"] for f in shards}
    assert len(array_ids) == 1 and array_ids.pop().isdigit(), shard_lines
    assert len({f["job"] for f in shards}) == 3

    report = (tmp_path / "report.txt").read_text().splitlines()
    assert report[:3] == shard_lines
    report_job = _fields(report[3])["job"]
    assert report_job.isdigit() and report_job not in {f["job"] for f in shards}

    # The plugin kept one log per SLURM job (slurm-keep-successful-logs in the overlay).
    logs = sorted(
        p.relative_to(tmp_path).as_posix() for p in (tmp_path / ".snakemake" / "slurm_logs").rglob("*.log")
    )
    assert len([p for p in logs if p.startswith(".snakemake/slurm_logs/rule_extract/")]) == 3, logs
    assert f".snakemake/slurm_logs/rule_report/{report_job}.log" in logs, logs

    # slurmctld itself saw the jobs complete in this directory.
    for job_id in [report_job, *(f["job"] for f in shards)]:
        info = _scontrol_job(job_id)
        assert info["JobState"] == "COMPLETED", info
        assert Path(info["WorkDir"]).resolve() == tmp_path.resolve()
        assert info["Partition"] == "debug"
        assert info["JobName"].startswith("gradspace_")
        # gpu: 0 from the overlay overrides the rule's gpu=1: no GPU was requested.
        assert "gpu" not in info["TRES"] and "gpu" not in info.get("TresPerNode", ""), info

    # A second run finds everything up to date.
    again = _snakemake(tmp_path, "--dry-run")
    assert again.returncode == 0, again.stdout[-4000:]
    assert "Nothing to be done" in again.stdout, again.stdout[-4000:]
