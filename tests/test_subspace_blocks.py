"""Parameter-block groups of the subspace stage (``subspace.block_jobs``): the grouping of
the layout's blocks, and the two-phase per-group products and per-group projections of
the CLI against the single-job commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gradspace.cli import main
from gradspace.errors import ConfigError
from gradspace.store import open_store
from gradspace.subspace.layout import ParamLayout, _min_max_partition

models = pytest.importorskip("gradspace.models")

P = {"mean": [0.1307], "std": [0.3081], "batch_size": 16, "device": "cpu"}


def run(*args):
    assert main([str(a) for a in args]) == 0, args


def toy_layout(sizes):
    names = [f"p{i}" for i in range(len(sizes))]
    return ParamLayout(names, [(s,) for s in sizes], [(f"{i:02d}_b{i}", [i]) for i in range(len(sizes))])


def test_min_max_partition_is_optimal_and_contiguous():
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(30):
        m = int(rng.integers(1, 8))
        sizes = [int(s) for s in rng.integers(1, 100, m)]
        for n in range(1, m + 1):
            cuts = _min_max_partition(sizes, n)
            assert cuts[0] == 0 and cuts[-1] == m and all(a < b for a, b in zip(cuts, cuts[1:], strict=False))
            got = max(sum(sizes[a:b]) for a, b in zip(cuts, cuts[1:], strict=False))
            best = min(max(sum(sizes[a:b]) for a, b in zip((0, *c), (*c, m), strict=True))
                       for c in itertools.combinations(range(1, m), n - 1))
            assert got == best


def test_block_groups_integer_and_named():
    lay = toy_layout([352, 9280, 18560, 73984, 1290])
    assert lay.block_groups(1) == {"0": lay.block_names}
    assert lay.block_groups(2) == {"0": ["00_b0", "01_b1", "02_b2"], "1": ["03_b3", "04_b4"]}
    named = lay.block_groups({"conv": ["b1", "00_b0", "b2"], "rest": ["b3", "b4"]})
    assert named == {"conv": ["00_b0", "01_b1", "02_b2"], "rest": ["03_b3", "04_b4"]}
    assert lay.select_blocks(group={"groups": 2, "group": "1"}) == ["03_b3", "04_b4"]
    assert lay.select_blocks(group={"groups": 2, "group": 1}) == ["03_b3", "04_b4"]
    assert lay.select_blocks("b4,00_b0") == ["04_b4", "00_b0"]
    with pytest.raises(ConfigError, match="exceeds the 5 parameter blocks"):
        lay.block_groups(6)
    with pytest.raises(ConfigError, match="missing: \\['04_b4'\\]"):
        lay.block_groups({"a": ["b0", "b1", "b2"], "b": ["b3"]})
    with pytest.raises(ConfigError, match="repeated"):
        lay.block_groups({"a": ["b0", "b1", "b2", "b3"], "b": ["b3", "b4"]})
    with pytest.raises(ConfigError, match="unknown parameter block group"):
        lay.select_blocks(group={"groups": 2, "group": "2"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from gradspace.data import prepare_dataset
    from gradspace.models import save_model
    from gradspace.models.architectures import build_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("subspace_blocks")
    common = {"source": {"kind": "mnist_demo"}, "num_classes": 10, "test_fraction": 0.2,
              "train_subsample": 60, "shards": 2, "image_size": 12, "channels": 1}
    prepare_dataset("id_train", {"role": "id_train", **common}, seed=0, out=root / "id_train")
    torch.manual_seed(0)
    save_model(root / "model.pt", build_model("small_cnn", 10, 1, widths=(4, 6, 8)))
    sp = json.dumps({**P, "blocks": "stages"})
    for s in (0, 1):
        run("gradstats-partial", "--model", root / "model.pt", "--data-dir", root / "id_train", "--shards", s,
            "--params", sp, "--out", root / f"stats/partial/shard-{s}.npz")
    run("gradstats-reduce", "--partials", *(root / f"stats/partial/shard-{s}.npz" for s in (0, 1)),
        "--out", root / "stats/stats.zarr")
    run("pca-init", "--stats", root / "stats/stats.zarr", "--params", '{"k": 4, "oversample": 4, "seed": 0}',
        "--out", root / "V-000.zarr")
    # a PCA subspace for the projection tests: passes 0 and 1 with one data part holding
    # both shards, the lift and the finalize
    stats, basis, krylov = root / "stats/stats.zarr", root / "V-000.zarr", []
    for t in (0, 1):
        part = root / f"pass-{t}/part-0.zarr"
        run("pca-pass", "--model", root / "model.pt", "--data-dir", root / "id_train", "--shards", 0, 1,
            "--stats", stats, "--basis", basis, "--params", json.dumps(P), "--out", part)
        basis = root / f"pass-{t}/V-next.zarr"
        run("pca-reduce", "--parts", part, *(["--krylov", *krylov] if krylov else []), "--stats", stats,
            "--out-basis", basis, "--out-krylov", root / f"krylov-{t}.zarr",
            "--diagnostics", root / f"diag-{t}.json")
        krylov.append(root / f"krylov-{t}.zarr")
    run("pca-lift", "--model", root / "model.pt", "--data-dir", root / "id_train", "--shards", 0, 1,
        "--stats", stats, "--krylov", krylov[-1], "--params", json.dumps(P), "--out", root / "lift.zarr")
    run("pca-finalize", "--parts", root / "lift.zarr", "--krylov", krylov[-1], "--stats", stats,
        "--out", root / "subspace.zarr")
    return root


def _W(path):
    g = open_store(path)
    return {k: np.asarray(g[k][...]) for k in g.array_keys()}, dict(g.attrs)


GROUPS = {"convs": ["block1", "block2"], "top": ["block3", "head"]}


@pytest.mark.parametrize("method,groups", [("jvp_vjp", 2), ("persample", GROUPS)])
def test_two_phase_group_partials_equal_the_single_job(setup, method, groups):
    """Σ over groups of the phase-2 partials G_bᵀ(Σ_g G_g V_g) = the one-job Gᵀ(G V), per
    shard and block; the reduce over (shard, group) partials gives the same V_1."""
    r = setup
    model, tr, stats, V0 = r / "model.pt", r / "id_train", r / "stats/stats.zarr", r / "V-000.zarr"
    pm = json.dumps({**P, "method": method})
    out = r / f"{method}-{'named' if isinstance(groups, dict) else groups}"
    names = list(groups) if isinstance(groups, dict) else [str(i) for i in range(groups)]
    whole, split, gvs = [], [], []
    for s in (0, 1):
        whole.append(out / f"whole-{s}.zarr")
        run("pca-pass", "--model", model, "--data-dir", tr, "--shards", s, "--stats", stats, "--basis", V0,
            "--params", pm, "--out", whole[-1])
        gv = []
        for g in names:
            gv.append(out / f"gv-{g}-{s}.zarr")
            run("pca-gv", "--model", model, "--data-dir", tr, "--shards", s, "--stats", stats, "--basis", V0,
                "--block-group", json.dumps({"groups": groups, "group": g}), "--params", pm, "--out", gv[-1])
        gvs += gv
        for g in names:
            split.append(out / f"partial-{g}-{s}.zarr")
            run("pca-pass", "--model", model, "--data-dir", tr, "--shards", s, "--stats", stats,
                "--basis", V0, "--gv", *gv, "--block-group", json.dumps({"groups": groups, "group": g}),
                "--params", pm, "--out", split[-1])
        ref, _ = _W(whole[-1])
        ref = {k: v for k, v in ref.items() if k.startswith("W.")}
        got = {}
        for g in names:
            w, attrs = _W(out / f"partial-{g}-{s}.zarr")
            assert attrs["n"] == 30 and attrs["iteration"] == 0 and len(attrs["blocks"]) < 4
            assert not attrs["images"]  # the images of a block-group pass are in its gv parts
            got.update(w)
        assert sorted(got) == sorted(ref)
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=2e-4, atol=1e-5 * np.abs(ref[k]).max())
    for name, parts, extra in (("whole", whole, []), ("split", split, ["--gv", *gvs])):
        run("pca-reduce", "--parts", *parts, *extra, "--stats", stats, "--out-basis", out / f"V1-{name}.zarr",
            "--out-krylov", out / f"K0-{name}.zarr", "--diagnostics", out / f"d0-{name}.json")
    a, _ = _W(out / "V1-whole.zarr")
    b, _ = _W(out / "V1-split.zarr")
    A = np.concatenate([a[k] for k in sorted(a)]).astype(np.float64)
    B = np.concatenate([b[k] for k in sorted(b)]).astype(np.float64)
    assert sine(A, B) < 1e-5
    ka, kb = open_store(out / "K0-whole.zarr"), open_store(out / "K0-split.zarr")
    np.testing.assert_array_equal(np.asarray(ka["index"]), np.arange(60))
    np.testing.assert_allclose(np.asarray(kb["Y"]), np.asarray(ka["Y"]), rtol=1e-4,
                               atol=1e-5 * np.abs(np.asarray(ka["Y"])).max())


def sine(A, B):
    """sin of the largest principal angle, ‖(I − A Aᵀ) B‖₂ for orthonormal A, B (linear in the
    difference, unlike (1 − σ_min(AᵀB)²)^½, which float32 storage floors at ~1e-4)."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    return float(np.linalg.norm(B - A @ (A.T @ B), 2))


def test_gv_parts_must_cover_every_block(setup, capsys):
    r = setup
    model, tr, stats, V0 = r / "model.pt", r / "id_train", r / "stats/stats.zarr", r / "V-000.zarr"
    grp = json.dumps({"groups": 2, "group": 0})
    run("pca-gv", "--model", model, "--data-dir", tr, "--shards", 0, "--stats", stats, "--basis", V0,
        "--block-group", grp, "--params", json.dumps(P), "--out", r / "gv-only0.zarr")
    code = main([str(x) for x in ("pca-pass", "--model", model, "--data-dir", tr, "--shards", 0, "--stats",
                                  stats, "--basis", V0, "--gv", r / "gv-only0.zarr", "--block-group", grp,
                                  "--params", json.dumps(P), "--out", r / "bad.zarr")])
    assert code == 2 and "expected each of" in capsys.readouterr().err and not (r / "bad.zarr").exists()
    code = main([str(x) for x in ("pca-pass", "--model", model, "--data-dir", tr, "--shards", 1, "--stats",
                                  stats, "--basis", V0, "--gv", r / "gv-only0.zarr", "--block-group", grp,
                                  "--params", json.dumps(P), "--out", r / "bad.zarr")])
    assert code == 2 and "shard 0, expected 1" in capsys.readouterr().err


def test_projection_per_group_and_merge(setup):
    r = setup
    model, tr, stats, V0 = r / "model.pt", r / "id_train", r / "stats/stats.zarr", r / "subspace.zarr"
    run("project", "--model", model, "--data-dir", tr, "--shard", 1, "--stats", stats, "--subspace", V0,
        "--params", json.dumps(P), "--out", r / "proj/whole.zarr")
    parts = []
    for g in ("0", "1"):
        parts.append(r / f"proj/group-{g}.zarr")
        run("project", "--model", model, "--data-dir", tr, "--shard", 1, "--stats", stats, "--subspace", V0,
            "--block-group", json.dumps({"groups": 2, "group": g}), "--params", json.dumps(P),
            "--out", parts[-1])
    run("project-merge", "--parts", *parts, "--subspace", V0, "--out", r / "proj/merged.zarr")
    w, m = open_store(r / "proj/whole.zarr"), open_store(r / "proj/merged.zarr")
    np.testing.assert_allclose(np.asarray(m["reduced"]), np.asarray(w["reduced"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(m["gnorm2"]), np.asarray(w["gnorm2"]), rtol=1e-6)
    assert np.array_equal(np.asarray(m["index"]), np.asarray(w["index"]))
    assert dict(m.attrs)["blocks"] == dict(w.attrs)["blocks"]
