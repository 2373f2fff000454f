"""Per-sample gradient benchmark: the engine vs the reference code's batch-size-1 loop.

    python benchmarks/bench_grads.py [--quick] [--device cpu|cuda] [--threads N]

Measures, side by side in one run (see benchmarks/README.md):

1. last-layer scores end to end on the demo CNN (forward included): the naive loop
   (one forward + backward per sample, as the GradNorm / Igoe reference code) vs one
   batched extraction pass + closed forms of features and logits;
2. the overhead of the closed-form scores on top of the extraction pass alone;
3. all-parameter energy gradients (E = −logsumexp f) for the demo CNN and the CIFAR
   ResNet-18 (32×32, 11.2M parameters): naive loop vs the engine's strategies;
4. peak resident memory of streamed all-parameter gradients at two data set sizes
   (fresh subprocess per size; the consumer reduces each chunk, as a projection would).
"""

from __future__ import annotations

import argparse
import json
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


def build(arch: str):
    from gradspace.models.architectures import build_model

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
def naive_all(model, x, device):
    params = list(select_params(model, "all").values())
    out = []
    for i in range(x.shape[0]):
        model.zero_grad()
        L.loss_value("energy", model(x[i:i + 1].to(device))).sum().backward()
        out.append(float(sum(p.grad.abs().sum() for p in params)))
    return out


def bench_all_params(arch, n, device, rows, chunk):
    model, shape = build(arch)
    model = model.to(device)
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))
    res = {}
    t, _ = timed(lambda: naive_all(model, x, device), device)
    res["naive_loop"] = n / t
    rows.append((f"all-param energy grads, {arch}", "naive loop (batch size 1)", n / t, ""))
    auto = GradientEngine(model, params="all", loss="energy", chunk_size=chunk).strategy_used
    for strategy in ("vmap", "hooks", "loop"):
        eng = GradientEngine(model, params="all", loss="energy", strategy=strategy, chunk_size=chunk)
        eng.batch(x[:2].to(device))  # warm-up
        t, _ = timed(lambda eng=eng: [g.abs().sum(1) for _, g in eng.iter_chunks(batches(x, chunk))], device)
        res[strategy] = n / t
        tag = " (auto)" if strategy == auto else ""
        rows.append((f"all-param energy grads, {arch}", f"engine {strategy}{tag}", n / t,
                     f"{(n / t) / res['naive_loop']:.2f}x naive"))
    t, _ = timed(lambda: extraction(model, x, device, bs=chunk), device)
    res["forward_only"] = n / t
    rows.append((f"all-param energy grads, {arch}", "batched forward alone", n / t, ""))
    res["auto"] = auto
    res["num_params"] = sum(p.numel() for p in model.parameters())
    return res


# -- 4: memory ----------------------------------------------------------------------------------
def memory_child(arch, n, chunk, device):
    model, shape = build(arch)
    model = model.to(device)
    eng = GradientEngine(model, params="all", loss="energy", chunk_size=chunk)

    def stream():  # data arrive batch by batch, as from the loader
        g = torch.Generator().manual_seed(2)
        for s in range(0, n, 64):
            yield torch.randn(min(64, n - s), *shape, generator=g)
    total = 0.0
    for _, gch in eng.iter_chunks(stream()):
        total += float(gch.abs().sum())
    peak_cuda = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "cuda_peak_mb": peak_cuda / 2**20, "strategy": eng.strategy_used}))


def bench_memory(arch, sizes, chunk, device, threads):
    out = {}
    for n in sizes:
        cmd = [sys.executable, __file__, "--memory-child", arch, str(n), str(chunk), "--device", device.type,
               "--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[n] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sample counts (about a minute)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--memory-child", nargs=3, metavar=("ARCH", "N", "CHUNK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_child:
        arch, n, chunk = args.memory_child
        memory_child(arch, int(n), int(chunk), device)
        return
    q = args.quick
    rows: list[tuple] = []
    results = {"device": str(device), "threads": args.threads, "torch": torch.__version__}
    results["last_layer"] = bench_last_layer(100 if q else 400, 2048 if q else 8192, device, rows)
    results["all_cnn"] = bench_all_params("cnn", 64 if q else 256, device, rows, chunk=32)
    results["all_resnet18"] = bench_all_params("resnet", 4 if q else 16, device, rows, chunk=4)
    results["memory_cnn"] = bench_memory("cnn", [128, 512] if q else [256, 1024], 32, device, args.threads)

    print(f"\nper-sample gradients on {device} ({args.threads} threads), torch {torch.__version__}\n")
    print(f"{'benchmark':34s} {'method':46s} {'samples/s':>10s}  ratio")
    for bench, method, rate, ratio in rows:
        print(f"{bench:34s} {method:46s} {rate:10.1f}  {ratio}")
    ll = results["last_layer"]
    print(f"\nclosed-form last-layer scores add {100 * ll['overhead_closed_forms']:.1f}% to the extraction "
          f"pass ({100 * ll['overhead_with_grood']:.1f}% with GROOD's FAISS search); "
          f"max rel. difference vs the naive loop {ll['max_rel_err_vs_naive']:.1e}")
    for arch in ("cnn", "resnet18"):
        r = results[f"all_{arch}"]
        best = max(("vmap", "hooks", "loop"), key=lambda s: r[s])
        print(f"{arch}: auto picks '{r['auto']}' ({r[r['auto']]:.1f}/s), fastest here '{best}' "
              f"({r[best]:.1f}/s), naive loop {r['naive_loop']:.1f}/s, forward {r['forward_only']:.1f}/s")
    mem = results["memory_cnn"]
    print("peak memory, CNN all-parameter gradients streamed: " +
          ", ".join(f"N={n}: {m['maxrss_mb']:.0f} MB RSS" for n, m in mem.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
