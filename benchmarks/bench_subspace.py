"""Benchmark: PCA of the normalized energy gradients by block power iteration with the
``persample`` operator (engine gradients × V, then Gᵀ·(GV)) vs the paper's matrix-free
``jvp_vjp`` operator (Alg. 3–4), run side by side to the same subspace accuracy.

The reference subspace is exact: G (N×P) is formed once with the gradient engine and the
top-k eigenvectors of C = GᵀG come from the N×N Gram matrix G Gᵀ = U Λ Uᵀ (V = Gᵀ U Λ^-½).
Each method iterates V_{t+1} = orth(C V_t) (blockwise TSQR) from the same seeded V_0 until
the largest principal-angle sine between its top-k Ritz vectors and the exact subspace is
≤ --tol; the table lists seconds per iteration, iterations and seconds to the tolerance,
and the ratio.

    python benchmarks/bench_subspace.py                      # demo CNN, a minute on 2 cores
    python benchmarks/bench_subspace.py --arch resnet18_cifar --n 64 --image-size 32 --channels 3
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def build(args):
    from gradspace.models.architectures import build_model

    torch.manual_seed(args.seed)
    kw = {"widths": tuple(args.widths)} if args.arch == "small_cnn" and args.widths else {}
    model = build_model(args.arch, args.classes, args.channels, **kw).eval()
    g = torch.Generator().manual_seed(args.seed)
    y = torch.arange(args.n) % args.classes
    proto = torch.randn(args.classes, args.channels, args.image_size, args.image_size, generator=g)
    x = proto[y] + 0.7 * torch.randn(args.n, args.channels, args.image_size, args.image_size, generator=g)
    return model, x, y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--widths", type=int, nargs="*", default=None)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--n", type=int, default=128, help="ID-train samples")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--oversample", type=int, default=10)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--max-iter", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from gradspace.grads import GradientEngine
    from gradspace.runtime import hardware_description
    from gradspace.subspace import power, stats
    from gradspace.subspace.layout import build_layout
    from gradspace.subspace.operators import JvpVjpOperator, PerSampleOperator

    model, x, y = build(args)
    layout = build_layout(model, "all", "stages")
    batches = [(x[a:a + args.batch], y[a:a + args.batch]) for a in range(0, args.n, args.batch)]
    engine = GradientEngine(model, "all", "energy", chunk_size=args.batch)
    t0 = time.perf_counter()
    sums = stats.accumulate_moments(engine, batches, layout)
    t_stats = time.perf_counter() - t0
    st = stats.reduce_moments([sums], layout)

    # exact reference from the explicit G (N×P)
    m, s = st.full()
    G = torch.cat([(engine.batch(b[0]) - m) * s for b in batches]).double()
    lam, U = torch.linalg.eigh(G @ G.T)
    top = torch.argsort(lam, descending=True)[: args.k]
    Vex = (G.T @ U[:, top]) / lam[top].sqrt()
    Vex = Vex.numpy()
    del G

    def flat(Vb):
        out = np.zeros((layout.num_params, next(iter(Vb.values())).shape[1]))
        for b, arr in Vb.items():
            r = 0
            for a, z in layout.block_ranges(b):
                out[a:z] = arr[r:r + z - a]
                r += z - a
        return out

    K = args.k + args.oversample
    get, _ = power.tsqr(layout.block_names, lambda b: power.random_blocks(layout, K, args.seed, b))
    V0 = {b: get(b) for b in layout.block_names}
    ops = {"persample": PerSampleOperator(model, layout, st, engine=engine),
           "jvp_vjp": JvpVjpOperator(model, layout, st, direction_chunk=K)}
    rows = []
    for name, op in ops.items():
        V = {b: v.copy() for b, v in V0.items()}
        times, sine, it = [], 1.0, 0
        while it < args.max_iter:
            Vt = {b: torch.as_tensor(v, dtype=torch.float32) for b, v in V.items()}
            t0 = time.perf_counter()
            W, n = power.partial_products(op, batches, Vt)
            times.append(time.perf_counter() - t0)
            H = sum(V[b].T @ W[b] for b in layout.block_names)
            w, S = np.linalg.eigh(0.5 * (H + H.T))
            ritz = flat(V) @ S[:, np.argsort(w)[::-1][: args.k]]
            q, _ = np.linalg.qr(ritz)
            sine = float(np.linalg.norm(q - Vex @ (Vex.T @ q), 2))
            it += 1
            if sine <= args.tol:
                break
            get, _ = power.tsqr(layout.block_names, W.__getitem__)
            V = {b: get(b) for b in layout.block_names}
        rows.append({"method": name, "s_per_iter": float(np.mean(times)), "iterations": it,
                     "s_to_tol": float(np.sum(times)), "sine": sine})
    ratio = rows[1]["s_to_tol"] / rows[0]["s_to_tol"]
    print(f"# PCA operators, {args.arch}: P = {layout.num_params:,} parameters, N = {args.n}, "
          f"k = {args.k} (+{args.oversample}), tol {args.tol:g}, {hardware_description(None)}, "
          f"{args.threads} threads; stats pass {t_stats:.2f}s")
    print("| method | s / iteration | iterations to tol | s to tol | final sine |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['s_per_iter']:.3f} | {r['iterations']} | {r['s_to_tol']:.2f} | "
              f"{r['sine']:.1e} |")
    print(f"jvp_vjp / persample time ratio: {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "num_params": layout.num_params, "rows": rows, "ratio": ratio,
                       "stats_s": t_stats}, fh, indent=2)


if __name__ == "__main__":
    main()
