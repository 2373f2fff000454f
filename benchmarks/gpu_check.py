"""One prepared device check of the ImageNet rehearsal's model-running stages.

    bash benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [--budget-s 420] [--out gpu_check.json]

Runs the library functions behind the workflow's model-running jobs on the ImageNet preset's
model (``config/presets/imagenet-resnet50.yaml``: torchvision ResNet-50, 1000 classes,
224 px, subspace blocks {max_params: 2000000}, block_jobs 4), with random weights (seeded,
``weights=None``; BatchNorm statistics calibrated on two synthetic batches) and seeded
synthetic inputs, in fp32 and in bf16 (``torch.autocast``; the package's own ``precision:
bf16`` where a stage has one), and reports per stage:

- throughput (samples/s) in fp32 and bf16, batch counts set by ``--budget-s``;
- FLOPs per sample (``torch.utils.flop_counter.FlopCounterMode`` on the reference batch)
  and the achieved TFLOP/s = FLOPs/sample × samples/s;
- accuracy of bf16 against fp32 on the same reference batch: per-sample relative L2
  (max, median) of per-sample outputs; relative L2 of summed outputs (statistics, AG
  class sums); relative Frobenius error and the largest principal-angle sine between the
  top-r column spaces for the PCA products C·V and the lift Gᵀ·L;
- on CUDA, the same figures for GPU fp32 against CPU fp32 on a small subset;
- peak device memory per stage (CUDA);
- FAISS exact KNN (IndexFlatL2 on normalized features, k as the preset's knn detector) on
  the GPU (``faiss.StandardGpuResources`` / ``index_cpu_to_gpu``) against FAISS on the
  CPU (recall@k, distance error), or the CPU index alone with a note when faiss has no
  GPU support.

Stages (what the workflow job calls):

- ``extract``: ``gradspace.extract.iter_extract`` (features + logits);
- ``grad_scores``: ``gradspace.grads.scoring.GradScorer`` (GradNorm, all parameters);
- ``gradstats_partial``: ``subspace.stats.accumulate_moments`` with ``operators.make_engine``;
- ``ag_partial``: ``subspace.ag.class_sums`` (persample operator, every block). Its class
  sums are P×C float64 (plus a P×C float32 product per batch): for 1000 classes that is
  about 300 GB for ResNet-50, so the check runs ``--ag-classes`` classes (64 on CUDA) and
  reports the memory the preset would need;
- ``pca_gv``: ``subspace.power.gv_products`` per block group (phase 1 of a pca-pass job);
- ``pca_pass_block``: ``power.partial_products_from_gv`` per block group (phase 2);
- ``pca_lift``: ``partial_products_from_gv`` with the k-column lift L per block group;
- ``project``: ``subspace.project.project_batches`` per block group (k columns);
- ``score_model_detector``: ODIN's ``score_batch`` (T = 1000, ε = 0.0014, the preset's).

One "sample" is one input image through the whole stage; for the block-group stages that
is one pass of the sample through every group's job (samples/s of one group job alone is
in ``groups``). Everything is written to ``--out`` as JSON, and a table to stdout.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

STAGES = ("extract", "grad_scores", "gradstats_partial", "ag_partial", "pca_gv", "pca_pass_block",
          "pca_lift", "project", "score_model_detector")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# -- options ----------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke run: ResNet-18, 32 px, 2-sample batches, K'=8, 60 s budget")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the measurements (default 420; 60 with --quick)")
    ap.add_argument("--out", default="gpu_check.json", help="JSON output (default ./gpu_check.json)")
    ap.add_argument("--arch", default=None,
                    help="torchvision architecture (default resnet50, the preset's; resnet18 with --quick)")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=None, help="default 224 (32 with --quick)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="samples per batch of the gradient stages (default 128 on CUDA, 2 with --quick)")
    ap.add_argument("--forward-batch-size", type=int, default=None,
                    help="samples per batch of extract / ODIN (default 256 on CUDA, 4 with --quick)")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="per-sample gradient chunk (default: the batch size, as the preset's 256 >= batch)")
    ap.add_argument("--strategy", default="auto", help="gradient engine strategy (default auto)")
    ap.add_argument("--k", type=int, default=None, help="subspace k (default 32; 4 with --quick)")
    ap.add_argument("--oversample", type=int, default=None,
                    help="default 32 (4 with --quick): K' = k + oversample")
    ap.add_argument("--max-params", type=int, default=2_000_000, help="subspace.blocks.max_params")
    ap.add_argument("--block-jobs", type=int, default=4, help="subspace.block_jobs")
    ap.add_argument("--ag-classes", type=int, default=None,
                    help="classes of the AG class sums (default 64 on CUDA, 4 with --quick)")
    ap.add_argument("--max-batches", type=int, default=None,
                    help="cap on timed batches per stage and precision (default 50; 1 with --quick)")
    ap.add_argument("--cpu-compare", type=int, default=2,
                    help="samples of the GPU-vs-CPU fp32 comparison (CUDA only; 0: skip)")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--no-bf16", action="store_true", help="fp32 only")
    ap.add_argument("--no-faiss", action="store_true", help="skip the FAISS KNN check")
    ap.add_argument("--knn-ref", type=int, default=None, help="FAISS reference rows (50000; 2000 quick)")
    ap.add_argument("--knn-queries", type=int, default=None, help="FAISS queries (10000; 200 quick)")
    ap.add_argument("--knn-dim", type=int, default=None, help="feature dimension (2048; 256 quick)")
    ap.add_argument("--knn-k", type=int, default=None, help="neighbours (1000, the preset's knn; 50 quick)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logit-std", type=float, default=3.0,
                    help="scale the random head to this logit standard deviation (default 3, about a "
                         "trained ImageNet classifier's; 0: keep the init, ~0.3, a near-uniform softmax)")
    ap.add_argument("--residual-gain", type=float, default=0.2,
                    help="scale of each residual block's last BatchNorm (default 0.2; 1 = plain random "
                         "init, a chaotic network whose bf16 errors are ~30%%)")
    a = ap.parse_args(argv)
    cuda = a.device.startswith("cuda")
    q = a.quick

    def pick(value, quick, cuda_value, cpu_value=None):
        if value is not None:
            return value
        if q:
            return quick
        return cuda_value if cuda or cpu_value is None else cpu_value

    a.budget_s = pick(a.budget_s, 60.0, 420.0)
    a.arch = pick(a.arch, "resnet18", "resnet50")
    a.image_size = pick(a.image_size, 32, 224)
    a.batch_size = pick(a.batch_size, 2, 128, 8)
    a.forward_batch_size = pick(a.forward_batch_size, 4, 256, 32)
    a.chunk_size = pick(a.chunk_size, a.batch_size, a.batch_size)
    a.k = pick(a.k, 4, 32)
    a.oversample = pick(a.oversample, 4, 32)
    a.ag_classes = min(pick(a.ag_classes, 4, 64, 16), a.num_classes)
    a.max_batches = pick(a.max_batches, 1, 50)
    a.knn_ref = pick(a.knn_ref, 2000, 50000, 20000)
    a.knn_queries = pick(a.knn_queries, 200, 10000, 1000)
    a.knn_dim = pick(a.knn_dim, 256, 2048)
    a.knn_k = pick(a.knn_k, 50, 1000)
    a.stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in a.stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; known: {', '.join(STAGES)}")
    return a


# -- small helpers ----------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp(device, bf16: bool):
    """bf16 autocast on the device (a no-op context for fp32)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def bf16_support(device) -> tuple[bool, str]:
    try:
        if device.type == "cuda":
            ok = torch.cuda.is_bf16_supported()
            return ok, "" if ok else "torch.cuda.is_bf16_supported() is False"
        a = torch.randn(8, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b = a @ a
        ok = b.dtype == torch.bfloat16
        return ok, "" if ok else "CPU autocast does not produce bf16"
    except Exception as exc:  # noqa: BLE001 - any failure means: not supported here
        return False, f"{type(exc).__name__}: {exc}"


def finite_or_none(v):
    if isinstance(v, dict):
        return {k: finite_or_none(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [finite_or_none(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def per_sample_rel(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-sample relative L2 error of a against the reference b (rows = samples)."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    den = np.maximum(np.linalg.norm(b, axis=1), 1e-300)
    r = np.linalg.norm(a - b, axis=1) / den
    return {"kind": "per_sample", "n": int(r.size), "max_rel_l2": float(r.max()),
            "median_rel_l2": float(np.median(r))}


def aggregate_rel(a_blocks, b_blocks) -> dict:
    """Relative L2 (Frobenius) error of summed outputs (lists of arrays)."""
    num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
              for x, y in zip(a_blocks, b_blocks, strict=True))
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in b_blocks)
    rel = math.sqrt(num / max(den, 1e-300))
    return {"kind": "aggregate", "rel_fro": rel}


def subspace_rel(a_blocks, b_blocks, r: int, device) -> dict:
    """Relative Frobenius error of a P×K matrix given as row blocks, and the largest sine of
    the principal angles between the top-r left singular subspaces of a and b (blockwise
    TSQR in float64 on ``device``, one block's Q factors at a time)."""
    out = aggregate_rel(a_blocks, b_blocks)
    K = np.asarray(a_blocks[0]).shape[1]
    Ra, Rb, cross = [], [], []
    for x, y in zip(a_blocks, b_blocks, strict=True):
        X = torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device)
        Y = torch.as_tensor(np.asarray(y), dtype=torch.float64, device=device)
        Qx, Rx = torch.linalg.qr(X)
        Qy, Ry = torch.linalg.qr(Y)
        # blocks with fewer rows than K give short Q factors: pad R to K rows
        Ra.append(_pad_rows(Rx, K))
        Rb.append(_pad_rows(Ry, K))
        cross.append(_pad_both(Qx.T @ Qy, K))
        del X, Y, Qx, Qy
    Q2a, R2a = torch.linalg.qr(torch.cat(Ra))
    Q2b, R2b = torch.linalg.qr(torch.cat(Rb))
    M = sum(Q2a[i * K:(i + 1) * K].T @ c @ Q2b[i * K:(i + 1) * K] for i, c in enumerate(cross))
    Ua, Sa, _ = torch.linalg.svd(R2a)
    Ub, _, _ = torch.linalg.svd(R2b)
    r = max(1, min(int(r), K))
    cos = torch.linalg.svdvals(Ua[:, :r].T @ M @ Ub[:, :r]).clamp(max=1.0)
    out["top_r"] = r
    out["sin_max"] = float(torch.sqrt(torch.clamp(1.0 - cos.min() ** 2, min=0.0)))
    Sa = Sa.cpu().numpy()
    out["sigma_ratio"] = float(Sa[r] / Sa[r - 1]) if r < Sa.size and Sa[r - 1] > 0 else 0.0
    return out


def _pad_rows(R, K):
    if R.shape[0] == K:
        return R
    return torch.cat([R, R.new_zeros(K - R.shape[0], R.shape[1])])


def _pad_both(C, K):
    out = C.new_zeros(K, K)
    out[:C.shape[0], :C.shape[1]] = C
    return out


def compare(a: dict, b: dict, device, r_pass: int, r_lift: int) -> dict:
    """Accuracy of stage outputs a against the reference b (same structure)."""
    res = {}
    for name, arr in b.get("per_sample", {}).items():
        res[name] = per_sample_rel(a["per_sample"][name], arr)
    for name, arrs in b.get("aggregate", {}).items():
        res[name] = aggregate_rel(a["aggregate"][name], arrs)
    for name, arrs in b.get("subspace", {}).items():
        n = int(b.get("n", 1))
        r = min(r_lift if name == "lift" else r_pass, n)
        res[name] = subspace_rel(a["subspace"][name], arrs, r, device)
    figs = []
    for v in res.values():
        figs.append(v.get("median_rel_l2", v.get("rel_fro")))
    res["summary_rel"] = float(max(figs)) if figs else float("nan")
    return res


# -- the model and the data -------------------------------------------------------------------

def build(args, device):
    from gradspace.models.architectures import build_model

    torch.manual_seed(args.seed)
    model = build_model(f"torchvision:{args.arch}", args.num_classes).to(device)
    # BatchNorm statistics of random weights (mean 0, var 1) let activations grow through
    # 50 layers; calibrate them on two synthetic batches, as trained weights would have
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    n_cal = 16 if args.quick else 32

    def calibrate():
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(n_cal, 3, args.image_size, args.image_size, generator=g, device=device))

    calibrate()
    if args.residual_gain != 1.0:
        # random residual networks are chaotic (a 1e-3 input change moves ResNet-50's logits
        # by ~8%, bf16 rounding by ~30%); damping the residual branches (the last BN scale
        # of each block, torchvision's zero_init_residual sets it to 0) brings the
        # sensitivity nearer that of trained weights, then recalibrate
        from torchvision.models.resnet import BasicBlock, Bottleneck

        with torch.no_grad():
            for m in model.modules():
                last = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
                if last is not None:
                    last.weight.fill_(args.residual_gain)
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()
        calibrate()
    model.eval()
    if args.logit_std > 0:
        # random heads give near-uniform softmax outputs, so that every sample's energy
        # gradient is nearly the same vector; scale the head to trained-like logits
        with torch.no_grad():
            f = model.forward_features(torch.randn(n_cal, 3, args.image_size, args.image_size,
                                                   generator=g, device=device))
            z = model.head(f)
            c = args.logit_std / float(z.std())
            model.head.weight.mul_(c)
            if model.head.bias is not None:
                model.head.bias.mul_(c)
    return model


def conditioning(model, args, device) -> dict:
    """How much the model amplifies rounding: forward on 2 samples (CPU) in fp32 and bf16
    against float64, and the logit change for a 1e-3 relative input perturbation."""
    g = torch.Generator().manual_seed(args.seed + 3)
    x = torch.randn(2, 3, args.image_size, args.image_size, generator=g)
    m64 = copy.deepcopy(model).to("cpu").double().eval()
    m32 = copy.deepcopy(model).to("cpu").float().eval()
    with torch.no_grad():
        y64 = m64(x.double())
        y32 = m32(x).double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = m32(x).double()
        yp = m32(x + 1e-3 * torch.randn(x.shape, generator=g)).double()
    del m64, m32

    def rel(a):
        return float(((a - y64).norm(dim=1) / y64.norm(dim=1)).max())

    return {"logits_fp32_vs_fp64": rel(y32), "logits_bf16_vs_fp64": rel(yb),
            "logits_change_for_1e-3_input_noise": rel(yp), "residual_gain": args.residual_gain,
            "logit_std": args.logit_std, "max_softmax_mean": float(torch.softmax(y64, 1).amax(1).mean())}


def make_pool(args, device, bs, n=2, salt=0):
    """Distinct seeded input batches (x, y, rows) on the device."""
    g = torch.Generator(device=device).manual_seed(args.seed + 100 + salt)
    out = []
    for i in range(n):
        x = torch.randn(bs, 3, args.image_size, args.image_size, generator=g, device=device)
        y = torch.randint(0, args.ag_classes, (bs,), generator=g, device=device)
        out.append((x, y, torch.arange(i * bs, (i + 1) * bs)))
    return out


def timed_batches(pool, n):
    """n batches cycling through the pool with consecutive rows; every x is a fresh tensor
    object (a view), so no operator reuses a cached gradient of an earlier batch."""
    bs = pool[0][0].shape[0]
    return [(pool[i % len(pool)][0].view(pool[i % len(pool)][0].shape), pool[i % len(pool)][1],
             torch.arange(i * bs, (i + 1) * bs)) for i in range(n)]


def subset(batch, m, device):
    x, y, rows = batch
    return [(x[:m].to(device).contiguous(), y[:m].to(device), rows[:m].clone())]


# -- the stages -------------------------------------------------------------------------------

class Env:
    """What the stage factories share: options, layout, block groups, statistics, V, L."""

    def __init__(self, args):
        self.args = args
        self.layout = None
        self.groups = None
        self.stats = {}        # {bf16: GradStats}: each precision normalizes with its own moments,
        #                        as a workflow run in that precision would
        self.V = None          # {block: P_b×K' tensor} on the main device
        self.U_ref = None      # fp32 G·V of the reference batch (numpy N×K')
        self.L_ref = None      # the lift's N×k (first k columns of U_ref)


def engine_for(model, params, args, device, bf16):
    """The package's per-sample energy-gradient engine; bf16 on CPU (which the engine only
    allows on CUDA) is emulated: the engine's bf16 path under CPU autocast."""
    from gradspace.subspace.operators import make_engine

    prec = "bf16" if bf16 and device.type == "cuda" else "fp32"
    eng = make_engine(model, params, 1.0, args.chunk_size, args.strategy, prec)
    if bf16 and device.type != "cuda":
        cpu_bf16(eng)
    return eng


def cpu_bf16(eng):
    """The engine's bf16 path (autocast around its forward/backward, no fp32 destinations
    for the hooks' products) with CPU autocast instead of CUDA's."""
    eng.precision = "bf16"
    eng._precision = lambda: torch.autocast("cpu", dtype=torch.bfloat16)


def group_ops(env, model, device, bf16):
    from gradspace.subspace.operators import make_operator

    ops = {}
    for gname, blocks in env.groups.items():
        eng = engine_for(model, {"names": env.layout.subset(blocks).names}, env.args, device, bf16)
        ops[gname] = make_operator("persample", model, env.layout, env.stats[bf16], 1.0, device,
                                   engine=eng, blocks=blocks)
    return ops


def V_on(env, device, blocks=None, cols=None):
    return {b: (v if cols is None else v[:, :cols]).to(device)
            for b, v in env.V.items() if blocks is None or b in blocks}


def stage_extract(env, model, device, bf16):
    from gradspace.extract import iter_extract

    prec = "bf16" if bf16 and device.type == "cuda" else "fp32"

    def run(batches):
        with amp(device, bf16 and device.type != "cuda"):  # CUDA: the package's precision_context
            outs = list(iter_extract(model, batches, device, precision=prec))
        return {"n": sum(o["logits"].shape[0] for o in outs),
                "per_sample": {k: np.concatenate([o[k] for o in outs]) for k in ("logits", "features")}}
    return run


def stage_grad_scores(env, model, device, bf16):
    from gradspace.grads.scoring import GradScorer, parse_params

    a = env.args
    prec = "bf16" if bf16 and device.type == "cuda" else "fp32"
    p = parse_params({"params": "all", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "device": str(device),
                      "chunk_size": a.chunk_size, "strategy": a.strategy, "precision": prec,
                      "scores": {"gradnorm_all": {"kind": "gradnorm", "p": 1}}})
    scorer = GradScorer(model, p)
    if bf16 and device.type != "cuda":
        make = scorer._make

        def make_bf16(loss):
            eng = make(loss)
            cpu_bf16(eng)
            return eng
        scorer._make = make_bf16

    def run(batches):
        vals = [scorer(x)["gradnorm_all"] for x, _, _ in batches]
        v = np.concatenate(vals)
        return {"n": v.size, "per_sample": {"gradnorm_all": v[:, None]}}
    return run


def stage_gradstats_partial(env, model, device, bf16):
    from gradspace.subspace.stats import accumulate_moments

    eng = engine_for(model, "all", env.args, device, bf16)

    def run(batches):
        s = accumulate_moments(eng, batches, env.layout, device)
        return {"n": int(s["count"]), "aggregate": {"sum": [s["sum"]], "sumsq": [s["sumsq"]]}, "raw": s}
    return run


def stage_ag_partial(env, model, device, bf16):
    from gradspace.subspace.ag import class_sums
    from gradspace.subspace.operators import make_operator

    eng = engine_for(model, "all", env.args, device, bf16)
    op = make_operator("persample", model, env.layout, env.stats[bf16], 1.0, device, engine=eng)

    def run(batches):
        sums, counts = class_sums(op, batches, env.args.ag_classes, device=device)
        blocks = env.layout.block_names
        return {"n": int(counts.sum()), "aggregate": {"class_sums": [sums[b] for b in blocks]}}
    return run


def stage_pca_gv(env, model, device, bf16):
    from gradspace.subspace.power import gv_products

    ops = group_ops(env, model, device, bf16)
    Vs = {g: V_on(env, device, blocks) for g, blocks in env.groups.items()}

    def run(batches, group_times=None):
        U = None
        for g, op in ops.items():
            t0 = time.perf_counter()
            Ug, _rows = gv_products(op, batches, Vs[g])
            _note(group_times, g, time.perf_counter() - t0)
            U = Ug if U is None else U + Ug
        return {"n": U.shape[0], "per_sample": {"GV": U}, "raw": U}
    return run


def _note(group_times, g, dt):
    if group_times is not None:
        group_times[g] = group_times.get(g, 0.0) + dt


def _from_gv_stage(env, model, device, bf16, cols_of, name):
    from gradspace.subspace.power import partial_products_from_gv

    ops = group_ops(env, model, device, bf16)

    def run(batches, group_times=None, U=None):
        n = sum(int(b[0].shape[0]) for b in batches)
        rows = np.concatenate([np.asarray(b[2], np.int64) for b in batches])
        if U is None:  # timing runs: any N×K (the reference runs pass the fp32 G·V rows)
            U = np.random.default_rng(0).standard_normal((n, cols_of(env)))
        W = {}
        for g, op in ops.items():
            t0 = time.perf_counter()
            Wg, _n = partial_products_from_gv(op, batches, U, rows, env.groups[g], device=device)
            _note(group_times, g, time.perf_counter() - t0)
            W.update(Wg)
        return {"n": n, "subspace": {name: [W[b] for b in env.layout.block_names]}}
    return run


def stage_pca_pass_block(env, model, device, bf16):
    return _from_gv_stage(env, model, device, bf16, lambda e: e.args.k + e.args.oversample, "CV")


def stage_pca_lift(env, model, device, bf16):
    return _from_gv_stage(env, model, device, bf16, lambda e: e.args.k, "lift")


def stage_project(env, model, device, bf16):
    from gradspace.runtime import Timer
    from gradspace.subspace.project import project_batches

    ops = group_ops(env, model, device, bf16)
    Vs = {g: V_on(env, device, blocks, env.args.k) for g, blocks in env.groups.items()}

    def run(batches, group_times=None):
        red = gn = None
        for g, op in ops.items():
            t0 = time.perf_counter()
            parts = list(project_batches(op, batches, Vs[g], Timer(), device))
            _note(group_times, g, time.perf_counter() - t0)
            r = np.concatenate([p[2] for p in parts])
            q = np.concatenate([p[3] for p in parts])
            red = r if red is None else red + r
            gn = q if gn is None else gn + q
        return {"n": red.shape[0], "per_sample": {"reduced": red, "gnorm2": gn[:, None]}}
    return run


def stage_score_model_detector(env, model, device, bf16):
    from gradspace.detectors.base import build_detector

    det = build_detector("odin", {"temperature": 1000.0, "epsilon": 0.0014})
    det.set_input_normalization(IMAGENET_MEAN, IMAGENET_STD)
    C = env.args.num_classes

    def run(batches):
        with amp(device, bf16):  # the workflow's score job has no precision option: fp32 there
            s = np.concatenate([det.score_batch(model, x).detach().cpu().double().numpy()
                                for x, _, _ in batches])
        # the part of the ODIN score that varies: max softmax(f/T) - 1/C (T = 1000)
        return {"n": s.size, "per_sample": {"odin_minus_uniform": (s - 1.0 / C)[:, None]}}
    return run


FACTORIES = {name: globals()[f"stage_{name}"] for name in STAGES}
GROUPED = ("pca_gv", "pca_pass_block", "pca_lift", "project")
FORWARD = ("extract", "score_model_detector")


def call(env, stage, run, batches, group_times=None, reference=True):
    """Run a stage on batches. The phase-2 stages get the fp32 reference G·V rows (pca_pass_block)
    or lift L (pca_lift) when ``reference``, else random ones (timing); block-group stages
    add each group's seconds to ``group_times``."""
    kw = {} if stage not in GROUPED else {"group_times": group_times}
    if stage in ("pca_pass_block", "pca_lift") and reference:
        n = sum(int(b[0].shape[0]) for b in batches)
        kw["U"] = (env.U_ref if stage == "pca_pass_block" else env.L_ref)[:n]
    return run(batches, **kw)


def count_flops(fn):
    """(fn(), FLOPs, counter): torch.utils.flop_counter.FlopCounterMode; where its module
    tracking fails (ODIN: autograd.grad with respect to the input), a plain dispatch mode
    with the same per-operator formulas (flop_registry)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter:
            out = fn()
        return out, int(counter.get_total_flops()), "FlopCounterMode"
    except RuntimeError:
        pass
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Count.total += int(formula(*args, **kwargs, out_val=out))
            return out

    with Count():
        out = fn()
    return out, int(Count.total), "flop_registry (dispatch mode)"


# -- the check --------------------------------------------------------------------------------

class Check:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget_s
        self.result = {"meta": {}, "stages": {}, "faiss": None, "errors": []}

    def left(self):
        return self.deadline - time.perf_counter()

    def log(self, msg):
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def peak_reset(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self):
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None

    def run(self):
        a, dev = self.args, self.device
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("gpu_check: --device cuda but CUDA is not available (use --device cpu)")
        if a.threads:
            torch.set_num_threads(a.threads)
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
        warnings.filterwarnings("ignore", message=".*autocast.*")
        bf16_ok, bf16_why = bf16_support(dev)
        if a.no_bf16:
            bf16_ok, bf16_why = False, "--no-bf16"
        from gradspace.runtime import hardware_description
        from gradspace.subspace.layout import build_layout
        from gradspace.subspace.stats import reduce_moments

        meta = self.result["meta"]
        meta.update({
            "device": str(dev), "hardware": hardware_description(dev), "host": platform.node(),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "quick": a.quick, "budget_s": a.budget_s,
            "arch": f"torchvision:{a.arch} (random weights, seed {a.seed}, BN calibrated)",
            "num_classes": a.num_classes, "image_size": a.image_size, "batch_size": a.batch_size,
            "forward_batch_size": a.forward_batch_size, "chunk_size": a.chunk_size, "strategy": a.strategy,
            "k": a.k, "oversample": a.oversample, "ag_classes": a.ag_classes,
            "bf16": {"supported": bf16_ok, "why_not": bf16_why or None,
                     "how": ("torch.autocast(cuda, bfloat16) + the package's precision: bf16"
                             if dev.type == "cuda" else
                             "torch.autocast(cpu, bfloat16) + the engine's bf16 path (emulated: "
                             "the package allows bf16 on CUDA only)")},
            "argv": sys.argv[1:],
        })
        if dev.type == "cuda":
            meta["tf32"] = {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32}
        self.log(f"building {a.arch} on {dev} ({meta['hardware']})")
        model = build(a, dev)
        meta["model_conditioning"] = conditioning(model, a, dev)
        env = Env(a)
        env.layout = build_layout(model, "all", {"max_params": a.max_params})
        env.groups = env.layout.block_groups(a.block_jobs)
        meta["num_params"] = env.layout.num_params
        meta["blocks"] = len(env.layout.block_names)
        meta["block_groups"] = {g: sum(env.layout.block_size(b) for b in bs) for g, bs in env.groups.items()}
        K = a.k + a.oversample
        meta["ag_memory_preset_bytes"] = int(env.layout.num_params * a.num_classes * (8 + 4))
        pool = make_pool(a, dev, a.batch_size)
        fpool = make_pool(a, dev, a.forward_batch_size, salt=1)
        # statistics for the operator stages: moments of two batches, in each precision
        from gradspace.subspace.stats import accumulate_moments

        for bf16 in ([False, True] if bf16_ok else [False]):
            eng = engine_for(model, "all", a, dev, bf16)
            sums = accumulate_moments(eng, [pool[0], pool[1]], env.layout, dev)
            del eng
            env.stats[bf16] = reduce_moments([sums], env.layout)
        gen = torch.Generator(device=dev).manual_seed(a.seed + 7)
        scale = 1.0 / math.sqrt(env.layout.num_params)
        env.V = {b: torch.randn(env.layout.block_size(b), K, generator=gen, device=dev) * scale
                 for b in env.layout.block_names}
        meta["setup_s"] = time.perf_counter() - self.t0
        self.log(f"setup {meta['setup_s']:.1f}s: {env.layout.num_params} parameters, "
                 f"{meta['blocks']} blocks in {len(env.groups)} groups, K'={K}")

        stages = [s for s in STAGES if s in a.stages]
        if "pca_pass_block" in stages or "pca_lift" in stages:  # they need the fp32 G·V rows
            stages = ["pca_gv"] + [s for s in stages if s != "pca_gv"] if "pca_gv" not in stages else stages
        precs = [False, True] if bf16_ok else [False]
        reserve = 0.0
        if dev.type == "cuda" and a.cpu_compare > 0:
            reserve += 0.2 * a.budget_s
        if not a.no_faiss:
            reserve += 0.1 * a.budget_s if dev.type == "cuda" else 0.05 * a.budget_s
        units_left = len(stages) * len(precs)
        for stage in stages:
            rec = self.result["stages"].setdefault(stage, {
                "batch_size": a.forward_batch_size if stage in FORWARD else a.batch_size})
            bpool = fpool if stage in FORWARD else pool
            refs = {}
            for bf16 in precs:
                key = "bf16" if bf16 else "fp32"
                share = max(0.0, (self.left() - reserve) / max(units_left, 1))
                units_left -= 1
                try:
                    refs[key] = self.unit(env, model, stage, bf16, bpool, share, rec)
                except Exception as exc:  # noqa: BLE001 - report and go on with the next stage
                    rec[key] = {"error": f"{type(exc).__name__}: {exc}"}
                    self.result["errors"].append(f"{stage} {key}: {traceback.format_exc(limit=6)}")
                    self.log(f"{stage} {key} FAILED: {type(exc).__name__}: {exc}")
                finally:
                    self.peak_reset()
            if not bf16_ok:
                rec["bf16"] = {"skipped": bf16_why}
            if "fp32" in refs and "bf16" in refs:
                rec["accuracy_bf16_vs_fp32"] = compare(refs["bf16"], refs["fp32"], dev, a.k, a.k)
            if stage == "pca_gv" and "fp32" in refs:
                env.U_ref = refs["fp32"]["raw"]
                env.L_ref = np.ascontiguousarray(env.U_ref[:, :a.k])
            refs.clear()
        # GPU fp32 vs CPU fp32 on a small subset
        if dev.type == "cuda" and a.cpu_compare > 0:
            self.cpu_compare(env, model, stages, pool, fpool)
        if not a.no_faiss:
            try:
                self.result["faiss"] = self.faiss_check()
            except Exception as exc:  # noqa: BLE001
                self.result["faiss"] = {"error": f"{type(exc).__name__}: {exc}"}
                self.result["errors"].append(f"faiss: {traceback.format_exc(limit=6)}")
        meta["wall_s"] = time.perf_counter() - self.t0
        return self.result

    def unit(self, env, model, stage, bf16, pool, share, rec):
        """A reference call on pool[0] (the accuracy output; warm-up; FLOPs in fp32), then
        timed batches, as many as the share of the budget allows (the reference call, with
        warm-up and FLOP counting, overestimates a batch's time). With --quick the bf16
        unit is one timed batch (pool[0]) whose output is the reference."""
        a, dev = self.args, self.device
        key = "bf16" if bf16 else "fp32"
        t_unit = time.perf_counter()
        self.peak_reset()
        run = FACTORIES[stage](env, model, dev, bf16)  # each stage applies its own precision
        ref_batch = [pool[0]]
        out, t_ref = None, None
        if not (a.quick and bf16):
            t = time.perf_counter()
            if not bf16:
                out, flops, how = count_flops(lambda: call(env, stage, run, ref_batch))
                rec["flops_per_sample"] = flops / ref_batch[0][0].shape[0]
                rec["flop_counter"] = how
            else:
                out = call(env, stage, run, ref_batch)
            sync(dev)
            t_ref = time.perf_counter() - t
            n = int(max(1, min(a.max_batches, (share - (time.perf_counter() - t_unit)) // max(t_ref, 1e-6))))
        else:
            n = 1
        batches = timed_batches(pool, n)
        groups = {} if stage in GROUPED else None
        sync(dev)
        t = time.perf_counter()
        timed = call(env, stage, run, batches, group_times=groups, reference=out is None)
        sync(dev)
        dt = time.perf_counter() - t
        if out is None:
            out = timed
        run = timed = None
        samples = n * int(pool[0][0].shape[0])
        r = {"batches": n, "samples": samples, "seconds": dt, "samples_per_s": samples / dt,
             "reference_call_s": t_ref, "peak_memory_bytes": self.peak()}
        fl = rec.get("flops_per_sample")
        if fl:
            r["tflops"] = fl * r["samples_per_s"] / 1e12
        if groups:
            r["groups"] = {g: {"seconds": s, "samples_per_s": samples / s} for g, s in groups.items()}
        rec[key] = r
        tf = f", {r['tflops']:.3f} TFLOP/s" if "tflops" in r else ""
        self.log(f"{stage:>22} {key}: {samples} samples in {dt:.2f}s = {r['samples_per_s']:.2f}/s{tf}")
        return out

    def cpu_compare(self, env, model, stages, pool, fpool):
        a = self.args
        cpu = torch.device("cpu")
        model_cpu = copy.deepcopy(model).to(cpu).eval()
        dev = self.device
        V_dev = env.V
        for stage in stages:
            rec = self.result["stages"][stage]
            if time.perf_counter() > self.deadline - (0.1 * a.budget_s if not a.no_faiss else 0.0):
                rec["accuracy_gpu_vs_cpu"] = {"skipped": "budget"}
                continue
            try:
                t = time.perf_counter()
                src = fpool if stage in FORWARD else pool
                m = min(a.cpu_compare, int(src[0][0].shape[0]))
                outs = {}
                for d, mdl in ((dev, model), (cpu, model_cpu)):
                    env.V = {b: v.to(d) for b, v in V_dev.items()} if d.type == "cpu" else V_dev
                    run = FACTORIES[stage](env, mdl, d, False)
                    outs[d.type] = call(env, stage, run, subset(src[0], m, d))
                    del run
                env.V = V_dev
                acc = compare(outs["cuda"], outs["cpu"], cpu, a.k, a.k)
                acc["samples"] = m
                acc["seconds"] = time.perf_counter() - t
                rec["accuracy_gpu_vs_cpu"] = acc
                self.log(f"{stage:>22} GPU vs CPU fp32: {acc['summary_rel']:.3g} ({acc['seconds']:.1f}s)")
            except Exception as exc:  # noqa: BLE001
                env.V = V_dev
                rec["accuracy_gpu_vs_cpu"] = {"error": f"{type(exc).__name__}: {exc}"}
                self.result["errors"].append(f"{stage} gpu-vs-cpu: {traceback.format_exc(limit=6)}")
            finally:
                self.peak_reset()

    def faiss_check(self):
        a = self.args
        try:
            import faiss
        except ImportError as exc:
            return {"available": False, "note": f"faiss not importable ({exc})"}
        rng = np.random.default_rng(a.seed + 11)

        def normed(n):
            x = rng.standard_normal((n, a.knn_dim), dtype=np.float32)
            return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))

        ref, q = normed(a.knn_ref), normed(a.knn_queries)
        k = min(a.knn_k, a.knn_ref)
        flops_per_query = 2.0 * a.knn_ref * a.knn_dim
        ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        gpu_ok = hasattr(faiss, "StandardGpuResources") and ngpu > 0 and self.device.type == "cuda"
        res = {"available": True, "version": getattr(faiss, "__version__", "?"), "num_gpus": ngpu,
               "index": "IndexFlatL2 (exact, normalized features: the knn detector's)",
               "ref": a.knn_ref, "queries": a.knn_queries, "dim": a.knn_dim, "k": k,
               "faiss_threads": faiss.omp_get_max_threads()}
        cpu_index = faiss.IndexFlatL2(a.knn_dim)
        cpu_index.add(ref)
        # CPU: time a subset of the queries within the remaining budget
        nq_cpu = a.knn_queries if not gpu_ok else min(a.knn_queries, 1000)
        t = time.perf_counter()
        Dc, Ic = cpu_index.search(q[:min(nq_cpu, 16)], k)  # warm-up / first estimate
        est = (time.perf_counter() - t) / min(nq_cpu, 16)
        room = max(self.left(), 0.05 * a.budget_s)
        nq_cpu = int(max(16, min(nq_cpu, room * 0.5 / max(est, 1e-9))))
        t = time.perf_counter()
        Dc, Ic = cpu_index.search(q[:nq_cpu], k)
        dt = time.perf_counter() - t
        res["cpu"] = {"queries": nq_cpu, "seconds": dt, "queries_per_s": nq_cpu / dt,
                      "tflops": flops_per_query * nq_cpu / dt / 1e12}
        if not gpu_ok:
            res["gpu"] = None
            res["note"] = ("faiss has no GPU support here (faiss.get_num_gpus() == 0 or no "
                           "StandardGpuResources)" if self.device.type == "cuda" or ngpu == 0 else
                           "--device cpu: GPU index not tried")
            return res
        gres = faiss.StandardGpuResources()
        gindex = faiss.index_cpu_to_gpu(gres, 0, cpu_index)
        gindex.search(q[:64], k)  # warm-up
        t = time.perf_counter()
        Dg, Ig = gindex.search(q, k)
        dt = time.perf_counter() - t
        res["gpu"] = {"queries": a.knn_queries, "seconds": dt, "queries_per_s": a.knn_queries / dt,
                      "tflops": flops_per_query * a.knn_queries / dt / 1e12}
        m = nq_cpu
        hits = [len(set(Ig[i]) & set(Ic[i])) for i in range(m)]
        res["gpu_vs_cpu"] = {"queries": m, "recall_at_k": float(np.mean(hits)) / k,
                             "min_recall_at_k": float(np.min(hits)) / k,
                             "max_abs_distance_error": float(np.abs(Dg[:m] - Dc[:m]).max()),
                             "max_rel_distance_error": float((np.abs(Dg[:m] - Dc[:m])
                                                              / np.maximum(np.abs(Dc[:m]), 1e-12)).max()),
                             "kth_distance_rel_error": float(np.abs(Dg[:m, -1] - Dc[:m, -1]).max()
                                                             / max(float(np.abs(Dc[:m, -1]).max()), 1e-12))}
        del gindex, gres
        return res


# -- report -----------------------------------------------------------------------------------

def _fmt(v, spec=".3g"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def table(result) -> str:
    meta = result["meta"]
    lines = [f"gpu_check: {meta.get('hardware')} ({meta.get('device')}), torch {meta.get('torch')}, "
             f"{meta.get('arch')}, {meta.get('image_size')} px, {meta.get('num_params')} parameters, "
             f"{meta.get('blocks')} blocks / {len(meta.get('block_groups') or {})} groups, "
             f"K'={meta.get('k', 0) + meta.get('oversample', 0)}, wall {_fmt(meta.get('wall_s'), '.1f')} s",
             ""]
    head = ("stage", "bs", "GFLOP/smp", "fp32 smp/s", "fp32 TFLOP/s", "bf16 smp/s", "bf16 TFLOP/s",
            "bf16 err med", "bf16 err max", "GPU-CPU err", "peak GiB")
    rows = [head]
    for name, rec in result["stages"].items():
        f, b = rec.get("fp32", {}), rec.get("bf16", {})
        acc = rec.get("accuracy_bf16_vs_fp32") or {}
        med = acc.get("summary_rel")
        mx = max([v.get("max_rel_l2", v.get("rel_fro", float("nan"))) for v in acc.values()
                  if isinstance(v, dict)] or [float("nan")])
        gc = (rec.get("accuracy_gpu_vs_cpu") or {}).get("summary_rel")
        peak = f.get("peak_memory_bytes")
        fl = rec.get("flops_per_sample")
        rows.append((name, str(rec.get("batch_size")), _fmt(fl / 1e9 if fl else None, ".2f"),
                     _fmt(f.get("samples_per_s"), ".2f") if "error" not in f else "ERROR",
                     _fmt(f.get("tflops"), ".3f"),
                     _fmt(b.get("samples_per_s"), ".2f") if "error" not in b else "ERROR",
                     _fmt(b.get("tflops"), ".3f"), _fmt(med), _fmt(mx), _fmt(gc),
                     _fmt(peak / 2**30 if peak else None, ".1f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                            strict=True))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    for name, rec in result["stages"].items():
        for key in ("accuracy_bf16_vs_fp32", "accuracy_gpu_vs_cpu"):
            acc = rec.get(key)
            if not isinstance(acc, dict):
                continue
            parts = []
            for arr, v in acc.items():
                if not isinstance(v, dict):
                    continue
                if v.get("kind") == "per_sample":
                    parts.append(f"{arr}: rel L2 med {_fmt(v['median_rel_l2'])} max {_fmt(v['max_rel_l2'])}")
                elif "sin_max" in v:
                    parts.append(f"{arr}: rel Fro {_fmt(v['rel_fro'])}, sin(top-{v['top_r']}) "
                                 f"{_fmt(v['sin_max'])}")
                elif "rel_fro" in v:
                    parts.append(f"{arr}: rel L2 {_fmt(v['rel_fro'])}")
            if parts:
                what = "bf16 vs fp32" if key.endswith("fp32") else "GPU vs CPU fp32"
                lines.append(f"  {name} {what}: " + "; ".join(parts))
    fz = result.get("faiss")
    if fz:
        lines.append("")
        if not fz.get("available", True) or "error" in fz:
            lines.append(f"faiss: {fz.get('note') or fz.get('error')}")
        else:
            c = fz["cpu"]
            lines.append(f"faiss {fz['version']} KNN {fz['ref']}x{fz['dim']} ref, k={fz['k']}: CPU "
                         f"{c['queries_per_s']:.1f} queries/s ({c['tflops']:.3f} TFLOP/s, "
                         f"{c['queries']} queries, {fz['faiss_threads']} threads)")
            if fz.get("gpu"):
                g, cmp_ = fz["gpu"], fz["gpu_vs_cpu"]
                lines.append(f"  GPU {g['queries_per_s']:.1f} queries/s ({g['tflops']:.3f} TFLOP/s, "
                             f"{g['queries']} queries); vs CPU on {cmp_['queries']}: recall@k "
                             f"{cmp_['recall_at_k']:.5f} (min {cmp_['min_recall_at_k']:.4f}), distance error "
                             f"{cmp_['max_abs_distance_error']:.2e} abs")
            else:
                lines.append(f"  GPU: {fz.get('note')}")
    if result.get("errors"):
        lines.append("")
        lines.append(f"{len(result['errors'])} error(s): see 'errors' in the JSON")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    check = Check(args)
    try:
        result = check.run()
    except SystemExit:
        raise
    except Exception:  # noqa: BLE001 - still write what we have
        check.result["errors"].append(traceback.format_exc())
        result = check.result
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(finite_or_none(result), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, out)
    print(table(result))
    print(f"\nwritten: {out}")
    return 1 if result.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
