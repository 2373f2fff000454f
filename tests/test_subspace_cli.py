"""The subspace CLI commands end to end on a tiny prepared dataset: statistics, PCA
iterations (unrolled), AG, projection (whole and per block), diagnostics, gradient-space
detectors through the generic fit/score commands, ensemble."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gradspace.cli import main
from gradspace.store import open_store

models = pytest.importorskip("gradspace.models")
if not hasattr(models, "load_model"):
    pytest.skip("gradspace.models.load_model not available", allow_module_level=True)

P = {"mean": [0.1307], "std": [0.3081], "batch_size": 16, "device": "cpu"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from gradspace.data import prepare_dataset
    from gradspace.models import save_model
    from gradspace.models.architectures import build_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("subspace_cli")
    common = {"source": {"kind": "mnist_demo"}, "num_classes": 10, "test_fraction": 0.2,
              "train_subsample": 60, "shards": 2, "image_size": 12, "channels": 1}
    prepare_dataset("id_train", {"role": "id_train", **common}, seed=0, out=root / "id_train")
    prepare_dataset("id_test", {"role": "id_test", **common, "n": 30}, seed=0, out=root / "id_test")
    torch.manual_seed(0)
    save_model(root / "model.pt", build_model("small_cnn", 10, 1, widths=(4, 6, 8)))
    return root


def run(*args):
    assert main([str(a) for a in args]) == 0, args


def test_subspace_pipeline(setup, capsys):
    r = setup
    model, tr, te = r / "model.pt", r / "id_train", r / "id_test"
    sp = json.dumps({**P, "blocks": "stages"})
    for s in (0, 1):
        run("gradstats-partial", "--model", model, "--data-dir", tr, "--shards", s, "--params", sp,
            "--out", r / f"stats/partial/shard-{s}.npz", "--timing", r / f"stats/timing-{s}.json")
    run("gradstats-reduce", "--partials", r / "stats/partial/shard-0.npz", r / "stats/partial/shard-1.npz",
        "--params", json.dumps({"normalize": {"scale": "second_moment"}}), "--out", r / "stats/stats.zarr")
    st = open_store(r / "stats/stats.zarr")
    assert dict(st.attrs)["count"] == 60
    assert json.loads((r / "stats/timing-0.json").read_text())["seconds"]["gradient"] > 0

    # PCA: passes 0..2 over two data parts (shard 0 and shard 1), reduce after each,
    # then the lift pass from the Rayleigh–Ritz of pass 2 and the finalize
    stats = r / "stats/stats.zarr"
    run("pca-init", "--stats", stats, "--params", '{"k": 4, "oversample": 4, "seed": 0}',
        "--out", r / "pca/V-init.zarr")
    basis, krylov = r / "pca/V-init.zarr", []
    for t in range(3):
        parts = []
        for s in (0, 1):
            parts.append(r / f"pca/pass-{t:03d}/part-{s}.zarr")
            run("pca-pass", "--model", model, "--data-dir", tr, "--shards", s, "--stats", stats,
                "--basis", basis, "--params", json.dumps({**P, "method": "jvp_vjp"}), "--out", parts[-1])
        basis = r / f"pca/pass-{t:03d}/V-next.zarr"
        run("pca-reduce", "--parts", *parts, *(["--krylov", *krylov] if krylov else []), "--stats", stats,
            "--out-basis", basis, "--out-krylov", r / f"pca/krylov/pass-{t:03d}.zarr",
            "--diagnostics", r / f"pca/diagnostics/pass-{t:03d}.json")
        krylov.append(r / f"pca/krylov/pass-{t:03d}.zarr")
    for t in range(3):  # every diagnostics file describes the pass it is named after
        d = json.loads((r / f"pca/diagnostics/pass-{t:03d}.json").read_text())
        assert d["pass"] == t and d["passes"] == t + 1
        assert dict(open_store(krylov[t]).attrs)["pass"] == t
    diag = json.loads((r / "pca/diagnostics/pass-002.json").read_text())
    assert len(diag["ritz_values"]) == 8 and 0 < diag["captured_variance_topk"] <= 1
    assert len(diag["residuals"]) == 4 and diag["max_residual"] == max(diag["residuals"])
    lifts = []
    for s in (0, 1):
        lifts.append(r / f"pca/lift/part-{s}.zarr")
        run("pca-lift", "--model", model, "--data-dir", tr, "--shards", s, "--stats", stats,
            "--krylov", krylov[-1], "--params", json.dumps(P), "--out", lifts[-1])
    run("pca-finalize", "--parts", *lifts, "--krylov", krylov[-1], "--stats", stats,
        "--diagnostics", *[r / f"pca/diagnostics/pass-{t:03d}.json" for t in range(3)],
        "--params", '{"tol": 0.5}', "--out", r / "pca/subspace.zarr")
    pca = dict(open_store(r / "pca/subspace.zarr").attrs)
    assert pca["k"] == 4 and pca["type"] == "pca" and len(pca["eigenvalues"]) == 4
    assert pca["passes"] == 4 and len(pca["convergence"]) == 3 and pca["orthonormality_error"] < 1e-4
    assert pca["eigenvalues"] == pytest.approx([v for v in diag["ritz_values"][:4]], rel=1e-9)

    # AG
    for s in (0, 1):
        run("ag-partial", "--model", model, "--data-dir", tr, "--shards", s, "--stats", stats,
            "--params", json.dumps(P), "--out", r / f"ag/shard-{s}.zarr")
    run("ag-reduce", "--partials", r / "ag/shard-0.zarr", r / "ag/shard-1.zarr", "--stats", stats,
        "--out", r / "ag/subspace.zarr")
    assert dict(open_store(r / "ag/subspace.zarr").attrs)["k"] == 9

    # projection, whole and per block (merged)
    for space in ("pca", "ag"):
        for ds, d in (("id_train", tr), ("id_test", te)):
            for s in (0, 1):
                run("project", "--model", model, "--data-dir", d, "--shard", s, "--stats", stats,
                    "--subspace", r / f"{space}/subspace.zarr", "--params", json.dumps(P),
                    "--out", r / f"reduced/{space}/{ds}/shard-{s}.zarr",
                    "--timing", r / f"reduced/{space}/{ds}/timing-{s}.json")
    red = open_store(r / "reduced/pca/id_test/shard-0.zarr")
    assert red["reduced"].shape[1] == 4 and "gnorm2" in red
    assert set(dict(red.attrs)["timing"]["seconds"]) == {"gradient", "projection"}
    g = open_store(r / "pca/subspace.zarr")
    blocks = dict(g.attrs)["layout"]["blocks"]
    parts = []
    for b, _ in blocks:
        parts.append(r / f"reduced/part-{b}.zarr")
        run("project", "--model", model, "--data-dir", te, "--shard", 0, "--stats", stats,
            "--subspace", r / "pca/subspace.zarr", "--blocks", b, "--params", json.dumps(P),
            "--out", parts[-1])
    run("project-merge", "--parts", *parts, "--subspace", r / "pca/subspace.zarr", "--out", r / "merged.zarr")
    np.testing.assert_allclose(np.asarray(open_store(r / "merged.zarr")["reduced"]),
                               np.asarray(red["reduced"]), rtol=1e-4, atol=1e-5)

    # diagnostics
    red_args = []
    for ds in ("id_train", "id_test"):
        stores = ",".join(str(r / f"reduced/pca/{ds}/shard-{s}.zarr") for s in (0, 1))
        red_args += ["--reduced", f"{ds}={stores}"]
    run("subspace-diagnostics", "--subspace", r / "pca/subspace.zarr", *red_args, "--out-dir", r / "diag/pca")
    summary = json.loads((r / "diag/pca/summary.json").read_text())
    rec = {row["dataset"]: row for row in summary["reconstruction"]}
    assert 0 < rec["id_train"]["mean"] < 1 and (r / "diag/pca/explained_variance.png").exists()
    gd = ["--reduced", "pca:" + red_args[1], "--reduced", "pca:" + red_args[3]]
    run("gradient-diagnostics", "--model", model, "--stats", stats, "--ag", r / "ag/subspace.zarr",
        "--data", f"id_train={tr}", "--data", f"id_test={te}", *gd,
        "--params", json.dumps({**P, "n_samples": 20}), "--out-dir", r / "diag/grad")
    gdj = json.loads((r / "diag/grad/gradient_diagnostics.json").read_text())
    assert gdj["nn_distances"][0]["dataset"] == "id_test" and "pca" in gdj["nn_distances"][0]
    assert len(gdj["class_mean_cosine"]) == 2 and -1 <= gdj["class_mean_cosine"][0]["mean"] <= 1

    # detectors through the generic fit/score commands, and the ensemble
    train = [r / f"reduced/pca/id_train/shard-{s}.zarr" for s in (0, 1)]
    test = [r / f"reduced/pca/id_test/shard-{s}.zarr" for s in (0, 1)]
    run("fit", "--method", "grad_knn", "--params", '{"k": 3}', "--space", "pca", "--train", *train,
        "--out", r / "det/knn.npz")
    run("score", "--fitted", r / "det/knn.npz", "--shards", *test, "--out", r / "scores/knn.npy")
    s = np.load(r / "scores/knn.npy")
    assert s.shape == (30,) and np.isfinite(s).all()
    np.save(r / "scores/f.npy", np.ones(30))
    run("ensemble-scores", "--feature", r / "scores/f.npy", "--gradient", r / "scores/knn.npy",
        "--alpha", 1.0, "--out", r / "scores/ens.npy")
    np.testing.assert_allclose(np.load(r / "scores/ens.npy"), 1 + s)
    from gradspace.selection import select_alpha

    rng = np.random.default_rng(0)
    val = {n: rng.normal(size=20) + (n == "id_val") for n in ("id_val", "ood_val")}
    rec = select_alpha([0.5], val, val, ["ood_val"], ["auroc", "fpr95"])
    (r / "scores/alpha.json").write_text(json.dumps({**rec, "name": "ens", "space": "pca"}))
    run("ensemble-scores", "--feature", r / "scores/f.npy", "--gradient", r / "scores/knn.npy",
        "--alpha-file", r / "scores/alpha.json", "--out", r / "scores/ens2.npy")
    np.testing.assert_allclose(np.load(r / "scores/ens2.npy"), 1 + 0.5 * s)


def test_bad_input_exit_2(setup, capsys):
    r = setup
    code = main(["gradstats-partial", "--model", str(r / "model.pt"), "--data-dir", str(r / "id_train"),
                 "--shards", "0", "--params", json.dumps({**P, "bogus": 1}), "--out", str(r / "x.npz")])
    assert code == 2 and "bogus" in capsys.readouterr().err
    init = '{"k": 4, "oversample": 4, "seed": 0}'
    code = main(["pca-init", "--stats", str(r / "missing.zarr"), "--params", init,
                 "--out", str(r / "v.zarr")])
    assert code == 2 and "missing.zarr" in capsys.readouterr().err
    assert not (r / "x.npz").exists() and not (r / "v.zarr").exists()


@pytest.mark.parametrize("command,params,missing", [
    ("pca-init", {"k": 4, "seed": 0}, "'oversample'"),
    ("pca-init", {}, "'k', 'oversample', 'seed'"),
    ("pca-solver", {"solver": "auto", "exact_max_gib": 8.0}, "'k'"),
])
def test_k_comes_from_params_only(tmp_path, capsys, command, params, missing):
    """subspace.k reaches the PCA jobs one way, their --params: no second default (issue 11)."""
    code = main([command, "--stats", str(tmp_path / "stats.zarr"), "--params", json.dumps(params),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"{command} --params: missing key(s) {missing}" in err, err
    assert not (tmp_path / "out").exists()


def test_pca_exact_requires_k(tmp_path, capsys):
    code = main(["pca-exact", "--model", str(tmp_path / "m.pt"), "--data-dir", str(tmp_path / "d"),
                 "--stats", str(tmp_path / "s.zarr"), "--shards", "0",
                 "--params", json.dumps({"exact_max_gib": 1.0, "tol": None}), "--out", str(tmp_path / "o")])
    assert code == 2 and "pca-exact --params: missing key(s) 'k'" in capsys.readouterr().err
