"""Average-gradient (AG) subspace (low-dimensional gradient paper, eq. 4):

    μ_c = E[G(x) | y = c],  c = 1..C,   V_AG = span{μ_1, …, μ_C}.

Per ID-train shard the class sums S_c = Σ_{i: y_i = c} G_i = Gᵀ Y (Y the N×C one-hot
labels) come from one ``gtu`` product of either operator (a single vmapped vjp for
``jvp_vjp``). The reduce divides by the class counts. The stored basis is orthonormalized
by the same TSQR as the PCA (Gram–Schmidt order of the classes, diag(R) ≥ 0) so that
projections G·V are coordinates in the span and ‖G − G V Vᵀ‖ is the reconstruction error
of Table 2. ``orthonormalize: false`` keeps the C raw class means as V (G·V = inner
products with the class means, as the paper's eq. 4 reads literally). The raw means are
stored as well (``means.<block>``), for the cosine-to-class-mean diagnostic (Table 13).

Rank. k is the numerical rank of U = [μ_1 … μ_C] (recorded with C), decided in two steps.

1. The centring constraint. When the statistics subtracted the mean M of the same
   ID-train gradients (``normalize.mean: true``, the default; the reduce checks that the
   sample counts agree), Σ_c n_c μ_c = Σ_i G_i = diag(s)(Σ_i g_i − N·M) = 0 exactly, so the
   span has dimension at most C − 1. The measured Σ_c n_c μ_c is not zero but float32
   rounding noise (M comes from the float64 sums of the statistics pass, the class sums
   from float32 products in which s ⊙ Σ u_i g_i and s ⊙ M Σ u_i nearly cancel). That
   noise would survive as one extra direction, and Mahalanobis on the coordinates would
   whiten it into a full coordinate. It is removed exactly: U ← U (I − n nᵀ / nᵀn)
   (n the class counts), the least change of U that satisfies U n = 0. The last class's
   mean is then an exact float64 combination of the others, its R diagonal is at float64
   round-off, and at most C − 1 columns survive the cut below.

2. The float32 noise floor. Columns whose R diagonal (the norm of μ_c's component
   orthogonal to the earlier class means) is at or below

       τ = ε₃₂ · √N · ρ,   ρ = (E‖s ⊙ g‖²)^(1/2) = (tr(C)/N + ‖s ⊙ m‖²)^(1/2),

   are dropped (ε₃₂ = 2⁻²³ the float32 machine epsilon, N the ID-train count). Reasoning:
   the class sums accumulate N per-sample terms in float32, each of norm about ρ before
   the centring cancels (the operators form s ⊙ (Σ u_i g_i − m Σ u_i), so rounding is
   relative to the raw, uncentred gradient); recursive accumulation of n terms gives an
   error of norm up to about ε₃₂ · n^(3/2) · ρ under random rounding, i.e. ε₃₂ · √n · ρ per
   mean; n_c ≤ N, and matrix products and the float64 sums across batches only make it
   smaller, so τ bounds the noise in a mean, and a column at or below τ carries no
   direction the data determine. Without statistics (raw gradients) ρ is replaced by its
   lower bound (Σ_c (n_c/N) ‖μ_c‖²)^(1/2). Measured on an untrained small_cnn (the demo's
   architecture, 103k parameters, C = 10, N = 4000 synthetic class-structured inputs,
   variance scale, ``jvp_vjp``): the noise column had
   R ≈ 6e-6 · max R (4e-6 with ``persample``), τ ≈ 1.1e-4 · max R, the genuine columns
   ≥ 0.69 · max R. The former cut (1e-6 · max R) kept the noise column (k = 10, now 9).
   Two classes with the same mean (e.g. duplicated inputs) lose one more column the same
   way (k = C − 2). τ, the constraint flag and the measured residual ‖Σ_c n_c μ_c‖ / N are
   recorded (``rank_tol``, ``centred``, ``centring_residual``).

The basis is the Gram–Schmidt orthonormalization of the kept class means, in class order:
Q Q_r with R[:, keep] = Q_r R_r, not Q[:, keep], since the Q column of a dropped class in the
middle is a noise direction that the later columns were orthogonalized against.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError, StoreError
from .io import atomic_group, put_array, read_block
from .layout import ParamLayout
from .power import SUBSPACE_KIND, open_partials, tsqr

AG_PARTIAL_KIND = "ag_partial"


def class_range(num_classes: int, jobs: int, index: int) -> tuple[int, int]:
    """Classes [c0, c1) of AG job ``index`` of ``jobs`` (``subspace.ag.class_jobs``):
    contiguous ranges of about equal size."""
    jobs = max(1, min(int(jobs), int(num_classes)))
    if not 0 <= int(index) < jobs:
        raise ConfigError(f"AG class job {index} outside 0..{jobs - 1}")
    return int(index) * num_classes // jobs, (int(index) + 1) * num_classes // jobs


def class_sums(op, batches, num_classes: int, timer=None, device=None, where: str = "",
               classes: tuple[int, int] | None = None):
    """{b: Σ_{i: y=c} G_{i,b}} (P_b×C', float64) and the class counts (length C) over
    ``batches``, for the classes [c0, c1) = ``classes`` (default all; C' = c1 − c0).

    A class-partitioned job computes gradients only of its classes' samples, so the jobs of
    all class ranges together cost one gradient per sample, and each holds and writes only
    its P×C' columns (the AG stage's memory and disk do not grow with the job count)."""
    import torch

    c0, c1 = (0, int(num_classes)) if classes is None else (int(classes[0]), int(classes[1]))
    if not 0 <= c0 < c1 <= num_classes:
        raise ConfigError(f"class range [{c0}, {c1}) is not within [0, {num_classes})")
    acc = {b: torch.zeros(op.layout.block_size(b), c1 - c0, dtype=torch.float64, device=op.device)
           for b in op.layout.block_names}
    counts = np.zeros(num_classes, np.int64)
    for batch in batches:
        x, y = batch[0], torch.as_tensor(batch[1]).long()
        if (y < 0).any() or (y >= num_classes).any():
            bad = int(y[(y < 0) | (y >= num_classes)][0])
            raise DataError(f"label {bad} outside [0, {num_classes}) in ID-train data"
                            f"{' ' + where if where else ''}")
        mine = (y >= c0) & (y < c1)
        if not bool(mine.any()):
            continue
        if not bool(mine.all()):
            x, y = x[mine.to(x.device)], y[mine]
        x = x.to(op.device)
        Y = torch.nn.functional.one_hot(y - c0, c1 - c0).to(op.device, torch.float32)
        if timer is not None:
            with timer("products", device):
                S = op.gtu(x, Y)
        else:
            S = op.gtu(x, Y)
        for b in acc:
            acc[b] += S[b].to(torch.float64)
        counts += np.bincount(y.cpu().numpy(), minlength=num_classes)
    return {b: a.cpu().numpy() for b, a in acc.items()}, counts


def write_ag_partial(path, layout: ParamLayout, sums: dict, counts: np.ndarray, attrs: dict) -> None:
    with atomic_group(path, {"kind": AG_PARTIAL_KIND, "layout": layout.to_dict(), "n": int(counts.sum()),
                             "blocks": list(sums), "counts": counts.tolist(), **attrs}) as g:
        for b, arr in sums.items():
            if not np.isfinite(arr).all():
                raise StoreError(f"{path}: non-finite class sums in block '{b}'")
            # accumulated in float64, stored in float32 (the size of the AG basis): its
            # 6e-8 rounding is far below the rank cut's float32 noise floor
            put_array(g, f"S.{b}", np.asarray(arr, np.float32))


EPS32 = float(np.finfo(np.float32).eps)


def class_block(opened, block: str, num_classes: int) -> np.ndarray:
    """The P_b×C class sums of one block from partials that each hold the columns of
    their class range (attr ``classes``, default all), added where ranges repeat (data
    parts of the same classes)."""
    total = None
    for p, g, attrs in opened:
        if block not in attrs["blocks"]:
            continue
        arr = read_block(g, "S", block, p)
        c0, c1 = attrs.get("classes") or (0, num_classes)
        if arr.shape[1] != c1 - c0:
            raise StoreError(f"{p}: block '{block}' has {arr.shape[1]} class columns, its range "
                             f"[{c0}, {c1}) needs {c1 - c0}")
        if total is None:
            total = np.zeros((arr.shape[0], num_classes), np.float64)
        total[:, c0:c1] += arr
    return total


def rank_tolerance(n: int, stats=None, mean_rms: float = 0.0) -> float:
    """τ = ε₃₂ · √N · ρ, the float32 noise floor of a class mean (module docstring):
    ρ² = E‖s ⊙ g‖² = tr(C)/N + ‖s ⊙ m‖² from the statistics, or without them its lower
    bound ``mean_rms`` = (Σ_c (n_c/N) ‖μ_c‖²)^(1/2)."""
    if stats is not None:
        rho2 = float(stats.total_variance) + float(np.sum((np.asarray(stats.scale, np.float64)
                                                              * np.asarray(stats.mean, np.float64)) ** 2))
        rho = max(np.sqrt(max(rho2, 0.0)), mean_rms)
    else:
        rho = mean_rms
    return EPS32 * np.sqrt(max(int(n), 1)) * rho


def ag_basis(means, layout: ParamLayout, counts: np.ndarray, n: int, orthonormalize: bool = True,
             stats=None):
    """The AG basis from the class means, one parameter block at a time: ``means(b)`` gives
    block b's P_b×C float64 class means. Returns (basis(b), kept class columns, rank,
    info) with ``basis(b)`` the block's P_b×k rows (the means themselves when not
    ``orthonormalize``). ``reduce_ag`` (stores) and ``gradspace.api.fit_subspace``
    (memory) share it."""
    counts = np.asarray(counts, np.int64)
    C = counts.size
    centred = bool(stats is not None and stats.options.get("mean", True))
    info_rank: dict = {"centred": centred}
    if orthonormalize:
        w = counts.astype(np.float64)
        N = float(w.sum())
        acc = {"resid": 0.0, "mean_sq": np.zeros(C)}

        counted: set = set()

        def constrained(b):  # loaded again by tsqr's get(b): count each block once
            mb = means(b)
            e = mb @ w                                   # block of Σ_c n_c μ_c
            if b not in counted:
                counted.add(b)
                acc["resid"] += float(e @ e)
                acc["mean_sq"] += np.sum(mb * mb, axis=0)
            return mb - np.outer(e, w) / (w @ w) if centred else mb

        get, R = tsqr(layout.block_names, constrained, recompute=True)  # one block in memory
        r = np.abs(np.diag(R))
        residual = np.sqrt(acc["resid"]) / N  # ‖Σ_c n_c μ_c‖ / N: 0 in exact arithmetic when centred
        tol = rank_tolerance(n, stats, float(np.sqrt(np.sum(w / N * acc["mean_sq"]))))
        keep = np.flatnonzero(r > tol)
        if centred:
            keep = keep[:C - 1]  # exact after the projection; a guard against a degenerate tol
        rank = int(keep.size)
        if rank == 0:
            raise DataError(f"AG subspace: the {C} class means span no direction above the float32 "
                            f"noise floor {tol:.3g} (centred: {centred})")
        info_rank.update(rank_tol=float(tol), centring_residual=float(residual))
        # The kept means U[:, keep] = Q R[:, keep]: their orthonormal basis is Q Q_r with
        # R[:, keep] = Q_r R_r (C×k). Not Q[:, keep]: a dropped column in the middle (a class
        # whose mean repeats earlier ones) has a noise direction as its Q column, and later
        # columns of Q were orthogonalized against it. For a kept prefix Q_r = [I; 0].
        Qr, Rr = np.linalg.qr(R[:, keep], mode="reduced")
        sign = np.sign(np.diag(Rr))
        sign[sign == 0] = 1.0
        Qr = Qr * sign[None, :]

        def basis(b):
            return get(b) @ Qr
    else:
        basis, rank, keep = means, None, np.arange(C)
    return basis, keep, rank, info_rank


def reduce_ag(partial_paths, layout: ParamLayout, out_path, orthonormalize: bool = True,
              stats=None, attrs: dict | None = None) -> dict:
    opened, n = open_partials(partial_paths, layout, kind=AG_PARTIAL_KIND)
    C_all = len(opened[0][2]["counts"])
    ranges = sorted({tuple(a.get("classes") or (0, C_all)) for _, _, a in opened})
    edge = 0
    for c0, c1 in ranges:
        if c0 != edge:
            raise StoreError(f"AG partials: class ranges {ranges} do not tile [0, {C_all}) "
                             f"(gap or overlap at class {min(c0, edge)})")
        edge = c1
    if edge != C_all:
        raise StoreError(f"AG partials: class ranges {ranges} end at {edge}, not at {C_all}")
    if stats is not None and n != stats.count:
        raise StoreError(f"AG partials cover {n} samples, the statistics {stats.count}")
    counts = np.zeros(len(opened[0][2]["counts"]), np.int64)
    seen = set()
    for _, _, a in opened:
        if str(a.get("shard")) not in seen:
            counts += np.asarray(a["counts"], np.int64)
            seen.add(str(a.get("shard")))
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise DataError(f"AG subspace: class(es) {empty.tolist()} have no ID-train samples")

    def means(b):
        return class_block(opened, b, counts.size) / counts[None, :]

    basis, keep, rank, info_rank = ag_basis(means, layout, counts, n, orthonormalize, stats)
    C = counts.size
    info = {"kind": SUBSPACE_KIND, "type": "ag", "k": int(keep.size), "classes": C, "n": n,
            "counts": counts.tolist(), "orthonormal": bool(orthonormalize), "rank": rank, **info_rank,
            "total_variance": stats.total_variance if stats is not None else None, **dict(attrs or {})}
    with atomic_group(out_path, {"layout": layout.to_dict(), **info}) as g:
        for b in layout.block_names:
            mb = means(b)
            put_array(g, f"means.{b}", mb.astype(np.float32))
            put_array(g, f"V.{b}", np.asarray(basis(b), dtype=np.float32))
    return info
