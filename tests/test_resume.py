"""Local resume: SIGKILL a run in the middle of an extraction, a power iteration and a
projection job; each rerun completes what is left without touching finished outputs,
and the final results equal those of an uninterrupted run."""

import csv
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, TINY, incomplete_outputs, run_snakemake, snakemake_cmd


def snapshot(results: Path) -> dict:
    """path -> (sha256, mtime_ns) of every file of every finished output."""
    out = {}
    for p in sorted(results.rglob("*")):
        if p.is_file() and ".tmp-" not in str(p) and "/benchmarks/" not in str(p):
            out[str(p.relative_to(results))] = (hashlib.sha256(p.read_bytes()).hexdigest(),
                                                p.stat().st_mtime_ns)
    return out


def released(path: str) -> bool:
    """Outputs the workflow deletes once consumed (io.release_consumed): PCA bases, pass
    and lift parts, AG partials."""
    return path.startswith(("subspace/pca/V-init.zarr", "subspace/pca/pass-", "subspace/pca/lift/",
                            "subspace/ag/partial/"))


def run_until_paused(workdir: Path, point: str, timeout=600):
    """Start the workflow with a pause injected at ``point``; return once a job sits there."""
    marker = workdir / f"paused-{point}"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               GRADSPACE_THREADS="1", GRADSPACE_PAUSE_AT=point, GRADSPACE_PAUSE_MARKER=str(marker),
               GRADSPACE_PAUSE_SECONDS="600")
    proc = subprocess.Popen(snakemake_cmd("--directory", str(workdir), "--configfile", "config.yaml",
                                          "--cores", "2"),
                            cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"workflow ended (rc {proc.returncode}) before reaching {point}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no job reached {point} within {timeout}s")
        time.sleep(0.2)
    time.sleep(0.5)
    return proc


def kill_run(proc):
    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and all its jobs, like a lost node
    proc.wait()


def assert_no_false_complete(results: Path):
    """Every shard store at its final path is complete; a half-written one only exists
    under a temporary name."""
    from gradspace.store import open_store

    for kind in ("embeddings", "gradscores", "reduced"):
        for store in (results / kind).rglob("shard-*.zarr") if (results / kind).exists() else []:
            if not store.name.startswith("."):
                open_store(store)  # raises StoreError for an incomplete store


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tmp_path, tiny_workdir):
    work = tmp_path / "resume"
    work.mkdir()
    shutil.copy(TINY, work / "config.yaml")
    results = work / "results" / "tiny"

    def settled(snap):
        # a job killed after renaming its store into place but before Snakemake recorded
        # its success is marked incomplete and rightly redone: not finished work
        incomplete = incomplete_outputs(work, "results/tiny/")
        return {k: v for k, v in snap.items() if not any(k.startswith(i) for i in incomplete)}

    for point in ("extract", "pca-pass", "project"):
        before = settled(snapshot(results)) if results.exists() else {}
        proc = run_until_paused(work, point)
        finished = snapshot(results)
        kill_run(proc)
        assert_no_false_complete(results)
        finished = settled(finished)
        # outputs that were finished before the kill are untouched by it
        assert {k: v for k, v in snapshot(results).items() if k in finished} == finished
        run_snakemake(work, "--configfile", "config.yaml", "--unlock")
        # what finished in earlier rounds was not redone by the later rounds (consumed PCA
        # bases and pass parts are released by design once the next pass has read them)
        after_round = snapshot(results)
        assert {k: after_round[k] for k in before if not released(k)} == \
            {k: v for k, v in before.items() if not released(k)}

    done_before = settled(snapshot(results))
    run_snakemake(work, "--configfile", "config.yaml", "--cores", "2")
    final = snapshot(results)
    kept = {k: v for k, v in done_before.items() if not released(k)}
    assert {k: final[k] for k in kept} == kept  # finished work not redone

    # the PCA subspace of the resumed run equals the uninterrupted run's
    import numpy as np
    import zarr

    ref = zarr.open_group(str(tiny_workdir / "results/tiny/subspace/pca/subspace.zarr"), mode="r")
    got = zarr.open_group(str(results / "subspace/pca/subspace.zarr"), mode="r")
    assert sorted(ref.array_keys()) == sorted(got.array_keys())
    for name in ref.array_keys():
        np.testing.assert_array_equal(np.asarray(ref[name][...]), np.asarray(got[name][...]))

    def metrics(path):
        with open(path, newline="") as fh:
            return [{k: v for k, v in r.items()} for r in csv.DictReader(fh)]

    reference = metrics(tiny_workdir / "results" / "tiny" / "metrics.csv")
    resumed = metrics(results / "metrics.csv")
    assert len(reference) == len(resumed)
    for a, b in zip(reference, resumed, strict=True):
        assert a["detector"] == b["detector"] and a["ood_dataset"] == b["ood_dataset"]
        for col in ("fpr95", "auroc", "aupr_in", "aupr_out"):
            assert float(a[col]) == pytest.approx(float(b[col]), abs=1e-9), (a["detector"], col)
