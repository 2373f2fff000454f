"""CLI commands of the subspace stage (issue 4). Every command takes explicit input and
output paths, hyperparameters as ``--params JSON``, writes atomically and raises
GradspaceError for bad input. ``--timing FILE`` (optional) writes a JSON record of the
in-job timers (CUDA-synchronized), the sample count and the hardware, for the timing
tables (paper Tables 11 and 12).

The PCA is unrolled into data passes: ``pca-init`` → for t = 0, 1, …, T (``pca-pass``
per data part — a set of ID-train shards — then ``pca-reduce``: V_{t+1}, the Krylov
record and diagnostics of pass t) → ``pca-lift`` per data part → ``pca-finalize``.
With parameter-block groups (``subspace.block_jobs``) each ``pca-pass`` becomes two
jobs per (part, group): ``pca-gv`` (G_g·V_g, only the group's blocks of V loaded), then
``pca-pass --gv <parts of every group>`` (G_bᵀ(G·V) for the group's blocks, no V);
``project --block-group`` per group, then ``project-merge``.

Where G fits in memory (``subspace.solver: exact``, or ``auto`` when ``pca-solver`` finds
that it fits ``subspace.exact_max_gib``), ``pca-exact`` replaces all of that with one data
pass (G materialized, exact eigendecomposition of GGᵀ, see ``exact.py``) and
``pca-finalize --exact`` moves its store into place.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..job import batch_source, open_model
from ..params import Schema, merge_params

log = logging.getLogger(__name__)

# the options every model-running subspace job takes, defaults from the config schema
COMPUTE_DEFAULTS = {"device": Schema("compute.device"), "batch_size": Schema("compute.batch_size"),
                    "num_workers": Schema("compute.num_workers"),
                    # the model's input normalization: no default (checked where it is used)
                    "mean": None, "std": None, "chunk_size": Schema("subspace.chunk_size"),
                    "strategy": Schema("subspace.strategy"),
                    "direction_chunk": Schema("subspace.direction_chunk"),
                    "precision": Schema("compute.precision")}
STATS_DEFAULTS = {"params": Schema("subspace.params"), "blocks": Schema("subspace.blocks"),
                  "temperature": Schema("subspace.temperature")}
METHOD = {"method": Schema("subspace.method")}


def _opts(params: dict, defaults: dict, command: str, required=()) -> dict:
    return merge_params(params, {**COMPUTE_DEFAULTS, **defaults}, f"{command} --params", required)


def job_options(params: dict | None = None, command: str = "job") -> dict:
    """The options of a model-running subspace job: ``params`` over the schema's defaults
    (for scripts that build operators the way the jobs do, e.g. the benchmarks)."""
    return _opts(params, {**STATS_DEFAULTS, **METHOD}, command)


def _write_timing(path, command, timer, device, n, extra=None):
    if not path:
        return
    from ..runtime import hardware_description
    from .diagnostics import write_json

    write_json(path, {"command": command, "seconds": dict(timer.totals), "n": int(n),
                      "device": str(device), "hardware": hardware_description(device),
                      **dict(extra or {})})


def _layout_check(model, stats, where):
    from .layout import resolve_params

    sel = resolve_params(model, stats.selection)
    names = list(sel)
    if names != stats.layout.names or [tuple(p.shape) for p in sel.values()] != stats.layout.shapes:
        raise ConfigError(f"{where}: the model's parameters differ from those of the gradient statistics")


def _load_stats(path):
    from .stats import read_stats

    return read_stats(path)


def _operator(method, model, stats, o, device, blocks=None):
    """The product operator; ``blocks``: the only blocks this job multiplies with (a
    block-group job), so ``persample`` differentiates just their parameters."""
    from .operators import make_operator

    _layout_check(model, stats, "model vs. statistics")
    return make_operator(method, model, stats.layout, stats, stats.temperature, device,
                         params=stats.selection, chunk_size=int(o["chunk_size"]),
                         direction_chunk=int(o["direction_chunk"]), strategy=o["strategy"],
                         precision=o["precision"], blocks=blocks)


# -- gradstats ------------------------------------------------------------------------------

def cmd_gradstats_partial(a):
    from ..runtime import Timer
    from .layout import build_layout
    from .operators import make_engine
    from .stats import accumulate_moments, save_partial

    o = _opts(a.params, STATS_DEFAULTS, "gradstats-partial")
    dev, model, _ = open_model(a.model, o)
    layout = build_layout(model, o["params"], o["blocks"])
    eng = make_engine(model, o["params"], float(o["temperature"]), int(o["chunk_size"]), o["strategy"],
                      o["precision"])
    timer = Timer()
    with timer("total", dev):
        sums = accumulate_moments(eng, _shard_batches(a.data_dir, a.shards, o, dev, "gradstats-partial"),
                                  layout, dev, timer)
    save_partial(a.out, sums, layout, {"shard": _part_label(a.shards), "shards": [int(s) for s in a.shards],
                                       "selection": o["params"], "temperature": float(o["temperature"]),
                                       "blocks_spec": o["blocks"]})
    _write_timing(a.timing, "gradstats-partial", timer, dev, sums["count"],
                  {"num_params": layout.num_params, "strategy": eng.strategy_used})


def cmd_gradstats_reduce(a):
    from .stats import load_partial, normalize_options, reduce_moments, write_stats

    parts, layout, meta0 = [], None, None
    for p in a.partials:
        z, lay, meta = load_partial(p)
        if layout is None:
            layout, meta0 = lay, meta
        else:
            layout.same_as(lay, str(p))
            if meta.get("selection") != meta0.get("selection") or meta.get("temperature") != meta0.get(
                    "temperature"):
                raise ConfigError(f"{p}: parameter selection/temperature differ from {a.partials[0]}")
        parts.append(z)
    if layout is None:
        raise DataError("gradstats-reduce: no --partials given")
    opts = normalize_options((a.params or {}).get("normalize", a.params))
    stats = reduce_moments(parts, layout, opts, where=", ".join(map(str, a.partials[:3])))
    stats.selection = meta0.get("selection", "all")
    stats.temperature = float(meta0.get("temperature", 1.0))
    write_stats(a.out, stats, {"shards": len(parts)})
    log.info("gradient statistics over %d samples, %d parameters, E||G||^2 = %.4g -> %s",
             stats.count, layout.num_params, stats.total_variance, a.out)


# -- AG ---------------------------------------------------------------------------------------

def cmd_ag_partial(a):
    from ..runtime import Timer
    from .ag import class_sums, write_ag_partial

    o = _opts(a.params, {**METHOD, "num_classes": None}, "ag-partial")
    dev, model, meta = open_model(a.model, o)
    stats = _load_stats(a.stats)
    C = int(o["num_classes"] or meta.get("num_classes") or model.num_classes)
    op = _operator(o["method"], model, stats, o, dev)
    timer = Timer()
    part = _part_label(a.shards)
    classes = None
    if a.classes:
        from .ag import class_range

        jobs, _, index = a.classes.partition("/")
        classes = class_range(C, int(jobs), int(index)) if index else None
        if classes is None:
            raise ConfigError(f"ag-partial --classes {a.classes!r}: expected JOBS/INDEX, e.g. 8/0")
        part = f"classes {classes[0]}-{classes[1]} of shards {part}"
    with timer("total", dev):
        sums, counts = class_sums(op, _shard_batches(a.data_dir, a.shards, o, dev, "ag-partial"), C, timer,
                                  dev, where=f"{a.data_dir} shards {part}", classes=classes)
    write_ag_partial(a.out, stats.layout, sums, counts, {"shard": part, "shards": [int(s) for s in a.shards],
                                                         "method": o["method"],
                                                         **({"classes": list(classes)} if classes else {})})
    _write_timing(a.timing, "ag-partial", timer, dev, counts.sum(), {"method": o["method"]})


def cmd_ag_reduce(a):
    from .ag import reduce_ag

    o = merge_params(a.params, {"orthonormalize": Schema("subspace.ag.orthonormalize")}, "ag-reduce --params")
    stats = _load_stats(a.stats)
    t0 = time.perf_counter()
    info = reduce_ag(a.partials, stats.layout, a.out, bool(o["orthonormalize"]), stats)
    log.info("AG subspace k=%d (rank %s) in %.2fs -> %s", info["k"], info["rank"], time.perf_counter() - t0,
             a.out)
    if a.release:
        from .io import release_consumed

        release_consumed(a.release, "the AG partials this reduce consumed")


# -- PCA --------------------------------------------------------------------------------------

PCA_INIT_KEYS = ("k", "oversample", "seed")


def cmd_pca_init(a):
    from .power import init_basis

    # k, oversample and seed come from the config (subspace.k, subspace.oversample, seed)
    # only: no second default here. k then travels with the basis (its attrs) to every pass,
    # the Krylov records and pca-finalize.
    o = merge_params(a.params, {}, "pca-init --params", required=PCA_INIT_KEYS)
    stats = _load_stats(a.stats)
    init_basis(a.out, stats.layout, int(o["k"]), int(o["oversample"]), int(o["seed"]))


def _job_blocks(layout, a):
    """The parameter blocks of this job: --block-group (one group of subspace.block_jobs)
    or --blocks (names); default all."""
    return layout.select_blocks(getattr(a, "blocks", None), getattr(a, "block_group", None) or None)


def _shard_batches(data_dir, shards, o, device, name):
    """Batches of several shards of one dataset, in shard order, with progress logging."""
    from ..data.loader import num_samples
    from ..runtime import paused_iter, progress

    shards = [int(s) for s in shards]
    total = sum(num_samples(data_dir, s) for s in shards)

    def gen():
        for s in shards:
            yield from batch_source(data_dir, s, o, device)()

    return paused_iter(name, progress(f"{name} shards {shards[0]}..{shards[-1]}", gen(), total))


def _iteration_job(a, command):
    """What a PCA pass job (pca-pass, pca-gv) starts from: options, device, model,
    statistics, the basis V_t (group, attrs, layout), pass t and the job's blocks."""
    from .power import read_basis

    o = _opts(a.params, METHOD, command)
    dev, model, _ = open_model(a.model, o)
    stats = _load_stats(a.stats)
    group, battrs, layout = read_basis(a.basis, "basis")
    layout.same_as(stats.layout, f"{a.basis} vs. {a.stats}")
    return o, dev, model, stats, group, battrs, layout, int(battrs["iteration"]), _job_blocks(layout, a)


def _part_label(shards) -> str:
    return "-".join(str(int(s)) for s in shards)


def cmd_pca_pass(a):
    from ..runtime import Timer
    from .io import release_consumed
    from .power import load_basis_tensors, load_gv, partial_products, partial_products_from_gv, write_partial

    release_consumed(a.release, "parts of the previous pass")
    o, dev, model, stats, group, battrs, layout, it, blocks = _iteration_job(a, "pca-pass")
    # phase 2 of a block-group job needs only its own blocks' gradients; a one-phase job
    # needs every block for G·V
    op = _operator(o["method"], model, stats, o, dev, blocks if a.gv else None)
    timer = Timer()
    part = _part_label(a.shards)
    U = rows = None
    with timer("total", dev):
        batches = _shard_batches(a.data_dir, a.shards, o, dev, "pca-pass")
        if a.gv:  # phase 2 of a block-group job: G·V from the pca-gv parts, V not loaded
            Ug, rg = load_gv(a.gv, layout, it, part)
            W, n = partial_products_from_gv(op, batches, Ug, rg, blocks, timer, dev,
                                            where=f"{a.data_dir} shards {part}")
        else:
            V = load_basis_tensors(group, layout, dev, a.basis)
            W, n, U, rows = partial_products(op, batches, V, blocks, timer, dev, keep_images=True)
    keep = {key: battrs[key] for key in ("k", "oversample", "columns", "seed") if key in battrs}
    write_partial(a.out, layout, W, n, {"iteration": it, "shard": part, "shards": [int(s) for s in a.shards],
                                        "method": o["method"], **keep}, images=U, rows=rows)
    _write_timing(a.timing, "pca-pass", timer, dev, n, {"method": o["method"], "iteration": it})


def cmd_pca_gv(a):
    from ..runtime import Timer
    from .io import release_consumed
    from .power import gv_products, load_basis_tensors, write_gv

    release_consumed(a.release, "parts of the previous pass")
    o, dev, model, stats, group, battrs, layout, it, blocks = _iteration_job(a, "pca-gv")
    op = _operator(o["method"], model, stats, o, dev, blocks)
    V = load_basis_tensors(group, layout, dev, a.basis, blocks)
    timer = Timer()
    with timer("total", dev):
        U, rows = gv_products(op, _shard_batches(a.data_dir, a.shards, o, dev, "pca-gv"), V, timer, dev)
    write_gv(a.out, layout, U, rows, blocks, {"iteration": it, "shard": _part_label(a.shards),
                                              "method": o["method"]})
    _write_timing(a.timing, "pca-gv", timer, dev, U.shape[0],
                  {"method": o["method"], "iteration": it, "blocks": blocks})


def cmd_pca_reduce(a):
    from .diagnostics import write_json
    from .io import release_consumed
    from .power import reduce_pass

    o = merge_params(a.params, {"solver": "krylov"}, "pca-reduce --params")
    solver = o["solver"]
    if solver not in ("krylov", "power"):
        raise ConfigError(f"pca-reduce: the iterative solver must be krylov or power, got {solver!r}")
    stats = _load_stats(a.stats)
    diag = reduce_pass(a.parts, a.out_basis, a.out_krylov, stats, a.krylov or [], a.gv,
                       window=1 if solver == "power" else None, scratch_dir=Path(a.out_basis).parent)
    if diag["max_residual"] is None:
        log.info("PCA pass %d: first block of images stored (Rayleigh–Ritz from pass 1 on)", diag["pass"])
    else:
        log.info("PCA pass %d: Krylov dimension %d, top-%d captured %.4f, largest residual %.3g, "
                 "subspace change %s", diag["pass"], diag["krylov_dim"], diag["k"],
                 diag["captured_variance_topk"] or float("nan"), diag["max_residual"],
                 "n/a" if diag["subspace_change_topk"] is None else f"{diag['subspace_change_topk']:.3g}")
    if a.diagnostics:
        write_json(a.diagnostics, diag)
    release_consumed(a.release, "the basis the pass read")


def cmd_pca_diagnostics(a):
    """The diagnostics JSON of one pass, from its Krylov record (the checkpoint whose
    output decides whether another pass is needed)."""
    from .diagnostics import write_json
    from .power import krylov_diagnostics

    write_json(a.out, krylov_diagnostics(a.krylov))


def cmd_pca_settings(a):
    """The PCA's stopping settings as a file: pca_lift and pca_finalize read it, so a change
    of subspace.tol / iterations reruns them (Snakemake does not check the params of jobs
    whose inputs come from checkpoints), and their input functions then pick the pass
    that meets the new setting — extending the run, or lifting an earlier pass."""
    from .diagnostics import write_json

    o = merge_params(a.params, {}, "pca-settings --params",
                     required=("tol", "iterations", "max_iterations", "solver"),
                     optional=("k", "exact_max_gib"))
    write_json(a.out, o)


def cmd_pca_lift(a):
    from ..runtime import Timer
    from .io import release_consumed
    from .power import partial_products_from_gv, read_lift, write_lift

    release_consumed(a.release, "parts of the final pass")
    o = _opts(a.params, METHOD, "pca-lift")
    dev, model, _ = open_model(a.model, o)
    stats = _load_stats(a.stats)
    layout = stats.layout
    blocks = _job_blocks(layout, a)
    L, rows, kattrs = read_lift(a.krylov)
    shard_rows = np.concatenate([_shard_rows(a.data_dir, s) for s in a.shards])
    pos = np.searchsorted(rows, shard_rows)
    if np.any(pos >= rows.size) or not np.array_equal(rows[np.minimum(pos, rows.size - 1)], shard_rows):
        raise DataError(f"{a.krylov}: the Krylov record does not cover the samples of {a.data_dir} "
                        f"shards {a.shards}")
    op = _operator(o["method"], model, stats, o, dev, blocks)
    timer = Timer()
    with timer("total", dev):
        V, n = partial_products_from_gv(op, _shard_batches(a.data_dir, a.shards, o, dev, "pca-lift"),
                                        L[pos], shard_rows, blocks, timer, dev,
                                        where=f"{a.data_dir} shards {_part_label(a.shards)}")
    write_lift(a.out, layout, V, n, {"iteration": int(kattrs["pass"]), "shard": _part_label(a.shards),
                                     "method": o["method"]})
    _write_timing(a.timing, "pca-lift", timer, dev, n, {"method": o["method"]})


def _shard_rows(data_dir, shard):
    from ..data.manifest import read_manifest

    df = read_manifest(data_dir)
    return np.flatnonzero(df["shard"].to_numpy() == int(shard)).astype(np.int64)


def cmd_pca_finalize(a):
    import json

    from .power import finalize_pca

    o = merge_params(a.params, {"tol": Schema("subspace.tol")}, "pca-finalize --params")
    stats = _load_stats(a.stats)
    if a.exact:
        if a.parts or a.krylov:
            raise ConfigError("pca-finalize: give either --exact or --parts/--krylov")
        return _install_exact(a.exact, a.out, stats, o.get("tol"))
    if not a.parts or not a.krylov:
        raise ConfigError("pca-finalize needs --parts and --krylov (the iterative path) or --exact")
    curve = []
    for p in a.diagnostics or []:
        d = json.loads(Path(p).read_text())
        curve.append({key: d.get(key) for key in ("pass", "max_residual", "captured_variance_topk",
                                                  "subspace_change_topk", "krylov_dim")})
    info = finalize_pca(a.parts, a.krylov, a.out, stats, o.get("tol"), curve)
    log.info("PCA subspace k=%d after %d data passes: explained variance %.4f, largest residual %.3g "
             "(tol %s), orthonormality error %.1e -> %s", info["k"], info["passes"],
             sum(info["explained_variance_ratio"] or [0]), info["max_residual"], info["tol"],
             info["orthonormality_error"], a.out)
    if info["unconverged"]:
        log.warning("PCA: %d of %d directions did not meet subspace.tol = %s after %d Krylov blocks "
                    "(directions %s, residuals up to %.3g): raise subspace.max_iterations or "
                    "subspace.oversample, or use iterations: auto", len(info["unconverged"]), info["k"],
                    info["tol"], info["iterations"], info["unconverged"][:10], info["max_residual"])



# -- exact in-memory PCA ----------------------------------------------------------------------

# pca-solver and pca-exact take k and the budget from the config (subspace.k,
# subspace.exact_max_gib, subspace.tol) only: required, no defaults of their own.
EXACT_KEYS = ("k", "exact_max_gib", "tol")
SOLVER_KEYS = ("solver", "k", "exact_max_gib")


def cmd_pca_solver(a):
    """The solver of subspace.solver: auto, decided from the statistics (N = ID-train
    samples, P = selected parameters) against subspace.exact_max_gib: the checkpoint whose
    output routes the workflow to pca_exact or to the data passes."""
    from .diagnostics import write_json
    from .exact import GIB, choose_solver, exact_pca_bytes

    o = merge_params(a.params, {}, "pca-solver --params", required=SOLVER_KEYS)
    stats = _load_stats(a.stats)
    n, p, k = int(stats.count), int(stats.layout.num_params), int(o["k"])
    budget = float(o["exact_max_gib"]) * GIB
    solver = choose_solver(o["solver"], n, p, k, budget)
    need = exact_pca_bytes(n, p, k)
    write_json(a.out, {"solver": solver, "configured": o["solver"], "n": n, "p": p, "k": k,
                       "exact_bytes": need, "exact_max_gib": float(o["exact_max_gib"])})
    log.info("PCA solver %s (%s): the exact path needs %.2f GiB for N = %d, P = %d, k = %d; "
             "subspace.exact_max_gib = %s", solver, o["solver"], need / GIB, n, p, k, o["exact_max_gib"])


def cmd_pca_exact(a):
    """The PCA subspace in one data pass: G (N×P) materialized, exact eigendecomposition of
    GGᵀ (float64), V = GᵀUΛ^(-1/2); written as the subspace store pca-finalize installs."""
    from ..runtime import Timer
    from .exact import GIB, check_budget, exact_pca, write_exact

    o = _opts(a.params, METHOD, "pca-exact", required=EXACT_KEYS)
    stats = _load_stats(a.stats)
    n, p, k = int(stats.count), int(stats.layout.num_params), int(o["k"])
    need = check_budget(n, p, k, float(o["exact_max_gib"]) * GIB)
    dev, model, _ = open_model(a.model, o)
    op = _operator("persample", model, stats, o, dev)   # explicit gradients whatever subspace.method
    timer = Timer()
    log.info("exact PCA: N = %d, P = %d, k = %d, %.2f GiB in memory", n, p, k, need / GIB)
    with timer("total", dev):
        V, info = exact_pca(op, _shard_batches(a.data_dir, a.shards, o, dev, "pca-exact"), n, k, timer, dev,
                            stats)
    attrs = write_exact(a.out, stats.layout, V, info, o["tol"])
    log.info("exact PCA k=%d: explained variance %.4f, largest residual %.2g, orthonormality error %.1e, "
             "seconds %s -> %s", k, sum(attrs["explained_variance_ratio"] or [0]), attrs["max_residual"],
             attrs["orthonormality_error"], {key: round(v, 2) for key, v in info["seconds"].items()}, a.out)
    _write_timing(a.timing, "pca-exact", timer, dev, n, {"seconds_parts": info["seconds"]})


def _install_exact(src, out, stats, tol):
    """pca-finalize --exact: move the store pca-exact wrote into place (a rename: no copy
    of P×k), after checking it is a complete exact PCA store over the statistics' samples
    and layout, with the tolerance of this run."""
    import os
    import shutil

    from ..errors import StoreError
    from ..store import quick_check
    from .io import open_blocks

    quick_check(src)
    _, attrs, layout = open_blocks(src, "subspace")
    layout.same_as(stats.layout, f"{src} vs. statistics")
    if attrs.get("solver") != "exact" or attrs.get("type") != "pca":
        raise StoreError(f"{src}: not an exact PCA store (solver {attrs.get('solver')!r})")
    if int(attrs.get("n", -1)) != int(stats.count):
        raise StoreError(f"{src}: exact PCA over {attrs.get('n')} samples, the statistics {stats.count}")
    if attrs.get("tol") != tol:
        res = np.asarray(attrs["residuals"], np.float64)
        unconverged = [] if tol is None else [int(j) for j in np.flatnonzero(res > float(tol))]
        import zarr

        zarr.open_group(str(src), mode="r+", zarr_format=3).attrs.update(
            {"tol": tol, "converged": None if tol is None else not unconverged, "unconverged": unconverged})
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    os.replace(src, out)
    log.info("PCA subspace (exact, k=%s, one data pass): largest residual %.2g, orthonormality error "
             "%.1e -> %s", attrs.get("k"), attrs.get("max_residual"), attrs.get("orthonormality_error"), out)

# -- projection -------------------------------------------------------------------------------

def cmd_project(a):
    from ..data.loader import num_samples
    from ..data.manifest import shard_layout
    from ..runtime import Timer, hardware_description, paused_iter
    from .io import release_consumed
    from .power import load_basis_tensors, read_basis
    from .project import project_batches, write_reduced

    release_consumed(a.release, "AG partials")
    o = _opts(a.params, {"method": Schema("subspace.project.method"), "space": None}, "project")
    dev, model, _ = open_model(a.model, o)
    stats = _load_stats(a.stats)
    group, sattrs, layout = read_basis(a.subspace, "subspace")
    layout.same_as(stats.layout, f"{a.subspace} vs. {a.stats}")
    blocks = _job_blocks(layout, a)
    op = _operator(o["method"], model, stats, o, dev, blocks)
    V = load_basis_tensors(group, layout, dev, a.subspace, blocks)
    K = next(iter(V.values())).shape[1]
    n = num_samples(a.data_dir, a.shard)
    timer = Timer()
    t0 = time.perf_counter()
    from ..runtime import progress

    batches = paused_iter("project", progress(f"project {a.data_dir} shard {a.shard}",
                                                batch_source(a.data_dir, a.shard, o, dev)(), n))
    write_reduced(a.out, n, K, project_batches(op, batches, V, timer, dev),
                  {"space": o["space"] or sattrs.get("type"), "subspace_type": sattrs.get("type"), "k": K,
                   "blocks": blocks, "shard": a.shard, "method": o["method"],
                   "timing": {"n": n, "device": str(dev), "hardware": hardware_description(dev)}},
                  timer, layout=shard_layout(a.data_dir, a.shard))
    timer.totals["total"] = time.perf_counter() - t0
    _write_timing(a.timing, "project", timer, dev, n, {"method": o["method"], "k": K,
                                                       "num_params": layout.num_params})


def cmd_project_merge(a):
    from .power import read_basis
    from .project import merge_parts

    _, _, layout = read_basis(a.subspace, "subspace")
    merge_parts(a.parts, a.out, layout.block_names)


# -- diagnostics ------------------------------------------------------------------------------

def _parse_sets(items, what):
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{what}: expected DATASET=PATH[,PATH...], got {item!r}")
        k, v = item.split("=", 1)
        out.setdefault(k, []).extend(p for p in v.split(",") if p)
    return out


def cmd_subspace_diagnostics(a):
    from ..store import store_attrs
    from .diagnostics import store_diagnostics

    attrs = store_attrs(a.subspace)
    store_diagnostics(attrs, _parse_sets(a.reduced, "--reduced"), a.out_dir, a.space or attrs.get("type"))


def cmd_gradient_diagnostics(a):
    from ..data.loader import num_samples
    from .diagnostics import (
        _write_csv,
        gradient_pass_diagnostics,
        load_class_means,
        nn_mean_distance,
        reduced_rows,
        sample_rows,
        write_json,
    )
    from .io import open_blocks

    o = _opts(a.params, {"n_samples": Schema("subspace.diagnostics.n_samples"), "seed": Schema("seed"),
                         "max_gib": Schema("subspace.diagnostics.max_gib")}, "gradient-diagnostics")
    dev, model, _ = open_model(a.model, o)
    stats = _load_stats(a.stats)
    op = _operator("persample", model, stats, o, dev)
    data = {k: v[0] for k, v in _parse_sets(a.data, "--data").items()}
    reduced = {space_ds: v for space_ds, v in _parse_sets(a.reduced, "--reduced").items()}
    if "id_train" not in data:
        raise ConfigError("gradient-diagnostics needs --data id_train=DIR")
    rows, batches = {}, {}
    for salt, (ds, d) in enumerate(sorted(data.items())):
        rows[ds] = sample_rows(num_samples(d), int(o["n_samples"]), int(o["seed"]), salt)
        batches[ds] = batch_source(d, None, o, dev)
    means = None
    if a.ag:
        g, _, lay = open_blocks(a.ag, "subspace")
        lay.same_as(stats.layout, f"{a.ag} vs. {a.stats}")
        means = load_class_means(g, lay, a.ag)
    dist, cos, _ = gradient_pass_diagnostics(op, batches, rows, "id_train", means,
                                             max_bytes=float(o["max_gib"]) * 2**30)
    nn_rows = []
    for ds in (d for d in batches if d != "id_train"):
        row = {"dataset": ds, "n": int(dist[ds].size),
               "whole": float(dist[ds].mean()) if dist[ds].size else float("nan")}
        for space, stores in sorted(reduced.items()):
            sp, _, dset = space.partition(":")
            if dset == ds and f"{sp}:id_train" in reduced:
                rref = reduced_rows(reduced[f"{sp}:id_train"], rows["id_train"])
                row[sp] = nn_mean_distance(reduced_rows(stores, rows[ds]), rref)
        nn_rows.append(row)
    _write_csv(Path(a.out_dir) / "nn_distances.csv", nn_rows)
    cos_rows = [{"dataset": ds, "n": int(c.size), "mean": float(c.mean()), "std": float(c.std())}
                for ds, c in cos.items()]
    _write_csv(Path(a.out_dir) / "class_mean_cosine.csv", cos_rows)
    write_json(Path(a.out_dir) / "gradient_diagnostics.json", {"nn_distances": nn_rows,
                                                              "class_mean_cosine": cos_rows})


def cmd_ensemble(a):
    from ..detectors.gradient import ensemble_scores
    from ..detectors.jobs import save_scores

    alpha = a.alpha
    if getattr(a, "alpha_file", None):
        from ..selection import read_selection

        alpha = float(read_selection(a.alpha_file)["chosen_hparams"]["alpha"])
    s = ensemble_scores(np.load(a.feature), np.load(a.gradient), alpha)
    save_scores(a.out, s)


# -- registration -----------------------------------------------------------------------------
