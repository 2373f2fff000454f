"""Jobs killed by SLURM for memory or time are resubmitted by Snakemake with more.

A real rule of the workflow (``prepare`` of one OOD set of the tiny config) runs through
profiles/slurm plus the test overlay on the one-node cluster of
tests/slurm/setup_cluster.sh, which enforces limits without cgroups
(``JobAcctGatherType=jobacct_gather/linux``, ``JobAcctGatherParams=OverMemoryKill``,
``OverTimeLimit=0``). The job's first attempt gets too little, through ``--set-resources``
with expressions of ``attempt`` as in the profile; the fault-injection pause point of
``prepare`` (``gradspace.runtime.pause_point``) makes every attempt need the same
memory (``GRADSPACE_PAUSE_ALLOC_MB``) or time (``GRADSPACE_PAUSE_SECONDS``):

* memory: ``mem_mb = 2000 * attempt``, the job holds 2500 MB -> attempt 1 is killed by
  slurmstepd ("exceeded memory limit"; SLURM 22.05 without cgroups reports the job as
  FAILED, newer versions / task/cgroup as OUT_OF_MEMORY), attempt 2 (4000 MB) finishes;
* time: ``runtime = 4 * attempt - 3`` minutes, the job sleeps 150 s -> attempt 1 ends in
  state TIMEOUT (TimeLimit 1 min), attempt 2 (5 min) finishes.

Both runs go concurrently in two directories (the time run takes about 4 minutes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, REPO, TINY, snakemake_cmd

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM_ARGS = ("--profile", str(REPO / "profiles" / "slurm"),
              "--workflow-profile", str(REPO / "tests" / "slurm" / "profile"))
TARGET = "results/tiny/data/textures"


def _problem():
    if shutil.which("sinfo") is None:
        return "SLURM client tools not installed (bash tests/slurm/setup_cluster.sh)"
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
        conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer"
    if res.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in res.stdout.split()):
        return f"no usable SLURM node: {res.stdout.strip()} {res.stderr.strip()}"
    if "OverMemoryKill" not in conf.stdout and "cgroup" not in conf.stdout:
        return "the cluster does not enforce memory limits (rerun tests/slurm/setup_cluster.sh)"
    return None


_PROBLEM = _problem()
requires_cluster = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


def _start(work: Path, resources: list[str], **fault) -> subprocess.Popen:
    shutil.copy(TINY, work / "config.yaml")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               GRADSPACE_SLURM_ACCOUNT="", GRADSPACE_SLURM_PARTITION="",
               GRADSPACE_PAUSE_AT="prepare", GRADSPACE_PAUSE_MARKER=str(work / "attempts"),
               **fault)
    cmd = snakemake_cmd(TARGET, "--directory", str(work), "--configfile", "config.yaml", *SLURM_ARGS,
                        "--set-resources", *resources)  # (nargs="+": the target goes first)
    return subprocess.Popen(cmd, cwd=work, env=env, stdout=open(work / "snakemake.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                         timeout=15).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _attempts(work: Path) -> list[tuple[str, dict, str]]:
    """(SLURM job id, scontrol fields, plugin log text) of every prepare job, in order."""
    logs = sorted((work / ".snakemake" / "slurm_logs").rglob("*.log"),
                  key=lambda p: int(p.stem.split("_")[0]))
    assert all("rule_prepare" in str(p) for p in logs), logs
    return [(p.stem, _job(p.stem), p.read_text(errors="replace")) for p in logs]


@requires_cluster
def test_jobs_killed_for_memory_or_time_are_retried_with_more(tmp_path):
    mem_dir, time_dir = tmp_path / "memory", tmp_path / "time"
    mem_dir.mkdir()
    time_dir.mkdir()
    t0 = time.time()
    runs = {
        "memory": _start(mem_dir, ["prepare:mem_mb=2000*attempt", "prepare:runtime=10*attempt"],
                         GRADSPACE_PAUSE_ALLOC_MB="2500", GRADSPACE_PAUSE_SECONDS="5"),
        # slurmctld enforces time limits in periodic passes, not at the limit itself: a
        # 1-minute job that slept 70 s once finished (77 s) before a pass killed it. So
        # attempt 1 sleeps 150 s, well past the next pass; attempt 2 (5 minutes) has room
        "time": _start(time_dir, ["prepare:mem_mb=2000*attempt", "prepare:runtime=4*attempt-3"],
                       GRADSPACE_PAUSE_SECONDS="150"),
    }
    for name, proc in runs.items():
        try:
            rc = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 2)  # SIGINT: the plugin cancels its jobs
            proc.wait(timeout=60)
            rc = "timeout"
        work = mem_dir if name == "memory" else time_dir
        assert rc == 0, f"{name} run failed ({rc}):\n{(work / 'snakemake.log').read_text()[-6000:]}"
    elapsed = time.time() - t0

    for work in (mem_dir, time_dir):
        assert (work / TARGET / "info.json").exists()
        assert len((work / "attempts").read_text().splitlines()) == 2  # two attempts reached the job
        log = (work / "snakemake.log").read_text()
        # Snakemake reported the failure and resubmitted with the second attempt's resources.
        # The job's resources are printed at submission and again where the failed job's log
        # is shown (show-failed-logs, as many times as it got to print them): every mention
        # before the restart has attempt 1's values, every one after it attempt 2's.
        assert log.count("Trying to restart job") == 1, log[-4000:]
        before, after = log.split("Trying to restart job")
        mem = [set(re.findall(r"resources: .*mem_mb=(\d+)", part)) for part in (before, after)]
        assert mem == [{"2000"}, {"4000"}], log[-4000:]
        runtimes = [set(re.findall(r"resources: .*runtime=(\d+)", part)) for part in (before, after)]
        assert runtimes == ([{"10"}, {"20"}] if work == mem_dir else [{"1"}, {"5"}]), log[-4000:]

    first, second = _attempts(mem_dir)
    assert first[1]["JobState"] in ("OUT_OF_MEMORY", "FAILED"), first[1]
    assert "exceeded memory limit" in first[2].lower(), first[2][-2000:]
    assert first[1]["MinMemoryNode"] == "2000M" and second[1]["MinMemoryNode"] == "4000M"
    assert second[1]["JobState"] == "COMPLETED", second[1]

    first, second = _attempts(time_dir)
    assert first[1]["JobState"] == "TIMEOUT", first[1]
    assert "DUE TO TIME LIMIT" in first[2], first[2][-2000:]
    assert first[1]["TimeLimit"] == "00:01:00" and second[1]["TimeLimit"] == "00:05:00"
    assert second[1]["JobState"] == "COMPLETED", second[1]
    print(f"memory and time retries finished in {elapsed:.0f}s")
