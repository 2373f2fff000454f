"""Faults and bad input on a finished tiny run: corrupt stores are detected (never read as
data) and rebuilt; a changed shard count never mixes layouts (clear error naming the
dataset and both counts) and a consistent rerun after the change works."""

import csv
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, run_snakemake

pytestmark = pytest.mark.slow

R = Path("results/tiny")


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)  # copy2 keeps mtimes: nothing to be done
    return dst


def metrics(work: Path) -> list[dict]:
    with open(work / R / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_metrics(a, b, tol=1e-9):
    assert [(r["detector"], r["ood_dataset"]) for r in a] == [(r["detector"], r["ood_dataset"]) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for col in ("fpr95", "auroc", "aupr_in", "aupr_out"):
            assert float(ra[col]) == pytest.approx(float(rb[col]), abs=tol), (ra["detector"], col)


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and "benchmarks" not in p.parts}


def chunk_files(store: Path, array: str) -> list[Path]:
    return sorted(p for p in (store / array).rglob("*") if p.is_file() and p.name != "zarr.json")


def gradspace(work: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "gradspace"), *args], cwd=work, capture_output=True, text=True,
                          timeout=300)


def test_corrupt_stores_are_detected_and_rebuilt(tmp_path, tiny_workdir):
    work = copy_run(tiny_workdir, tmp_path / "corrupt")
    reference = metrics(work)
    truncated = R / "embeddings/textures/shard-0.zarr"
    flipped = R / "reduced/ag/digits8x8/shard-0.zarr"
    victim = chunk_files(work / truncated, "features")[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    victim = chunk_files(work / flipped, "reduced")[0]
    raw = bytearray(victim.read_bytes())
    for i in range(8, len(raw), 97):
        raw[i] ^= 0xFF  # bit flips, same size
    victim.write_bytes(bytes(raw))
    before = mtimes(work / R)

    # a job reading either store fails with an error naming it, it never reads it as data
    fitted = str(R / "detectors/feature/knn.npz")
    bad = gradspace(work, "score", "--fitted", fitted, "--shards", str(truncated), "--out", "x.npy")
    assert bad.returncode == 2 and f"store {truncated} is corrupt" in bad.stderr, bad.stderr
    assert "features/c/0/0 has" in bad.stderr
    assert "gradspace verify-stores results/tiny --remove" in bad.stderr
    bad = gradspace(work, "score", "--fitted", str(R / "detectors/ag/knn.npz"), "--shards", str(flipped),
                    "--out", "y.npy")
    assert bad.returncode == 2 and f"store {flipped} is corrupt" in bad.stderr, bad.stderr
    assert "cannot be decoded" in bad.stderr and "checksum" in bad.stderr
    assert not (work / "x.npy").exists() and not (work / "y.npy").exists()

    # the workflow's start-up check (sizes only) stops a run before any job starts
    run = run_snakemake(work, "--configfile", "config.yaml", "--cores", "2", "--forcerun", "report",
                        check=False)
    assert run.returncode != 0
    assert f"{truncated}: store {truncated} is corrupt" in run.stdout + run.stderr
    assert mtimes(work / R) == before  # nothing ran

    # verify-stores finds both (the full check reads the checksums) and removes exactly them
    check = gradspace(work, "verify-stores", str(R))
    assert check.returncode == 1
    broken = {line.split()[1].rstrip(":") for line in check.stdout.splitlines() if line.startswith("BROKEN")}
    assert broken == {str(truncated), str(flipped)}, check.stdout
    quick = gradspace(work, "verify-stores", str(R), "--quick")
    assert {line.split()[1].rstrip(":") for line in quick.stdout.splitlines()
            if line.startswith("BROKEN")} == {str(truncated)}
    removed = gradspace(work, "verify-stores", str(R), "--remove")
    assert removed.returncode == 0 and not (work / truncated).exists() and not (work / flipped).exists()

    # the next run rebuilds exactly those two stores and reruns what depends on them
    force = removed.stdout.rsplit("--forcerun", 1)[1].split()
    assert sorted(force) == sorted([str(truncated), str(flipped)]), removed.stdout
    plan = run_snakemake(work, "--configfile", "config.yaml", "-n", "--quiet", "rules",
                         "--forcerun", *force).stdout
    run_snakemake(work, "--configfile", "config.yaml", "--cores", "2", "--forcerun", *force)
    after = mtimes(work / R)
    rebuilt_stores = {k.split(".zarr")[0] + ".zarr" for k in after
                      if ".zarr" in k and after[k] != before.get(k)}
    assert rebuilt_stores == {str(truncated.relative_to(R)), str(flipped.relative_to(R))}, plan
    changed = {k for k in after if after[k] != before.get(k)}
    # upstream and unrelated outputs untouched: model, other shards, the subspaces
    for k in ("model/model.pt", "embeddings/id_train/shard-0.zarr/zarr.json",
              "embeddings/digits8x8/shard-0.zarr/zarr.json", "reduced/ag/textures/shard-0.zarr/zarr.json",
              "reduced/pca/digits8x8/shard-0.zarr/zarr.json", "subspace/ag/subspace.zarr/zarr.json"):
        assert k not in changed, k
    assert gradspace(work, "verify-stores", str(R)).returncode == 0
    assert_same_metrics(reference, metrics(work))
    assert "Nothing to be done" in run_snakemake(work, "--configfile", "config.yaml", "-n").stdout


def test_changed_shard_count_never_mixes_layouts(tmp_path, tiny_workdir):
    work = copy_run(tiny_workdir, tmp_path / "shards")
    reference = metrics(work)
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["data"]["ood"]["textures"]["shards"] = 2
    (work / "config2.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    # 1. Stale manifest: the preparation is not redone (here --rerun-triggers mtime, as after
    #    losing .snakemake/metadata), so the 1-shard manifest meets the 2-shard config.
    #    (A job that needs the missing shard: the textures kNN scores.)
    stale = run_snakemake(work, "--configfile", "config2.yaml", "--cores", "2", "--rerun-triggers", "mtime",
                          "--forcerun", str(R / "scores/feature/knn/textures.npy"), check=False)
    assert stale.returncode != 0
    log = (work / "logs/tiny/extract/textures/shard-1.log").read_text()
    assert ("inconsistent shard counts for dataset 'textures': the config asks for 2 shard(s), but "
            "its manifest results/tiny/data/textures/info.json was prepared with 1") in log, log[-2000:]
    assert "snakemake --forcerun results/tiny/data/textures" in log
    assert not (work / R / "embeddings/textures/shard-1.zarr").exists()

    # 2. A reader given shard stores of another layout refuses them: the old 1-shard store
    #    where the config now expects 2 shards.
    env = {"GRADSPACE_SHARDS": '{"textures": 2}'}
    bad = subprocess.run([str(BIN / "gradspace"), "score", "--fitted", str(R / "detectors/feature/knn.npz"),
                          "--shards", str(R / "embeddings/textures/shard-0.zarr"), "--out", "z.npy"],
                         cwd=work, capture_output=True, text=True, env={**os.environ, **env})
    assert bad.returncode == 2
    assert ("inconsistent shard counts for dataset 'textures': expected 2 shard store(s), found 1 "
            "written for a 1-shard manifest") in bad.stderr, bad.stderr

    # 3. The consistent rerun (default rerun triggers: the changed setting reruns the
    #    preparation and everything after it) works and gives the same metrics.
    run_snakemake(work, "--configfile", "config2.yaml", "--cores", "2")
    for k in range(2):
        store = work / R / f"embeddings/textures/shard-{k}.zarr"
        from gradspace.store import open_store

        lay = dict(open_store(store).attrs)["layout"]
        assert lay["shards"] == 2 and lay["shard"] == k and lay["rows"] == [60 * k, 60 * (k + 1)]
    assert_same_metrics(reference, metrics(work), tol=1e-6)
