"""Benchmark: the in-memory exact PCA (one data pass, G materialized, float64 Gram
eigendecomposition: ``gradspace.subspace.exact``) against the Krylov data passes
(``power.fit_pca_in_memory``: the workflow's passes, same math, no files) on the same
ID-train gradients of a finished demo run, in one process.

Both paths run the library's ``persample`` operator on the demo model with the demo's
statistics, over the first --n ID-train samples, so the per-sample gradient cost is the
same per pass; what differs is the number of passes (exact: 1; Krylov: q + 2) against the
N×N float64 Gram product and eigendecomposition. Prints the times, the ratio, the peak
bytes of the exact path (``exact_pca_bytes``) and the largest principal-angle sine between
the two subspaces.

    python benchmarks/bench_pca_exact.py --results results/demo --n 1000 4000
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def sine(A, B) -> float:
    """Largest principal-angle sine between span(A) and span(B)."""
    qa, _ = np.linalg.qr(A)
    qb, _ = np.linalg.qr(B)
    return float(np.linalg.norm(qa - qb @ (qb.T @ qa), 2))


def flat(Vb: dict, layout) -> np.ndarray:
    k = next(iter(Vb.values())).shape[1]
    V = np.zeros((layout.num_params, k))
    for b in layout.block_names:
        r = 0
        for a, z in layout.block_ranges(b):
            V[a:z] = Vb[b][r:r + z - a]
            r += z - a
    return V


def main(argv=None):
    import yaml

    from gradspace.data.loader import iter_batches
    from gradspace.job import open_model
    from gradspace.subspace.exact import GIB, exact_pca, exact_pca_bytes
    from gradspace.subspace.jobs import _load_stats, _operator, job_options
    from gradspace.subspace.power import fit_pca_in_memory

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results/demo", help="a finished demo run")
    ap.add_argument("--config", default="config/config.yaml", help="mean/std, batch and chunk sizes, k, "
                                                                   "oversample, tol")
    ap.add_argument("--n", type=int, nargs="+", default=[1000], help="ID-train samples (first n rows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the rows as JSON")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = yaml.safe_load(Path(a.config).read_text())
    sub, data, comp = cfg["subspace"], cfg["data"], cfg["compute"]
    k, over, tol = int(sub["k"]), int(sub["oversample"]), float(sub["tol"])
    res = Path(a.results)
    dev = torch.device("cpu")
    stats = _load_stats(res / "subspace/stats/stats.zarr")
    _, model, _ = open_model(res / "model/model.pt", {'device': str(dev)})
    o = job_options({"chunk_size": int(sub.get("chunk_size", 256))})
    op = _operator("persample", model, stats, o, dev)
    layout = stats.layout

    rows = []
    for n in a.n:
        def batches(n=n):
            it = iter_batches(res / "data/id_train", shard=None, batch_size=int(comp["batch_size"]),
                              num_workers=0, mean=data["mean"], std=data["std"], device=dev)
            left = n
            for x, y, r in it:
                if left <= 0:
                    return
                yield x[:left], y[:left], r[:left]
                left -= x.shape[0]

        n_eff = sum(b[0].shape[0] for b in itertools.islice(batches(), None))
        t0 = time.perf_counter()
        Ve, info = exact_pca(op, batches(), n_eff, k, stats=stats)
        t_exact = time.perf_counter() - t0
        t0 = time.perf_counter()
        Vk, kinfo = fit_pca_in_memory(op, batches, layout, k, over, seed=0, tol=tol, iterations="auto",
                                      max_iterations=int(sub.get("max_iterations", 12)), stats=stats)
        t_kry = time.perf_counter() - t0
        s = sine(flat(Ve, layout), flat(Vk, layout))
        eig_diff = np.abs(np.asarray(kinfo["eigenvalues"]) / np.asarray(info["eigenvalues"]) - 1)
        row = {"n": n_eff, "p": layout.num_params, "k": k, "exact_s": t_exact,
               "exact_parts_s": info["seconds"],
               "exact_gib": exact_pca_bytes(n_eff, layout.num_params, k) / GIB,
               "exact_max_residual": info["max_residual"], "krylov_s": t_kry,
               "krylov_passes": kinfo["passes"], "krylov_max_residual": kinfo["max_residual"],
               "ratio": t_kry / t_exact, "sine": s, "eig_rel_diff": float(eig_diff.max())}
        rows.append(row)
        parts = ", ".join(f"{key} {v:.1f}" for key, v in info["seconds"].items())
        print(f"N = {n_eff}, P = {layout.num_params}, k = {k}: exact {t_exact:.1f} s ({parts}; "
              f"{row['exact_gib']:.2f} GiB, residual {info['max_residual']:.1e}) | Krylov {t_kry:.1f} s "
              f"({kinfo['passes']} passes, tol {tol}, residual {kinfo['max_residual']:.1e}) | "
              f"Krylov / exact = {row['ratio']:.2f} | sine {s:.1e}, eigenvalues within "
              f"{row['eig_rel_diff']:.1e}", flush=True)
    print("\n| N | exact (1 pass) | Krylov (passes) | Krylov / exact | largest sine |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['exact_s']:.1f} s | {r['krylov_s']:.1f} s ({r['krylov_passes']}) | "
              f"{r['ratio']:.2f} | {r['sine']:.1e} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
