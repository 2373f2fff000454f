"""Benchmark: ``jvp_vjp`` operator cost vs ``direction_chunk`` (directions per vmapped jvp /
vjp call), with the ``persample`` operator on the same batch and basis for comparison.

One batch of demo ID-train images (default 100) and one seeded orthonormal basis V with K'
columns (default 26, per parameter block as the workflow stores it); every operator computes
U = G·V (``gv``) then Gᵀ·U (``gtu``), built as ``gradspace.subspace.jobs._operator``
builds them from the demo run's model and gradient statistics. Rounds are interleaved (every
setting once per round, the order rotating) so that all settings see the same background
load; the table gives the best of --repeats rounds and the median, seconds per direction,
and the ratio to direction_chunk = 1. Results are checked against each other.

    python benchmarks/bench_jvp_direction_chunk.py [--results results/demo] [--columns 26] [--n 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def demo_options(config_path):
    import yaml

    cfg = yaml.safe_load(Path(config_path).read_text()) if config_path and Path(config_path).exists() else {}
    data, sub = cfg.get("data", {}), cfg.get("subspace", {})
    return {"mean": data.get("mean", [0.1307]), "std": data.get("std", [0.3081]),
            "chunk_size": int(sub.get("chunk_size", 256))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results/demo")
    ap.add_argument("--config", default="config/config.yaml", help="for mean/std and chunk_size")
    ap.add_argument("--n", type=int, default=100, help="images in the batch")
    ap.add_argument("--columns", type=int, default=26, help="K': directions of V")
    ap.add_argument("--chunks", type=int, nargs="*", default=[1, 4, 8, 16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from gradspace.job import batch_source, open_model
    from gradspace.runtime import hardware_description
    from gradspace.subspace.jobs import _load_stats, _operator, job_options

    dev = torch.device(args.device)
    results = Path(args.results)
    opts = demo_options(args.config)
    stats = _load_stats(results / "subspace/stats/stats.zarr")
    _, model, _ = open_model(results / "model/model.pt", {'device': str(dev)})
    o = job_options({"batch_size": args.n, "chunk_size": opts["chunk_size"], "mean": opts["mean"],
                     "std": opts["std"], "device": args.device})
    x = next(iter(batch_source(results / "data/id_train", None, o, dev)()))[0][: args.n].contiguous()
    layout = stats.layout
    K = args.columns
    rng = np.random.default_rng(args.seed)
    Q, _ = np.linalg.qr(rng.standard_normal((layout.num_params, K)))
    V, r = {}, 0
    for b in layout.block_names:
        P = layout.block_size(b)
        V[b] = torch.as_tensor(Q[r:r + P], dtype=torch.float32, device=dev)   # block rows, any fixed split
        r += P

    ops = {f"jvp_vjp, direction_chunk={c}":
           _operator("jvp_vjp", model, stats, {**o, "direction_chunk": c}, dev) for c in args.chunks}
    ops["persample"] = _operator("persample", model, stats, o, dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def once(op):
        xi = x.clone()                      # a new tensor: persample's gv→gtu cache must not carry over
        sync()
        t0 = time.perf_counter()
        U = op.gv(xi, V)
        sync()
        t1 = time.perf_counter()
        W = op.gtu(xi, U)
        sync()
        t2 = time.perf_counter()
        return (t2 - t0, t1 - t0, t2 - t1), U, W

    names = list(ops)
    outs = {}
    for name in names:                      # warm-up, and the results for the cross-check
        _, U, W = once(ops[name])
        outs[name] = (U.double().cpu(), torch.cat([W[b] for b in layout.block_names]).double().cpu())
    times = {name: [] for name in names}
    parts = {name: [] for name in names}
    for rnd in range(args.repeats):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for name in order:
            (tot, tgv, tgtu), _, _ = once(ops[name])
            times[name].append(tot)
            parts[name].append((tgv, tgtu))
            print(f"  round {rnd + 1}: {name}: {tot:.3f}s (gv {tgv:.3f}s, gtu {tgtu:.3f}s)", flush=True)

    ref_U, ref_W = outs["persample"]
    diff = {name: (float((U - ref_U).norm() / ref_U.norm()), float((W - ref_W).norm() / ref_W.norm()))
            for name, (U, W) in outs.items()}
    base = min(times[names[0]]) if args.chunks and args.chunks[0] == 1 else None
    print()
    print(f"# gv + gtu on {x.shape[0]} demo ID-train images, K' = {K} directions, P = {layout.num_params:,}; "
          f"{hardware_description(dev)}, {args.threads} threads, best of {args.repeats} (median)")
    print("| operator | s (best) | s (median) | gv / gtu s (best round) | ms per direction | "
          "ratio to direction_chunk=1 | rel. diff to persample (G·V / Gᵀ·U) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in names:
        best, med = min(times[name]), statistics.median(times[name])
        ratio = best / base if base else float("nan")
        gv_s, gtu_s = parts[name][times[name].index(best)]
        print(f"| {name} | {best:.3f} | {med:.3f} | {gv_s:.3f} / {gtu_s:.3f} | {1000 * best / K:.1f} | "
              f"{ratio:.2f}× | {diff[name][0]:.1e} / {diff[name][1]:.1e} |")
        rows.append({"operator": name, "best_s": best, "median_s": med, "times": times[name],
                     "gv_gtu_s": parts[name],
                     "ms_per_direction": 1000 * best / K, "ratio_to_chunk1": ratio,
                     "rel_diff_gv": diff[name][0], "rel_diff_gtu": diff[name][1]})
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows,
                                               "hardware": hardware_description(dev)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
