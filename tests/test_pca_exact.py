"""The in-memory exact PCA ("issue 10"): one data pass, G materialized, exact Gram
eigendecomposition; the solver decision (``subspace.solver: auto`` against
``subspace.exact_max_gib``); and the workflow path (rule pca_exact) against the Krylov
passes on the tiny config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import TINY, run_snakemake

# -- library ----------------------------------------------------------------------------------


def test_bytes_and_decision_without_torch():
    """exact_pca_bytes and choose_solver import neither torch nor zarr (the planner uses them)."""
    code = ("import sys; from gradspace.subspace.exact import exact_pca_bytes, choose_solver; "
            "assert 'torch' not in sys.modules and 'zarr' not in sys.modules, sorted(sys.modules); "
            "print(exact_pca_bytes(4000, 103466, 32))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == 4 * 4000 * 103466 + 8 * 4000**2 + 8 * 103466 * 32


def test_choose_solver_picks_exact_under_the_budget_and_krylov_above():
    from gradspace.errors import ConfigError
    from gradspace.subspace.exact import GIB, choose_solver, exact_pca_bytes

    n, p, k = 4000, 103_466, 32
    need = exact_pca_bytes(n, p, k)
    assert 1.5 * GIB < need < 2 * GIB           # the demo: G alone is 1.6 GB
    assert choose_solver("auto", n, p, k, 8 * GIB) == "exact"
    assert choose_solver("auto", n, p, k, need) == "exact"
    assert choose_solver("auto", n, p, k, need - 1) == "krylov"
    assert choose_solver("auto", n, p, k, 1 * GIB, iterative="power") == "power"
    # ImageNet-scale (1.28M x 25M) never fits
    assert choose_solver("auto", 1_281_167, 25_557_032, 200, 8 * GIB) == "krylov"
    for forced in ("exact", "krylov", "power"):
        assert choose_solver(forced, n, p, k, 1) == forced
    with pytest.raises(ConfigError, match="subspace.solver"):
        choose_solver("lanczos", n, p, k, GIB)


def test_exact_pca_matches_numpy_svd_of_explicit_G():
    from gradspace.grads import GradientEngine
    from gradspace.subspace.exact import exact_pca
    from gradspace.subspace.operators import PerSampleOperator
    from test_subspace import batches, explicit_G, layout_of, make_data, make_model, sine, stats_of

    model = make_model()
    x, y = make_data()
    layout = layout_of(model, {"max_params": 40})  # several blocks, not contiguous in flat order
    st, _ = stats_of(model, x, layout)
    G = explicit_G(model, x, st)                  # float64 reference N×P
    _, s, Vt = np.linalg.svd(G, full_matrices=False)
    k = 6
    op = PerSampleOperator(model, layout, st, engine=GradientEngine(model, "all", "energy"))
    Vb, info = exact_pca(op, batches(x, y), len(x), k, stats=st)
    V = np.zeros((layout.num_params, k))
    for b in layout.block_names:
        r = 0
        for a, z in layout.block_ranges(b):
            V[a:z] = Vb[b][r:r + z - a]
            r += z - a
    assert sine(V, Vt[:k].T) < 1e-5
    np.testing.assert_allclose(info["eigenvalues"], s[:k] ** 2 / len(x), rtol=1e-5)
    assert info["max_residual"] < 1e-8 and info["orthonormality_error"] < 1e-5
    assert info["captured_variance_topk"] == pytest.approx((s[:k] ** 2).sum() / (s**2).sum(), rel=1e-5)
    # each direction individually (separated spectrum): v_j = ±right singular vector j
    for j in range(k):
        if s[j] / s[j + 1] > 1.05:
            assert abs(abs(V[:, j] @ Vt[j]) - 1) < 1e-5


def test_exact_store_is_a_pca_subspace_store(tmp_path):
    from gradspace.grads import GradientEngine
    from gradspace.subspace.exact import exact_pca, write_exact
    from gradspace.subspace.io import open_blocks
    from gradspace.subspace.operators import PerSampleOperator
    from gradspace.subspace.power import fit_pca_in_memory
    from test_subspace import batches, layout_of, make_data, make_model, stats_of

    model = make_model()
    x, y = make_data()
    layout = layout_of(model)
    st, _ = stats_of(model, x, layout)
    op = PerSampleOperator(model, layout, st, engine=GradientEngine(model, "all", "energy"))
    Vb, info = exact_pca(op, batches(x, y), len(x), 4, stats=st)
    attrs = write_exact(tmp_path / "subspace.zarr", layout, Vb, info, tol=0.01)
    g, stored, lay = open_blocks(tmp_path / "subspace.zarr", "subspace")
    assert lay.to_dict() == layout.to_dict()
    assert stored["solver"] == "exact" and stored["type"] == "pca" and stored["passes"] == 1
    assert stored["converged"] is True and len(stored["convergence"]) == 1
    for key in ("k", "n", "eigenvalues", "residuals", "max_residual", "orthonormality_error",
                "total_variance", "explained_variance_ratio", "unconverged", "iterations", "columns"):
        assert key in stored, key
    assert stored == {**attrs, **{k: stored[k] for k in stored if k not in attrs}}
    # the iterative path agrees (eigenvalues, per sample)
    _, it = fit_pca_in_memory(op, lambda: batches(x, y), layout, 4, 8, tol=1e-6, stats=st)
    np.testing.assert_allclose(stored["eigenvalues"], it["eigenvalues"], rtol=1e-4)
    assert np.asarray(g[f"V.{layout.block_names[0]}"][...]).shape == (layout.block_size(
        layout.block_names[0]), 4)
    # the PCA diagnostics the report reads: one row, the solver named
    from gradspace.subspace.diagnostics import store_diagnostics

    summary = store_diagnostics(stored, {}, tmp_path / "diag", "pca")
    conv = (tmp_path / "diag/convergence.csv").read_text().splitlines()
    assert len(conv) == 2 and conv[1].split(",")[:2] == ["0", "1"]
    assert len((tmp_path / "diag/directions.csv").read_text().splitlines()) == 5
    assert (tmp_path / "diag/convergence.png").exists() and summary["passes"] == 1


def test_exact_refuses_k_above_n_and_over_budget():
    from gradspace.errors import ConfigError
    from gradspace.subspace.exact import GIB, check_budget, top_eigenpairs

    with pytest.raises(ConfigError, match="k <= N"):
        top_eigenpairs(np.eye(3), 4)
    with pytest.raises(ConfigError, match="exact_max_gib"):
        check_budget(4000, 103_466, 32, 1 * GIB)


# -- workflow -----------------------------------------------------------------------------------

EXP = "pcaexact"
PCA = f"results/{EXP}/subspace/pca"


def _config(work: Path, **subspace):
    """The tiny config (PCA only); solver / exact_max_gib not given: the schema defaults
    (auto, 8 GiB), not the tiny config's pinned krylov."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["experiment"] = EXP
    for key in ("solver", "exact_max_gib"):
        cfg["subspace"].pop(key, None)
    cfg["subspace"].update({"types": ["pca"], "k": 8, "oversample": 8, **subspace})
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))


def _basis(path: Path):
    from gradspace.subspace.io import open_blocks

    g, attrs, layout = open_blocks(path, "subspace")
    V = np.zeros((layout.num_params, int(attrs["k"])))
    for b in layout.block_names:
        Vb, r = np.asarray(g[f"V.{b}"][...], np.float64), 0
        for a, z in layout.block_ranges(b):
            V[a:z] = Vb[r:r + z - a]
            r += z - a
    return V, attrs


def _rules(work: Path, target: str) -> set[str]:
    return {r for r, _ in planned_jobs_for(work, target)}


def planned_jobs_for(work: Path, target: str):
    # planned_jobs plans the default target; plan the PCA store only
    proc = run_snakemake(work, "--configfile", "config.yaml", "-n", target)
    return [(line.strip().split()[1].rstrip(":"), {}) for line in proc.stdout.splitlines()
            if line.startswith(("rule ", "localrule ", "checkpoint ")) and line.strip().endswith(":")]


@pytest.mark.slow
def test_workflow_exact_matches_krylov_and_auto_decides(tmp_path):
    """solver: exact runs pca_exact (one pass) and writes a subspace store that the Krylov
    passes reproduce; auto takes pca_exact under the default budget and the data passes
    under a tiny one (decided by the checkpoint pca_solver from the statistics)."""
    work = tmp_path / "w"
    work.mkdir()
    target = f"{PCA}/subspace.zarr"

    _config(work, solver="exact")
    jobs = _rules(work, target)
    assert "pca_exact" in jobs and not jobs & {"pca_init", "pca_pass", "pca_lift", "pca_solver"}
    run_snakemake(work, "--configfile", "config.yaml", "--cores", "2", target)
    V_exact, a_exact = _basis(work / target)
    assert a_exact["solver"] == "exact" and a_exact["passes"] == 1 and a_exact["n"] == 800
    assert a_exact["max_residual"] < 1e-8 and a_exact["orthonormality_error"] < 1e-5
    assert not (work / PCA / "exact.zarr").exists()            # moved into place, not copied
    bench = (work / f"results/{EXP}/benchmarks/pca_exact.tsv").read_text().splitlines()
    assert len(bench) == 2

    # auto: the checkpoint decides from the statistics (N = 800, P = 103,466)
    _config(work)                                               # default solver (auto), 8 GiB
    run_snakemake(work, "--configfile", "config.yaml", "--cores", "2", f"{PCA}/solver.json")
    decision = json.loads((work / PCA / "solver.json").read_text())
    assert decision["solver"] == "exact" and decision["n"] == 800 and decision["configured"] == "auto"
    jobs = _rules(work, target)
    assert "pca_exact" in jobs and not jobs & {"pca_init", "pca_pass", "pca_lift"}
    _config(work, exact_max_gib=0.01)                           # 10 MiB: G alone is 330 MB
    run_snakemake(work, "--configfile", "config.yaml", "--cores", "2", f"{PCA}/solver.json")
    assert json.loads((work / PCA / "solver.json").read_text())["solver"] == "krylov"
    jobs = _rules(work, target)
    assert {"pca_init", "pca_pass", "pca_reduce"} <= jobs and "pca_exact" not in jobs

    # the Krylov passes on the same statistics reach the same subspace
    shutil.rmtree(work / PCA)
    _config(work, solver="krylov", iterations="auto", tol=0.01, max_iterations=8)
    run_snakemake(work, "--configfile", "config.yaml", "--cores", "2", target)
    V_kry, a_kry = _basis(work / target)
    assert a_kry["solver"] == "krylov"
    from test_subspace import sine

    s = sine(V_exact, V_kry)
    print(f"largest principal-angle sine exact vs krylov (tol 0.01, {a_kry['passes']} passes): {s:.2e}")
    assert s < 0.05
    np.testing.assert_allclose(a_kry["eigenvalues"], a_exact["eigenvalues"], rtol=1e-2)
