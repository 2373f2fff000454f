"""Parameter-block jobs in the real workflow (``subspace.block_jobs``): the DAG gets one PCA
product job per (iteration, shard, block group) in two phases and one projection job per
(subspace, dataset, shard, block group) plus a merge, and the run yields the same PCA
subspace and the same reduced gradients as the default single-job run."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest
import yaml

from conftest import REPO, TINY, planned_jobs, run_snakemake

SPACES = ("pca", "ag")
SHARDS = {"id_train": 2, "id_test": 2, "textures": 1, "digits8x8": 1}
BLOCK_RULES = {"pca_gv", "pca_pass_block", "project_block", "project_merge"}


def write_config(path, **subspace):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["subspace"].update(subspace)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def blocks_of(group):
    return {k.split(".", 1)[1]: np.asarray(group[k][...], np.float64) for k in group.array_keys()
            if k.startswith("V.")}


def basis(group):
    V = blocks_of(group)
    return np.concatenate([V[b] for b in sorted(V)])


def sine(A, B):
    """sin of the largest principal angle between orthonormal bases, ‖(I − A Aᵀ) B‖₂."""
    return float(np.linalg.norm(B - A @ (A.T @ B), 2))


def test_default_dag_has_no_block_jobs(tmp_path):
    shutil.copy(TINY, tmp_path / "config.yaml")
    rules = Counter(r for r, _ in planned_jobs(tmp_path))
    assert not BLOCK_RULES & set(rules)
    # one pass job per pass (data_parts = 1) whatever the ID-train shard count: passes 0..2
    assert rules["pca_pass"] == 3 and rules["project"] == 2 * sum(SHARDS.values())


def test_named_block_groups_plan_one_job_per_group(tmp_path):
    write_config(tmp_path / "config.yaml", block_jobs={"convs": ["block1", "block2", "block3"],
                                                       "top": ["block4", "head"]})
    jobs = planned_jobs(tmp_path)
    groups = {wc["group"] for r, wc in jobs if r in BLOCK_RULES - {"project_merge"}}
    assert groups == {"convs", "top"}


def test_lint_is_clean_with_block_groups(tmp_path):
    write_config(tmp_path / "split.yaml", block_jobs=2)
    proc = run_snakemake(REPO, "--lint", "--configfile", str(tmp_path / "split.yaml"), check=False,
                         timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Congratulations" in out, out


@pytest.mark.slow
def test_block_groups_give_the_same_subspace_and_reduced_gradients(tiny_workdir, tmp_path):
    from gradspace.store import open_store

    work = tmp_path / "split"
    shutil.copytree(tiny_workdir, work, symlinks=True)  # model, data, statistics and metadata
    write_config(work / "config.yaml", block_jobs=2)
    res = work / "results" / "tiny"
    shutil.rmtree(res / "subspace" / "pca")
    shutil.rmtree(res / "reduced")

    jobs = planned_jobs(work)
    rules = Counter(r for r, _ in jobs)
    assert "pca_pass" not in rules and "project" not in rules
    its, groups = {"000", "001", "002"}, {"0", "1"}
    for rule in ("pca_gv", "pca_pass_block"):
        seen = {(wc["it"], wc["part"], wc["group"]) for r, wc in jobs if r == rule}
        assert seen == {(t, "0", g) for t in its for g in groups}, rule
    assert {wc["group"] for r, wc in jobs if r == "pca_lift"} == groups
    seen = {(wc["space"], wc["dataset"], wc["shard"], wc["group"]) for r, wc in jobs if r == "project_block"}
    assert seen == {(sp, ds, str(k), g) for sp in SPACES for ds, n in SHARDS.items() for k in range(n)
                    for g in groups}
    assert rules["project_merge"] == 2 * sum(SHARDS.values())
    assert rules["pca_reduce"] == 3 and rules["pca_finalize"] == 1
    # the grouping does not touch the upstream stages
    assert not {"train", "prepare", "gradstats_partial", "gradstats_reduce", "ag_reduce"} & set(rules)

    targets = ["results/tiny/subspace/pca/subspace.zarr"]
    targets += [f"results/tiny/reduced/{sp}/{ds}/shard-{k}.zarr" for sp in SPACES for ds, n in SHARDS.items()
                for k in range(n)]
    run_snakemake(work, "--configfile", "config.yaml", "--cores", "2", *targets)

    base = tiny_workdir / "results" / "tiny"
    a, b = open_store(base / "subspace/pca/subspace.zarr"), open_store(res / "subspace/pca/subspace.zarr")
    Va, Vb = basis(a), basis(b)
    assert Va.shape == Vb.shape == (Va.shape[0], 8)
    assert sine(Va, Vb) < 1e-5
    np.testing.assert_allclose(b.attrs["eigenvalues"], a.attrs["eigenvalues"], rtol=1e-5)
    signs = {"pca": np.sign(np.einsum("pk,pk->k", Va, Vb)), "ag": 1.0}
    for sp in SPACES:
        for ds, n in SHARDS.items():
            for k in range(n):
                ra = open_store(base / f"reduced/{sp}/{ds}/shard-{k}.zarr")
                rb = open_store(res / f"reduced/{sp}/{ds}/shard-{k}.zarr")
                assert len(rb.attrs["blocks"]) == len(ra.attrs["blocks"])
                assert np.array_equal(np.asarray(ra["index"]), np.asarray(rb["index"]))
                x = np.asarray(ra["reduced"], np.float64)
                y = np.asarray(rb["reduced"], np.float64) * signs[sp]
                np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5 * np.abs(x).max(), err_msg=f"{sp}/{ds}")
                np.testing.assert_allclose(np.asarray(rb["gnorm2"]), np.asarray(ra["gnorm2"]), rtol=1e-6)
