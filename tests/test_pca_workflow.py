"""The PCA stage as Snakemake runs it (issues "A subspace you can trust" and "ImageNet scale
for real"): `iterations: auto` stops at subspace.tol, resumes after a kill in the middle,
continues or shortens when the tolerance changes without redoing finished passes, and the
disk written by the subspace stages does not grow with the number of ID-train shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, TINY, incomplete_outputs, run_snakemake, snakemake_cmd

PCA = "results/pcawf/subspace/pca"


def _config(work: Path, name="config.yaml", **subspace):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["experiment"] = "pcawf"
    cfg["subspace"].update({"types": ["pca"], "k": 8, "oversample": 8, "iterations": "auto",
                            "tol": 0.05, "max_iterations": 8, **subspace})
    (work / name).write_text(yaml.safe_dump(cfg))
    return name


def _diag(work: Path, t: int) -> dict:
    return json.loads((work / PCA / f"diagnostics/pass-{t:03d}.json").read_text())


def _passes(work: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (work / PCA / "diagnostics").glob("pass-*.json"))


def _mtimes(work: Path, paths) -> dict:
    return {p: (work / p / "zarr.json").stat().st_mtime_ns for p in paths}


def _first_converged(work: Path, tol: float, cap: int) -> int:
    for t in range(1, cap + 1):
        r = _diag(work, t)["max_residual"]
        if r is not None and r <= tol:
            return t
    return cap


@pytest.mark.slow
def test_auto_iterations_stop_resume_and_follow_tol(tmp_path):
    work = tmp_path / "auto"
    work.mkdir()
    _config(work)
    target = f"{PCA}/subspace.zarr"

    # kill the run once pass 1 has been reduced (a later pass is running or about to)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", GRADSPACE_THREADS="1")
    proc = subprocess.Popen(snakemake_cmd("--directory", str(work), "--configfile", "config.yaml",
                                          "--cores", "2", target),
                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while not (work / PCA / "diagnostics/pass-001.json").exists():
        assert proc.poll() is None, "the workflow ended before pass 1 was reduced"
        assert time.time() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (work / target).exists()
    # a job killed after writing its outputs but before Snakemake recorded its success is
    # marked incomplete and rightly redone: not finished work
    incomplete = incomplete_outputs(work, "")
    done = [p for p in (f"{PCA}/krylov/pass-{t:03d}.zarr" for t in _passes(work))
            if not any(p.startswith(i.rstrip("/")) for i in incomplete)]
    assert done, "pass 0 was finished before the kill"
    before = _mtimes(work, done)
    run_snakemake(work, "--configfile", "config.yaml", "--unlock")
    run_snakemake(work, "--configfile", "config.yaml", "--cores", "2", target)
    assert _mtimes(work, done) == before  # passes finished before the kill were not redone

    passes = _passes(work)
    final = json.loads((work / target / "zarr.json").read_text())["attributes"]
    T = _first_converged(work, 0.05, 8)
    assert passes == list(range(T + 1)), "stops at the first pass meeting the tolerance"
    assert final["iterations"] == T and final["passes"] == T + 2 and final["tol"] == 0.05
    assert final["converged"] and final["max_residual"] <= 0.05 and not final["unconverged"]
    assert [c["pass"] for c in final["convergence"]] == passes
    # disk: the kept bases are the one after the last pass (to continue) and the result;
    # every pass part and older basis is gone
    assert [p.parent.name for p in (work / PCA).glob("pass-*/V-next.zarr")] == [f"pass-{T:03d}"]
    assert not list((work / PCA).glob("pass-*/part-*.zarr")) and not list((work / PCA).glob("lift/*/*"))

    # a tighter tolerance continues from the last pass: no finished pass is redone
    done = [f"{PCA}/krylov/pass-{t:03d}.zarr" for t in passes]
    before = _mtimes(work, done)
    _config(work, tol=0.005)
    proc = run_snakemake(work, "--configfile", "config.yaml", "--cores", "2", target)
    assert _mtimes(work, done) == before
    T2 = _first_converged(work, 0.005, 8)
    assert T2 > T and _passes(work) == list(range(T2 + 1))
    final = json.loads((work / target / "zarr.json").read_text())["attributes"]
    assert final["iterations"] == T2 and final["tol"] == 0.005
    assert final["converged"] == (final["max_residual"] <= 0.005)

    # a looser tolerance only lifts an earlier pass again: no data pass runs
    _config(work, tol=0.5)
    proc = run_snakemake(work, "--configfile", "config.yaml", "--cores", "2", target)
    assert "rule pca_pass" not in proc.stdout + proc.stderr
    assert "pca_lift" in proc.stdout + proc.stderr
    final = json.loads((work / target / "zarr.json").read_text())["attributes"]
    assert final["iterations"] == _first_converged(work, 0.5, 8) < T


@pytest.mark.slow
def test_fixed_iterations_warn_when_unconverged(tmp_path):
    work = tmp_path / "fixed"
    work.mkdir()
    _config(work, iterations=1, tol=1e-6)
    target = f"{PCA}/subspace.zarr"
    run_snakemake(work, "--configfile", "config.yaml", "--cores", "2", target)
    final = json.loads((work / target / "zarr.json").read_text())["attributes"]
    assert final["iterations"] == 1 and final["passes"] == 3 and final["converged"] is False
    assert final["unconverged"]
    log = (work / "logs/pcawf/subspace/pca_finalize.log").read_text()
    assert "did not meet subspace.tol" in log


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
def test_subspace_disk_does_not_grow_with_the_shard_count(tmp_path):
    """Bytes the statistics, AG and PCA stages write (every temporary output kept with
    --notemp) and bytes left on disk after a normal run: the same at 2 and 6 ID-train shards."""
    written, kept = {}, {}
    for shards in (2, 6):
        for notemp in (True, False):
            work = tmp_path / f"s{shards}-{notemp}"
            work.mkdir()
            cfg = yaml.safe_load(TINY.read_text())
            cfg["experiment"] = "pcawf"
            cfg["data"]["id"]["shards"] = shards
            cfg["subspace"].update({"types": ["pca", "ag"], "k": 8, "oversample": 8, "iterations": 2})
            (work / "config.yaml").write_text(yaml.safe_dump(cfg))
            targets = [f"results/pcawf/subspace/{s}/subspace.zarr" for s in ("pca", "ag")]
            run_snakemake(work, "--configfile", "config.yaml", "--cores", "2", *targets,
                          *(["--notemp"] if notemp else []),
                          env={"GRADSPACE_KEEP_CONSUMED": "1" if notemp else "0"})
            size = _du(work / "results/pcawf/subspace")
            (written if notemp else kept)[shards] = size
    V = 103_466 * 16 * 4  # one P x K' float32 basis of the demo CNN
    assert abs(written[6] - written[2]) <= 0.02 * written[2], written
    assert abs(kept[6] - kept[2]) <= 0.02 * kept[2], kept
    # 3 passes + the lift write about one partial and one basis each, plus AG and the stats
    assert written[2] < 12 * V, (written, V)
