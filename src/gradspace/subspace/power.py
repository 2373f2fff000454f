"""PCA subspace of the normalized gradients, unrolled into data passes (low-dimensional
gradient paper, eq. 3 and Appendix A, Alg. 2–4), with block Krylov Rayleigh–Ritz.

C = Σ_i G(x_i)ᵀ G(x_i) over ID train (P×P, never formed). With K' = k + oversample columns:

    V_0      = orth(Ω),  Ω ~ N(0, 1) seeded per parameter               (Alg. 2, lines 1–2)
    pass t   : Y_t = G V_t (N×K', kept),  W_t = C V_t = Σ_i G_iᵀ (G_i V_t)  (Alg. 3–4)
    reduce t : W_t = V_{t+1} R_t (TSQR), Krylov record (Y_t, R_t), Rayleigh–Ritz over
               span[Y_0..Y_{t−1}] (``krylov.best_ritz``) with residuals and lift L
    lift     : V = Gᵀ L (the Ritz vectors, orthonormal), eigenvalues Λ/N.

A pass is one job per data part (a set of ID-train shards), so an interrupted workflow
resumes at the last finished pass and the disk per pass does not depend on the shard
count. orth() is a blockwise TSQR (Householder QR of every block's rows, QR of the stacked
R factors, signs fixed so that diag(R) ≥ 0): exactly orthonormal columns even when W_t is
rank deficient, where Cholesky-QR fails. ``fit_pca_in_memory`` runs the same passes in one
process without files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, NumericalError, StoreError
from ..store import open_store
from .io import atomic_group, open_blocks, put_array, read_block
from .layout import ParamLayout

BASIS_KIND = "basis"
PARTIAL_KIND = "pca_partial"
GV_KIND = "pca_gv"
SUBSPACE_KIND = "subspace"
KRYLOV_KIND = "pca_krylov"
LIFT_KIND = "pca_lift"


# -- orthonormalization -------------------------------------------------------------------

def tsqr(blocks: Sequence[str], load: Callable[[str], np.ndarray], scratch: Path | None = None,
         recompute: bool = False):
    """Blockwise tall-skinny QR of the row-stacked matrix W = [W_b] (float64).

    Returns (get, R): ``get(b)`` gives the rows of Q for block b; Q has orthonormal
    columns, W = Q R, diag(R) ≥ 0. The block Q factors are kept in memory (default), parked
    in ``scratch`` (.npy files), or with ``recompute`` not kept at all: ``get(b)`` loads
    W_b again and repeats its QR (deterministic), so only one block is in memory at a time
    and nothing is written (the reduces at ImageNet scale: a parked Q would be 2 x |V| of
    scratch disk; the extra QR costs 2 P_b K'^2 flops, small next to reading W_b)."""
    parked: dict[str, object] = {}
    Rs = []
    for i, b in enumerate(blocks):
        W = np.asarray(load(b), dtype=np.float64)
        if not np.isfinite(W).all():
            raise NumericalError(f"non-finite values in the product C·V for parameter block '{b}'")
        Q, R = np.linalg.qr(W, mode="reduced")
        if recompute:
            parked[b] = None
        elif scratch is not None:
            f = Path(scratch) / f"q{i:05d}.npy"
            np.save(f, Q)
            parked[b] = f
        else:
            parked[b] = Q
        del W
        Rs.append(R)
    stacked = np.vstack(Rs)
    if stacked.shape[0] < stacked.shape[1]:
        raise ConfigError(f"cannot orthonormalize {stacked.shape[1]} columns in a space of "
                          f"{stacked.shape[0]} parameters: K is larger than the parameter count")
    Q2, R = np.linalg.qr(stacked, mode="reduced")
    d = np.sign(np.diag(R))
    d[d == 0] = 1.0
    Q2 = Q2 * d[None, :]
    R = d[:, None] * R
    offs = np.concatenate([[0], np.cumsum([r.shape[0] for r in Rs])])
    pos = {b: (offs[i], offs[i + 1]) for i, b in enumerate(blocks)}

    def get(b):
        Q = parked[b]
        if Q is None:
            Q = np.linalg.qr(np.asarray(load(b), dtype=np.float64), mode="reduced")[0]
        elif not isinstance(Q, np.ndarray):
            Q = np.load(Q, mmap_mode="r")
        a, z = pos[b]
        return np.asarray(Q) @ Q2[a:z]

    return get, R


def random_blocks(layout: ParamLayout, K: int, seed: int, block: str) -> np.ndarray:
    """Ω_b: standard normal rows of one block; parameter i draws from default_rng([seed, i]),
    so Ω does not depend on how parameters are grouped into blocks."""
    rows = [np.random.default_rng([int(seed), i]).standard_normal((layout.sizes[i], K))
            for i in layout.block_params(block)]
    return np.concatenate(rows, 0)


# -- basis stores -------------------------------------------------------------------------

def write_basis(path, layout: ParamLayout, get: Callable[[str], np.ndarray], attrs: dict,
                key: str = "V", dtype=np.float32, extra_arrays: dict | None = None) -> None:
    with atomic_group(path, {"layout": layout.to_dict(), **attrs}) as g:
        for b in layout.block_names:
            put_array(g, f"{key}.{b}", np.asarray(get(b), dtype=dtype))
        for name, arr in dict(extra_arrays or {}).items():
            put_array(g, name, arr)


def read_basis(path, kinds=(BASIS_KIND, SUBSPACE_KIND)):
    """(group, attrs, layout) of a basis or final subspace store."""
    return open_blocks(path, kinds)


def basis_block(group, block: str, path="", key: str = "V") -> np.ndarray:
    return read_block(group, key, block, path)


def init_basis(path, layout: ParamLayout, k: int, oversample: int, seed: int, attrs: dict | None = None):
    """V_0 = orth(Ω) with K' = k + oversample columns (Alg. 2, lines 1–2)."""
    K = int(k) + int(oversample)
    if k < 1 or oversample < 0:
        raise ConfigError(f"subspace.k must be >= 1 and oversample >= 0 (got {k}, {oversample})")
    if K > layout.num_params:
        raise ConfigError(f"subspace.k + oversample = {K} exceeds the {layout.num_params} "
                          "selected parameters")
    get, _ = tsqr(layout.block_names, lambda b: random_blocks(layout, K, seed, b), recompute=True)
    write_basis(path, layout, get, {"kind": BASIS_KIND, "iteration": 0, "k": int(k),
                                    "oversample": int(oversample), "columns": K, "seed": int(seed),
                                    **dict(attrs or {})})


# -- partial products ---------------------------------------------------------------------

def load_basis_tensors(group, layout: ParamLayout, device=None, path="", blocks=None) -> dict:
    import torch

    return {b: torch.as_tensor(basis_block(group, b, path), dtype=torch.float32, device=device)
            for b in layout.check_blocks(blocks)}


def partial_products(op, batches, V: dict, blocks_out=None, timer=None, device=None, keep_images=False):
    """W_b = Σ_i G_{i,b}ᵀ (G_i V) over ``batches`` (float64, P_b×K') and the sample count;
    with ``keep_images`` also the sample-space images U = G·V (float64 N×K') and their row
    indices: (W, n, U, rows)."""
    import torch

    blocks_out = op.layout.check_blocks(blocks_out)
    K = next(iter(V.values())).shape[1]
    acc = {b: torch.zeros(op.layout.block_size(b), K, dtype=torch.float64, device=op.device)
           for b in blocks_out}
    n = 0
    Us, rows_all = [], []
    for batch in batches:
        x = batch[0].to(op.device)
        if timer is not None:
            with timer("products", device):
                U, W = op.gtgv(x, V, blocks_out)
        else:
            U, W = op.gtgv(x, V, blocks_out)
        for b in blocks_out:
            acc[b] += W[b].to(torch.float64)
        if keep_images:
            Us.append(U.double().cpu().numpy())
            r = batch[2] if len(batch) > 2 else torch.arange(n, n + x.shape[0])
            rows_all.append(np.asarray(r.cpu() if hasattr(r, "cpu") else r, np.int64))
        n += x.shape[0]
    W = {b: a.cpu().numpy() for b, a in acc.items()}
    if not keep_images:
        return W, n
    U = np.concatenate(Us) if Us else np.zeros((0, K))
    rows = np.concatenate(rows_all) if rows_all else np.zeros(0, np.int64)
    return W, n, U, rows


# -- two-phase products per block group (V never whole on one device) ---------------------
#
# C·V = Σ_i G_iᵀ (G_i V) and G_i V = Σ_b G_{i,b} V_b, so a job that holds only the blocks
# of one group g computes (phase 1, ``pca-gv``) its part U_g = G_g V_g (N×K per shard),
# and after the parts of all groups are summed to U = G V (phase 2, ``pca-partial --gv``)
# the rows W_b = G_bᵀ U of its own blocks, which needs no V at all. The normalization
# G_b = (∇_b E − m_b) diag(s_b) is blockwise, so the mean correction of Alg. 3–4 splits
# over blocks exactly like the products.

def gv_products(op, batches, V: dict, timer=None, device=None):
    """U = Σ_{b∈V} G_b V_b for every sample of ``batches`` (float64 N×K) and the rows."""
    Us, rows_all = [], []
    for x, _, rows in batches:
        x = x.to(op.device)
        if timer is not None:
            with timer("products", device):
                U = op.gv(x, V)
        else:
            U = op.gv(x, V)
        Us.append(U.double().cpu().numpy())
        rows_all.append(np.asarray(rows.cpu() if hasattr(rows, "cpu") else rows, np.int64))
    K = next(iter(V.values())).shape[1]
    if not Us:
        return np.zeros((0, K)), np.zeros(0, np.int64)
    return np.concatenate(Us), np.concatenate(rows_all)


def write_gv(path, layout: ParamLayout, U: np.ndarray, rows: np.ndarray, blocks, attrs: dict) -> None:
    if not np.isfinite(U).all():
        bad = int(np.argwhere(~np.isfinite(U))[0][0])
        raise NumericalError(f"{path}: non-finite product G·V for sample index {int(rows[bad])}")
    with atomic_group(path, {"kind": GV_KIND, "layout": layout.to_dict(), "n": int(U.shape[0]),
                             "blocks": list(blocks), **attrs}) as g:
        put_array(g, "U", np.asarray(U, np.float64))
        put_array(g, "index", np.asarray(rows, np.int64))


def load_gv(paths: Sequence, layout: ParamLayout, iteration=None, shard=None):
    """Sum the G_g·V_g parts of one shard to U = G·V (float64 N×K); checks that the parts
    cover every parameter block exactly once, for the same iteration, shard and rows."""
    if not paths:
        raise StoreError("no G·V parts given (--gv)")
    U, rows, covered = None, None, []
    for p in paths:
        g, attrs, lay = open_blocks(p, GV_KIND)
        layout.same_as(lay, str(p))
        if iteration is not None and int(attrs.get("iteration", -1)) != int(iteration):
            raise StoreError(f"{p}: G·V part of iteration {attrs.get('iteration')}, expected {iteration}")
        if shard is not None and str(attrs.get("shard")) != str(shard):
            raise StoreError(f"{p}: G·V part of shard {attrs.get('shard')}, expected {shard}")
        part, idx = np.asarray(g["U"][...], np.float64), np.asarray(g["index"][...], np.int64)
        if rows is None:
            U, rows = part.copy(), idx
        elif part.shape != U.shape or not np.array_equal(idx, rows):
            raise StoreError(f"{p}: rows or shape differ from {paths[0]}")
        else:
            U += part
        covered += list(attrs["blocks"])
    if sorted(covered) != sorted(layout.block_names):
        raise StoreError(f"G·V parts {list(map(str, paths))} cover parameter blocks {sorted(covered)}, "
                         f"expected each of {layout.block_names} once")
    return U, rows


def partial_products_from_gv(op, batches, U: np.ndarray, rows: np.ndarray, blocks_out, timer=None,
                             device=None, where=""):
    """W_b = Σ_i G_{i,b}ᵀ U_i for the blocks ``blocks_out``, with U = G·V precomputed (the
    rows of U follow the order of ``batches``, checked against the stored indices)."""
    import torch

    blocks_out = op.layout.check_blocks(blocks_out)
    K = U.shape[1]
    acc = {b: torch.zeros(op.layout.block_size(b), K, dtype=torch.float64, device=op.device)
           for b in blocks_out}
    n = 0
    for x, _, r in batches:
        r = np.asarray(r.cpu() if hasattr(r, "cpu") else r, np.int64)
        if not np.array_equal(r, rows[n:n + r.size]):
            raise StoreError(f"{where}: the G·V parts do not hold the rows of this shard in order "
                             f"(sample index {int(r[0])} at position {n})")
        x = x.to(op.device)
        Ub = torch.as_tensor(U[n:n + r.size], dtype=torch.float32, device=op.device)
        if timer is not None:
            with timer("products", device):
                W = op.gtu(x, Ub, blocks_out)
        else:
            W = op.gtu(x, Ub, blocks_out)
        for b in blocks_out:
            acc[b] += W[b].to(torch.float64)
        n += r.size
    if n != rows.size:
        raise StoreError(f"{where}: the G·V parts hold {rows.size} rows, the shard {n}")
    return {b: a.cpu().numpy() for b, a in acc.items()}, n


def write_partial(path, layout: ParamLayout, W: dict, n: int, attrs: dict, kind: str = PARTIAL_KIND,
                  key: str = "W", images: np.ndarray | None = None, rows: np.ndarray | None = None,
                  dtype=np.float32) -> None:
    """A partial product store. W is accumulated in float64 in memory and stored as
    ``dtype`` (float32: the same size as V; its rounding, 6e-8 relative, is far below the
    float32 noise of the per-sample gradients it sums). ``images``/``rows``: the
    sample-space images U = G·V of the same pass (float64, N×K', small) and their rows."""
    for b, arr in W.items():
        if not np.isfinite(arr).all():
            pos = int(np.argwhere(~np.isfinite(arr))[0][0])
            raise NumericalError(f"{path}: non-finite partial product at parameter {layout.locate(b, pos)}")
    if images is not None and not np.isfinite(images).all():
        bad = int(np.argwhere(~np.isfinite(images))[0][0])
        raise NumericalError(f"{path}: non-finite product G·V for sample index {int(rows[bad])}")
    with atomic_group(path, {"kind": kind, "layout": layout.to_dict(), "n": int(n),
                             "blocks": list(W), "images": images is not None, **attrs}) as g:
        for b, arr in W.items():
            put_array(g, f"{key}.{b}", np.asarray(arr, dtype=dtype))
        if images is not None:
            put_array(g, "U", np.asarray(images, np.float64))
            put_array(g, "index", np.asarray(rows, np.int64))


def open_partials(paths: Sequence, layout: ParamLayout, kind: str = PARTIAL_KIND, iteration=None):
    """Open partial stores, check layout/iteration, and that every (shard, block) is covered
    exactly once. Returns ([(group, attrs)] sorted by shard, total sample count)."""
    if not paths:
        raise StoreError("no partial stores given")
    opened = []
    for p in paths:
        g, attrs, lay = open_blocks(p, kind)
        layout.same_as(lay, str(p))
        if iteration is not None and int(attrs.get("iteration", -1)) != int(iteration):
            raise StoreError(f"{p}: partial of iteration {attrs.get('iteration')}, expected {iteration}")
        opened.append((str(p), g, attrs))
    opened.sort(key=lambda t: (str(t[2].get("shard")), t[0]))
    cover: dict[str, list[str]] = {}
    n_by_shard: dict[str, int] = {}
    for p, _, attrs in opened:
        shard = str(attrs.get("shard"))
        for b in attrs["blocks"]:
            cover.setdefault(b, []).append(shard)
        if n_by_shard.setdefault(shard, int(attrs["n"])) != int(attrs["n"]):
            raise StoreError(f"{p}: shard {shard} has inconsistent sample counts across partials")
    shards = sorted(n_by_shard)
    for b in layout.block_names:
        got = sorted(cover.get(b, []))
        if got != shards:
            raise StoreError(f"parameter block '{b}' is covered by shards {got}, "
                             f"expected each of {shards} once")
    return opened, int(sum(n_by_shard.values()))


def summed_block(opened, block: str, key: str = "W") -> np.ndarray:
    total = None
    for p, g, attrs in opened:
        if block in attrs["blocks"]:
            arr = read_block(g, key, block, p)
            total = arr.astype(np.float64) if total is None else total + arr
    return total


# -- reduce: orthonormalize, keep the sample-space images, Rayleigh–Ritz ------------------

def _sample_images(opened, gv_paths, layout: ParamLayout, t: int):
    """Y_t = G·V_t for every ID-train sample (float64 N×K', rows sorted by sample index),
    from the images the pass parts carry, or (block groups) from the G_g·V_g parts summed
    over groups per data part."""
    Us, rows = [], []
    if gv_paths:
        by_part: dict[str, list] = {}
        for p in gv_paths:
            _, attrs, _ = open_blocks(p, GV_KIND)
            by_part.setdefault(str(attrs.get("shard")), []).append(p)
        for part, paths in sorted(by_part.items()):
            U, r = load_gv(paths, layout, t, part)
            Us.append(U)
            rows.append(r)
    else:
        for p, g, attrs in opened:
            if not attrs.get("images"):
                raise StoreError(f"{p}: pass part without sample-space images G·V (a block-group "
                                 "pass needs its pca-gv parts, --gv)")
            Us.append(np.asarray(g["U"][...], np.float64))
            rows.append(np.asarray(g["index"][...], np.int64))
    U, r = np.concatenate(Us), np.concatenate(rows)
    order = np.argsort(r, kind="stable")
    U, r = U[order], r[order]
    if r.size and np.any(np.diff(r) == 0):
        dup = int(r[np.flatnonzero(np.diff(r) == 0)[0]])
        raise StoreError(f"pass {t}: sample index {dup} appears in more than one part")
    return U, r


def read_krylov(paths: Sequence, rows: np.ndarray | None = None, columns: int | None = None):
    """Images Y_s and factors R_s of passes 0..len(paths)−1 (in pass order, checked)."""
    Ys, Rs = [], []
    for s, p in enumerate(paths):
        g = open_store(p)
        attrs = dict(g.attrs)
        if attrs.get("kind") != KRYLOV_KIND:
            raise StoreError(f"{p}: expected a {KRYLOV_KIND} store, found kind '{attrs.get('kind')}'")
        if int(attrs.get("pass", -1)) != s:
            raise StoreError(f"{p}: Krylov record of pass {attrs.get('pass')}, expected pass {s}")
        idx = np.asarray(g["index"][...], np.int64)
        if rows is not None and not np.array_equal(idx, rows):
            raise StoreError(f"{p}: its samples differ from those of the current pass")
        Y = np.asarray(g["Y"][...], np.float64)
        if columns is not None and Y.shape[1] != columns:
            raise StoreError(f"{p}: {Y.shape[1]} columns, the current pass has {columns}")
        Ys.append(Y)
        Rs.append(np.asarray(g["R"][...], np.float64))
    return Ys, Rs


def ritz_diagnostics(Ys, Rs, k: int, n: int, window=None, total_variance=None):
    """(Ritz | None, diagnostics dict) of the Rayleigh–Ritz after pass len(Ys)−1."""
    from .krylov import best_ritz, largest_sine, ritz_overlap

    t = len(Ys) - 1
    d = {"pass": t, "passes": t + 1, "n": int(n), "k": int(k), "columns": int(Ys[-1].shape[1]),
         "window": window, "ritz_values": None, "residuals": None, "max_residual": None,
         "captured_variance_topk": None, "subspace_change_topk": None, "krylov_dim": 0}
    if t < 1:
        return None, d
    rz = best_ritz(Ys, Rs[:t], k, window)
    d.update({"ritz_values": (rz.eigenvalues[: max(k, Ys[-1].shape[1])] / n).tolist(),
              "residuals": rz.residuals.tolist(), "max_residual": float(rz.residuals.max()),
              "krylov_dim": rz.dim, "blocks_used": list(rz.blocks)})
    if total_variance:
        d["captured_variance_topk"] = float(rz.eigenvalues[:k].sum() / n / total_variance)
    if t >= 2:
        prev = best_ritz(Ys[:t], Rs[: t - 1], k, window)
        d["subspace_change_topk"] = largest_sine(ritz_overlap(prev, rz, Ys, Rs))
    return rz, d


def reduce_pass(part_paths, out_basis, out_krylov, stats=None, krylov_paths=(), gv_paths=None,
                window=None, scratch_dir=None) -> dict:
    """After data pass t: V_{t+1} = orth(Σ parts of C·V_t) (TSQR, W_t = V_{t+1} R_t); the
    Krylov record of pass t (Y_t = G·V_t, R_t, and after pass 1 the Rayleigh–Ritz over the
    whole Krylov space with its lift coefficients); returns the diagnostics of pass t."""
    t_start = time.perf_counter()
    if not part_paths:
        raise StoreError("no pass parts given")
    _, attrs0, layout = open_blocks(part_paths[0], PARTIAL_KIND)
    t = int(attrs0["iteration"])
    opened, n = open_partials(part_paths, layout, iteration=t)
    if stats is not None:
        layout.same_as(stats.layout, "pass parts vs. statistics")
        if n != stats.count:
            raise StoreError(f"parts of pass {t} cover {n} samples, the statistics {stats.count}: "
                             "a shard is missing or extra")
    k, K = int(attrs0["k"]), int(attrs0["columns"])
    Y, rows = _sample_images(opened, gv_paths, layout, t)
    if Y.shape != (n, K):
        raise StoreError(f"pass {t}: images G·V have shape {Y.shape}, expected ({n}, {K})")
    if len(krylov_paths) != t:
        raise StoreError(f"pass {t} needs the Krylov records of passes 0..{t - 1}, got {len(krylov_paths)}")
    Ys, Rs = read_krylov(krylov_paths, rows, K)
    # one block in memory at a time and no scratch files: get(b) sums and factors the
    # block's partials again (disk in use stays the partials + V_t + V_{t+1})
    get, R = tsqr(layout.block_names, lambda b: summed_block(opened, b), recompute=True)
    write_basis(out_basis, layout, get,
                {**{key: attrs0[key] for key in ("k", "oversample", "columns", "seed") if key in attrs0},
                 "kind": BASIS_KIND, "iteration": t + 1})
    Ys.append(Y)
    Rs.append(R)
    total = stats.total_variance if stats is not None else None
    rz, diag = ritz_diagnostics(Ys, Rs, k, n, window, total)
    diag["total_variance"] = total
    diag["seconds"] = time.perf_counter() - t_start
    with atomic_group(out_krylov, {"kind": KRYLOV_KIND, "pass": t, "n": n, "k": k, "columns": K,
                                   "window": window, "max_residual": diag["max_residual"],
                                   "eigenvalues": None if rz is None else (rz.eigenvalues[:k] / n).tolist(),
                                   "residuals": diag["residuals"], "diagnostics": diag}) as g:
        put_array(g, "Y", Y)
        put_array(g, "R", R)
        put_array(g, "index", rows)
        if rz is not None:
            put_array(g, "lift", rz.lift)
    return diag


def krylov_diagnostics(krylov_path) -> dict:
    """The diagnostics of the pass a Krylov record belongs to (stored with it)."""
    g = open_store(krylov_path)
    attrs = dict(g.attrs)
    if attrs.get("kind") != KRYLOV_KIND or "diagnostics" not in attrs:
        raise StoreError(f"{krylov_path}: not a Krylov record with diagnostics")
    return dict(attrs["diagnostics"])


def read_lift(krylov_path):
    """(lift N×k, rows, attrs) of the Krylov record the final subspace is lifted from."""
    g = open_store(krylov_path)
    attrs = dict(g.attrs)
    if attrs.get("kind") != KRYLOV_KIND:
        raise StoreError(f"{krylov_path}: expected a {KRYLOV_KIND} store, found '{attrs.get('kind')}'")
    if "lift" not in g:
        raise StoreError(f"{krylov_path}: pass {attrs.get('pass')} has no Rayleigh–Ritz (the final pass "
                         "must be 1 or later)")
    return np.asarray(g["lift"][...], np.float64), np.asarray(g["index"][...], np.int64), attrs


def finalize_pca(lift_paths, krylov_path, out_path, stats=None, tol=None, convergence=None,
                 attrs: dict | None = None) -> dict:
    """Sum the lift parts V_b = Σ G_bᵀ L into the PCA subspace store (Ritz vectors of C over
    the Krylov space, eigenvalues per sample, per-direction residuals, convergence)."""
    _, kattrs = read_lift(krylov_path)[1:]
    _, a0, layout = open_blocks(lift_paths[0], LIFT_KIND)
    opened, n = open_partials(lift_paths, layout, kind=LIFT_KIND, iteration=int(kattrs["pass"]))
    if n != int(kattrs["n"]) or (stats is not None and n != stats.count):
        raise StoreError(f"lift parts cover {n} samples, the Krylov record {kattrs['n']}")
    k = int(kattrs["k"])
    # one block in memory at a time: the Gram matrix first, the blocks again when written
    gram = np.zeros((k, k))
    for b in layout.block_names:
        v = summed_block(opened, b, key="V")
        gram += v.T @ v
        del v
    orth_err = float(np.abs(gram - np.eye(k)).max())
    res = np.asarray(kattrs["residuals"], np.float64)
    ev = np.asarray(kattrs["eigenvalues"], np.float64)
    total = stats.total_variance if stats is not None else None
    unconverged = [] if tol is None else [int(j) for j in np.flatnonzero(res > float(tol))]
    info = {"kind": SUBSPACE_KIND, "type": "pca", "k": k, "iterations": int(kattrs["pass"]),
            "passes": int(kattrs["pass"]) + 2, "n": n, "columns": int(kattrs["columns"]),
            "solver": "power" if kattrs.get("window") == 1 else "krylov",
            "orthonormal": True, "orthonormality_error": orth_err, "eigenvalues": ev.tolist(),
            "residuals": res.tolist(), "max_residual": float(res.max()), "tol": tol,
            "converged": None if tol is None else not unconverged, "unconverged": unconverged,
            "total_variance": total,
            "explained_variance_ratio": (ev / total).tolist() if total else None,
            "convergence": list(convergence or []), **dict(attrs or {})}
    write_basis(out_path, layout, lambda b: summed_block(opened, b, key="V"), info)
    return info


def write_lift(path, layout: ParamLayout, V: dict, n: int, attrs: dict) -> None:
    write_partial(path, layout, V, n, attrs, kind=LIFT_KIND, key="V")


# -- the whole PCA in one process (library use, tests, benchmarks) ------------------------

def fit_pca_in_memory(op, batches_fn, layout: ParamLayout, k: int, oversample: int, seed: int = 0,
                      tol: float | None = 1e-2, iterations: int | str = "auto", max_iterations: int = 20,
                      solver: str = "krylov", stats=None):
    """The workflow's PCA (same passes, same math) without files: returns
    ({block: V_b (P_b×k)}, info) with info as stored by ``finalize_pca`` plus the
    per-pass diagnostics. ``batches_fn()`` yields the ID-train batches (x, y, rows)."""
    import torch

    K = int(k) + int(oversample)
    if K > layout.num_params:
        raise ConfigError(f"k + oversample = {K} exceeds the {layout.num_params} selected parameters")
    window = 1 if solver == "power" else None
    last = int(max_iterations) if iterations == "auto" else int(iterations)
    get, _ = tsqr(layout.block_names, lambda b: random_blocks(layout, K, seed, b))
    V = {b: torch.as_tensor(get(b), dtype=torch.float32, device=op.device) for b in layout.block_names}
    Ys, Rs, diags, rz = [], [], [], None
    total = stats.total_variance if stats is not None else None
    for t in range(last + 1):
        W, n, U, r = partial_products(op, batches_fn(), V, keep_images=True)
        order = np.argsort(r, kind="stable")
        Ys.append(U[order])
        get, R = tsqr(layout.block_names, W.__getitem__)
        Rs.append(R)
        rz, d = ritz_diagnostics(Ys, Rs, k, n, window, total)
        diags.append(d)
        if t >= 1 and (t == last or (iterations == "auto" and tol is not None and d["max_residual"] <= tol)):
            break
        V = {b: torch.as_tensor(get(b), dtype=torch.float32, device=op.device) for b in layout.block_names}
    lift = np.empty_like(rz.lift)
    lift[order] = rz.lift
    Vk, _ = partial_products_from_gv(op, batches_fn(), lift, r, layout.block_names)
    res = rz.residuals
    info = {"type": "pca", "k": int(k), "iterations": len(Ys) - 1, "passes": len(Ys) + 1, "n": int(n),
            "solver": solver, "eigenvalues": (rz.eigenvalues[:k] / n).tolist(), "residuals": res.tolist(),
            "max_residual": float(res.max()), "tol": tol,
            "converged": None if tol is None else bool((res <= tol).all()),
            "total_variance": total, "diagnostics": diags}
    return {b: v.astype(np.float32) for b, v in Vk.items()}, info
