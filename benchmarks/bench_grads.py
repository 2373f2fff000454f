"""Per-sample gradient benchmark: the engine vs the reference code's batch-size-1 loop.

    python benchmarks/bench_grads.py [--quick] [--device cpu|cuda] [--threads N] [--repeats R]

Measures, side by side in one run (see benchmarks/README.md):

1. last-layer scores end to end on the demo CNN (forward included): the naive loop
   (one forward + backward per sample, as the GradNorm / Igoe reference code) vs one
   batched extraction pass + closed forms of features and logits;
2. the overhead of the closed-form scores on top of the extraction pass alone;
3. all-parameter energy gradients (E = −logsumexp f) reduced to per-sample L1 norms, for
   the demo CNN and the CIFAR ResNet-18 (32×32, 11.2M parameters): the naive loop vs the
   engine's reduction path (``iter_reduced``, what grad_scores uses) and materializing
   path (``iter_chunks`` into a reused buffer; ``batch(reuse_buffer=True)``, what the
   subspace stages call; ``batch()`` with a fresh N×P tensor per call) for every
   strategy, and the grad_scores scorer itself (GradNorm, all parameters). Every method
   is warmed up, then timed R rounds on the same samples, interleaved (the order rotates
   each round) so that all see the same background load; the table gives the best round
   (and the median), the ratio of best rounds and the median of the per-round ratios.
   Norms are checked against the naive loop and, on 4 samples, against the naive loop
   in float64;
4. peak resident memory (VmHWM) of streamed all-parameter gradients at two data set sizes,
   materializing and reducing (fresh subprocess each).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src"))

from gradspace.detectors.base import FitContext, build_detector  # noqa: E402
from gradspace.grads import GradientEngine  # noqa: E402
from gradspace.grads import losses as L  # noqa: E402
from gradspace.grads.params import select_params  # noqa: E402
from gradspace.grads.reduce import NormReducer  # noqa: E402
from gradspace.grads.scoring import GradScorer, parse_params  # noqa: E402


def build(arch: str):
    from gradspace.models.architectures import build_model

    torch.manual_seed(0)  # the same weights in every run and subprocess
    if arch == "cnn":
        return build_model("small_cnn", 10, 1).eval(), (1, 28, 28)
    return build_model("resnet18_cifar", 10, 3).eval(), (3, 32, 32)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat=1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def batches(x, bs):
    for s in range(0, x.shape[0], bs):
        yield x[s:s + bs]


# -- 1/2: last-layer scores -------------------------------------------------------------------
def naive_last_layer(model, x, device):
    """GradNorm reference code: per sample, forward, KL-to-uniform loss, backward, L1 norm of
    the last layer's weight gradient; ExGrad with C backward passes (one per label)."""
    head = model.head
    gn, ex = [], []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].to(device)
        model.zero_grad()
        out = model(xi)
        L.loss_value("kl_uniform", out).sum().backward(retain_graph=True)
        gn.append(float(head.weight.grad.abs().sum()))
        p = torch.softmax(out.detach(), 1)[0]
        s = 0.0
        for y in range(out.shape[1]):
            g, = torch.autograd.grad(-torch.log_softmax(out, 1)[0, y], head.weight, retain_graph=True)
            s += float(p[y]) * float(g.abs().sum())
        ex.append(s)
    return np.array(gn), np.array(ex)


def extraction(model, x, device, bs=256):
    feats, logits = [], []
    with torch.no_grad():
        for xb in batches(x, bs):
            z = model.forward_features(xb.to(device))
            feats.append(z.cpu().numpy())
            logits.append(model.head(z).cpu().numpy())
    return {"features": np.concatenate(feats), "logits": np.concatenate(logits)}


LAST_LAYER = [("gradnorm", {}), ("exgrad", {}), ("hnorm_v", {"v_term": "energy", "p": 1}),
              ("hnorm_v", {"v_term": "tv", "p": 0.3}), ("igoe_grad", {"dist": "uniform", "norm": "l2sq"})]


def bench_last_layer(n_naive, n, device, rows):
    model, shape = build("cnn")
    model = model.to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    t_naive, (gn_ref, ex_ref) = timed(lambda: naive_last_layer(model, x[:n_naive], device), device)
    rate_naive = n_naive / t_naive
    t_ext, emb = timed(lambda: extraction(model, x, device), device, repeat=3)
    dets = [build_detector(m, h) for m, h in LAST_LAYER]
    t_scores, _ = timed(lambda: [d.score(emb) for d in dets], device, repeat=3)
    # GROOD: fit on a pseudo-ID train set (the same features, round-robin labels; an untrained
    # network's predictions are not "correct", so the whole set goes into the bank)
    train = {**emb, "labels": np.arange(n) % emb["logits"].shape[1]}
    grood = build_detector("grood", {"ood_prototype": "mean", "only_correct": False})
    grood.fit(train, FitContext())
    t_grood, _ = timed(lambda: grood.score(emb), device, repeat=3)
    # correctness of the fast path against the naive loop
    gn = build_detector("gradnorm").score({k: v[:n_naive] for k, v in emb.items()})
    ex = -build_detector("exgrad").score({k: v[:n_naive] for k, v in emb.items()})  # detector: -ExGrad
    err = max(np.abs(gn - gn_ref).max() / np.abs(gn_ref).max(),
              np.abs(ex - ex_ref).max() / np.abs(ex_ref).max())
    rate_engine = n / (t_ext + t_scores + t_grood)
    rows.append(("last-layer scores, demo CNN", "naive loop (GradNorm+ExGrad)", rate_naive, ""))
    rows.append(("last-layer scores, demo CNN", "extraction + closed forms (5 scores + GROOD)", rate_engine,
                 f"{rate_engine / rate_naive:.1f}x naive"))
    rows.append(("last-layer scores, demo CNN", "extraction alone", n / t_ext, ""))
    overhead = t_scores / t_ext
    return {"naive_per_s": rate_naive, "engine_per_s": rate_engine, "speedup": rate_engine / rate_naive,
            "extraction_s": t_ext, "closed_form_scores_s": t_scores, "grood_score_s": t_grood,
            "overhead_closed_forms": overhead, "overhead_with_grood": (t_scores + t_grood) / t_ext,
            "max_rel_err_vs_naive": float(err), "n": n, "n_naive": n_naive}


# -- 3: all-parameter gradients -----------------------------------------------------------------
def naive_all(model, x, device, loss="energy"):
    """The reference code's way: per sample, forward, backward, L1 norm of the gradient."""
    params = list(select_params(model, "all").values())
    out = []
    for i in range(x.shape[0]):
        model.zero_grad()
        L.loss_value(loss, model(x[i:i + 1].to(device))).sum().backward()
        out.append(float(sum(p.grad.abs().sum() for p in params)))
    model.zero_grad()
    return np.array(out)


def interleaved(fns: dict, x, device, repeats):
    """Time every method on the same samples, ``repeats`` rounds, the methods interleaved
    (rotated order each round) so that all of them see the same background load.
    Returns {name: list of seconds per round} and the last outputs."""
    names = list(fns)
    times = {k: [] for k in names}
    outs = {}
    for k in names:  # warm-up: allocator, kernels, lazy buffers
        fns[k](x[:max(2, min(8, x.shape[0]))])
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t, outs[k] = timed(lambda k=k: fns[k](x), device)
            times[k].append(t)
    return times, outs


def bench_all_params(arch, n, device, rows, chunk, repeats):
    """All-parameter energy gradients reduced to per-sample L1 norms: the naive loop vs the
    engine's reduction path (what grad_scores runs) and its materializing path (N×P chunks,
    what the subspace stages consume), every strategy, all interleaved."""
    model, shape = build(arch)
    model = model.to(device)
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))
    reducer = NormReducer((1,))
    fns = {"naive": lambda xb: naive_all(model, xb, device)}
    engines = {s: GradientEngine(model, params="all", loss="energy", strategy=s, chunk_size=chunk)
               for s in ("vmap", "hooks", "loop")}
    auto = GradientEngine(model, params="all", loss="energy", chunk_size=chunk).strategy_used

    def reduced(eng):
        return lambda xb: torch.cat([r.norm(1) for _, r in eng.iter_reduced(batches(xb, chunk), reducer)])

    def materialized(eng):  # the consumer reduces each chunk in place, as a projection would
        return lambda xb: torch.cat([g.abs_().sum(1) for _, g in
                                     eng.iter_chunks(batches(xb, chunk), reuse_buffer=True)])

    for s, eng in engines.items():
        fns[f"reduce {s}"] = reduced(eng)
    for s, eng in engines.items():
        fns[f"materialize {s}"] = materialized(eng)
    # the subspace stages' call: one batch into the engine's reused N×P buffer
    fns[f"materialize {auto}, batch(reuse_buffer)"] = lambda xb: torch.cat(
        [engines[auto].batch(b, reuse_buffer=True).abs_().sum(1) for b in batches(xb.to(device), 4 * chunk)])
    fns[f"materialize {auto}, batch() fresh"] = lambda xb: torch.cat(
        [engines[auto].batch(b).abs_().sum(1) for b in batches(xb.to(device), 4 * chunk)])
    # what the grad_scores job runs per batch: GradScorer, GradNorm over all parameters
    # (KL-to-uniform loss, one backward like the energy's, plus a no-grad forward for p)
    scorer = GradScorer(model, parse_params({"params": "all", "mean": [0.0], "std": [1.0],
                                             "chunk_size": chunk,
                                             "scores": {"gn": {"kind": "gradnorm", "p": 1}}}))
    fns[f"grad-scores GradNorm p=1, reduce {auto}"] = lambda xb: torch.cat(
        [torch.as_tensor(scorer(b)["gn"]) for b in batches(xb.to(device), 4 * chunk)])
    times, outs = interleaved(fns, x, device, repeats)
    ref = np.asarray(outs["naive"])
    # accuracy: every method's norms against the naive loop in float64 on a few samples
    k64 = min(4, n)
    m64 = copy.deepcopy(model).double()
    truth = naive_all(m64, x[:k64].double(), device)
    truth_kl = naive_all(m64, x[:k64].double(), device, loss="kl_uniform")
    res = {"n": n, "repeats": repeats, "chunk": chunk, "auto": auto,
           "num_params": sum(p.numel() for p in model.parameters()), "methods": {}}
    best_naive = n / min(times["naive"])
    label = f"all-param energy grads, {arch}"
    for k, ts in times.items():
        best, med = n / min(ts), n / float(np.median(ts))
        # paired per-round ratio: each round's naive time over this method's
        paired = float(np.median([tn / tk for tn, tk in zip(times["naive"], ts, strict=True)]))
        v = np.asarray(torch.as_tensor(outs[k]).double())
        if k.startswith("grad-scores"):  # GradNorm's KL loss: only the float64 check applies
            err, err64 = float("nan"), float(np.max(np.abs(v[:k64] - truth_kl) / np.abs(truth_kl)))
        else:
            err = float(np.abs(v - ref).max() / np.abs(ref).max())
            err64 = float(np.max(np.abs(v[:k64] - truth) / np.abs(truth)))
        res["methods"][k] = {"best_per_s": best, "median_per_s": med, "ratio_best": best / best_naive,
                             "ratio_paired_median": paired, "max_rel_diff_vs_naive": err,
                             "max_rel_err_vs_fp64": err64, "seconds": ts}
        tag = " (auto)" if k.split(" ")[-1] == auto and k.startswith(("reduce", "materialize ")) else ""
        name = "naive loop (batch size 1)" if k == "naive" else f"engine {k}{tag}"
        ratio = "" if k == "naive" else f"{best / best_naive:.2f}x ({paired:.2f}x paired)"
        rows.append((label, name, best, ratio, med))
    t, _ = timed(lambda: extraction(model, x, device, bs=chunk), device, repeat=repeats)
    res["forward_only"] = n / t
    rows.append((label, "batched forward alone", n / t, "", float("nan")))
    return res


# -- 4: memory ----------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: reset by exec, unlike ru_maxrss, which a
    child inherits from the parent it was forked from)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(arch, n, chunk, device, mode):
    model, shape = build(arch)
    model = model.to(device)
    eng = GradientEngine(model, params="all", loss="energy", chunk_size=chunk)

    def stream():  # data arrive batch by batch, as from the loader
        g = torch.Generator().manual_seed(2)
        for s in range(0, n, 64):
            yield torch.randn(min(64, n - s), *shape, generator=g)
    total = 0.0
    if mode == "reduce":
        for _, red in eng.iter_reduced(stream(), NormReducer((1,))):
            total += float(red.norm(1).sum())
    else:
        for _, gch in eng.iter_chunks(stream()):
            total += float(gch.abs().sum())
    peak_cuda = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    print(json.dumps({"maxrss_mb": peak_rss_mb(),
                      "cuda_peak_mb": peak_cuda / 2**20, "strategy": eng.strategy_used}))


def bench_memory(arch, sizes, chunk, device, threads):
    out = {}
    for n in sizes:
        out[n] = {}
        for mode in ("materialize", "reduce"):
            cmd = [sys.executable, __file__, "--memory-child", arch, str(n), str(chunk), mode,
                   "--device", device.type, "--threads", str(threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[n][mode] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sample counts (a few minutes)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved timing rounds of the all-parameter benchmarks (default 5)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--memory-child", nargs=4, metavar=("ARCH", "N", "CHUNK", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_child:
        arch, n, chunk, mode = args.memory_child
        memory_child(arch, int(n), int(chunk), device, mode)
        return
    q = args.quick
    repeats = args.repeats or 5
    rows: list[tuple] = []
    load0 = os.getloadavg()
    results = {"device": str(device), "threads": args.threads, "torch": torch.__version__,
               "cpus": os.cpu_count(), "loadavg_start": load0}
    results["last_layer"] = bench_last_layer(100 if q else 400, 2048 if q else 8192, device, rows)
    results["all_cnn"] = bench_all_params("cnn", 64 if q else 256, device, rows, chunk=32, repeats=repeats)
    results["all_resnet18"] = bench_all_params("resnet", 24 if q else 64, device, rows,
                                               chunk=8 if q else 16, repeats=repeats)
    results["memory_cnn"] = bench_memory("cnn", [128, 512] if q else [256, 1024], 32, device, args.threads)
    results["memory_resnet18"] = bench_memory("resnet", [16, 48] if q else [32, 128], 8, device, args.threads)
    results["loadavg_end"] = os.getloadavg()

    print(f"\nper-sample gradients on {device} ({args.threads} threads, {os.cpu_count()} CPUs), "
          f"torch {torch.__version__}; load average (1/5/15 min) at start "
          f"{'/'.join(f'{v:.2f}' for v in load0)}, at end "
          f"{'/'.join(f'{v:.2f}' for v in results['loadavg_end'])}")
    print(f"all-parameter rows: best of {repeats} interleaved rounds (median in brackets); ratio = "
          "best vs best naive, 'paired' = median over rounds of naive time / method time\n")
    print(f"{'benchmark':36s} {'method':44s} {'samples/s':>18s}  ratio")
    for bench, method, rate, ratio, *med in rows:
        m = f"({med[0]:.1f})" if med and med[0] == med[0] else ""
        print(f"{bench:36s} {method:44s} {rate:9.1f} {m:>8s}  {ratio}")
    ll = results["last_layer"]
    print(f"\nclosed-form last-layer scores add {100 * ll['overhead_closed_forms']:.1f}% to the extraction "
          f"pass ({100 * ll['overhead_with_grood']:.1f}% with GROOD's FAISS search); "
          f"max rel. difference vs the naive loop {ll['max_rel_err_vs_naive']:.1e}")
    for arch in ("cnn", "resnet18"):
        r = results[f"all_{arch}"]
        ms = r["methods"]
        worst = np.nanmax([v["max_rel_diff_vs_naive"] for v in ms.values()])
        worst64 = max(v["max_rel_err_vs_fp64"] for v in ms.values())
        for mode in ("reduce", "materialize"):
            cands = [k for k in ms if k.startswith(mode + " ") and "batch(" not in k]
            best = max(cands, key=lambda k: ms[k]["best_per_s"])
            a = f"{mode} {r['auto']}"
            print(f"{arch} {mode}: auto '{r['auto']}' {ms[a]['best_per_s']:.1f}/s "
                  f"({ms[a]['ratio_best']:.2f}x naive), fastest here '{best}' {ms[best]['best_per_s']:.1f}/s")
        print(f"{arch}: naive loop {ms['naive']['best_per_s']:.1f}/s, batched forward "
              f"{r['forward_only']:.1f}/s; norms: max rel. difference vs naive {worst:.1e}, "
              f"max rel. error vs float64 {worst64:.1e} (naive's own: "
              f"{ms['naive']['max_rel_err_vs_fp64']:.1e})")
    for arch in ("cnn", "resnet18"):
        mem = results[f"memory_{arch}"]
        for mode in ("materialize", "reduce"):
            print(f"peak memory, {arch} all-parameter gradients streamed ({mode}): " +
                  ", ".join(f"N={n}: {m[mode]['maxrss_mb']:.0f} MB RSS" for n, m in mem.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
