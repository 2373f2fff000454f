"""PCA subspace of the normalized gradients by block power iteration (low-dimensional
gradient paper, eq. 3 and Appendix A, Alg. 2–4).

C = Σ_i G(x_i)ᵀ G(x_i) over ID train (P×P, never formed). With K' = k + oversample columns:

    V_0      = orth(Ω),  Ω ~ N(0, 1) seeded per parameter               (Alg. 2, lines 1–2)
    W_t      = C V_t = Σ_shards Σ_{i∈shard} G_iᵀ (G_i V_t)               (lines 4–5, Alg. 3–4)
    V_{t+1}  = orth(W_t)                                                  (line 6)
    final    : H = V_Tᵀ C V_T = S Λ Sᵀ (Rayleigh–Ritz), V = V_T S[:, :k], eigenvalues Λ/N.

Each iteration is one job per ID-train shard (partial W_t over the shard, per parameter
block) and one reduce job, so an interrupted workflow resumes at the last finished
iteration. orth() is a blockwise TSQR (Householder QR of every block's rows, QR of the
stacked R factors, signs fixed so that diag(R) ≥ 0): it yields exactly orthonormal columns
even when W_t is rank deficient (K' larger than the rank of C), where Cholesky-QR fails.

Per-iteration diagnostics: Ritz values eig(V_tᵀ C V_t)/N, the change of subspace
sin∠max(V_t, V_{t+1}) = (1 − σ_min(V_tᵀ V_{t+1})²)^½ (all K' columns, and for the top-k
Ritz vectors of V_t against V_{t+1}), and the captured variance tr(V_tᵀ C V_t)/tr(C), with
tr(C) = N·E‖G‖² from the statistics.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, NumericalError, StoreError
from .io import atomic_group, open_blocks, put_array, read_block
from .layout import ParamLayout

BASIS_KIND = "basis"
PARTIAL_KIND = "pca_partial"
GV_KIND = "pca_gv"
SUBSPACE_KIND = "subspace"


# -- orthonormalization -------------------------------------------------------------------

def tsqr(blocks: Sequence[str], load: Callable[[str], np.ndarray], scratch: Path | None = None):
    """Blockwise tall-skinny QR of the row-stacked matrix W = [W_b] (float64).

    Returns (get, R): ``get(b)`` gives the rows of Q for block b; Q has orthonormal
    columns, W = Q R, diag(R) ≥ 0. Block Q factors are parked in ``scratch`` (.npy memmaps)
    when given, so only one block is in memory at a time."""
    parked: dict[str, object] = {}
    Rs = []
    for i, b in enumerate(blocks):
        W = np.asarray(load(b), dtype=np.float64)
        if not np.isfinite(W).all():
            raise NumericalError(f"non-finite values in the product C·V for parameter block '{b}'")
        Q, R = np.linalg.qr(W, mode="reduced")
        if scratch is not None:
            f = Path(scratch) / f"q{i:05d}.npy"
            np.save(f, Q)
            parked[b] = f
        else:
            parked[b] = Q
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
        if not isinstance(Q, np.ndarray):
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


def _sine(M: np.ndarray) -> float:
    """sin of the largest principal angle from the cosines σ(M), M = AᵀB (A ⊂ span B dims)."""
    if M.size == 0:
        return 0.0
    smin = np.linalg.svd(M, compute_uv=False).min()
    return float(np.sqrt(max(0.0, 1.0 - min(1.0, smin) ** 2)))


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
    scratch = Path(tempfile.mkdtemp(prefix=".pca-init-", dir=Path(path).parent if Path(path).parent.exists()
                                    else None))
    try:
        get, _ = tsqr(layout.block_names, lambda b: random_blocks(layout, K, seed, b), scratch)
        write_basis(path, layout, get, {"kind": BASIS_KIND, "iteration": 0, "k": int(k),
                                        "oversample": int(oversample), "columns": K, "seed": int(seed),
                                        **dict(attrs or {})})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- partial products ---------------------------------------------------------------------

def load_basis_tensors(group, layout: ParamLayout, device=None, path="", blocks=None) -> dict:
    import torch

    return {b: torch.as_tensor(basis_block(group, b, path), dtype=torch.float32, device=device)
            for b in layout.check_blocks(blocks)}


def partial_products(op, batches, V: dict, blocks_out=None, timer=None, device=None):
    """W_b = Σ_i G_{i,b}ᵀ (G_i V) over ``batches`` (float64, P_b×K') and the sample count."""
    import torch

    blocks_out = op.layout.check_blocks(blocks_out)
    K = next(iter(V.values())).shape[1]
    acc = {b: torch.zeros(op.layout.block_size(b), K, dtype=torch.float64, device=op.device)
           for b in blocks_out}
    n = 0
    for batch in batches:
        x = batch[0].to(op.device)
        if timer is not None:
            with timer("products", device):
                _, W = op.gtgv(x, V, blocks_out)
        else:
            _, W = op.gtgv(x, V, blocks_out)
        for b in blocks_out:
            acc[b] += W[b].to(torch.float64)
        n += x.shape[0]
    return {b: a.cpu().numpy() for b, a in acc.items()}, n


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
                  key: str = "W") -> None:
    for b, arr in W.items():
        if not np.isfinite(arr).all():
            pos = int(np.argwhere(~np.isfinite(arr))[0][0])
            raise NumericalError(f"{path}: non-finite partial product at parameter {layout.locate(b, pos)}")
    with atomic_group(path, {"kind": kind, "layout": layout.to_dict(), "n": int(n),
                             "blocks": list(W), **attrs}) as g:
        for b, arr in W.items():
            put_array(g, f"{key}.{b}", np.asarray(arr, dtype=np.float64))


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


# -- reduce and Rayleigh–Ritz ------------------------------------------------------------

def reduce_iteration(basis_path, partial_paths, out_path, stats=None, scratch_dir=None) -> dict:
    """V_{t+1} = orth(Σ partials of C·V_t) and the iteration diagnostics (returned dict)."""
    group, attrs, layout = read_basis(basis_path, BASIS_KIND)
    t = int(attrs["iteration"])
    opened, n = open_partials(partial_paths, layout, iteration=t)
    if stats is not None and n != stats.count:
        raise StoreError(f"partials of iteration {t} cover {n} samples, the statistics {stats.count}: "
                         "a shard is missing or extra")
    blocks = layout.block_names
    K = int(attrs["columns"])
    H = np.zeros((K, K))

    def load(b):
        W = summed_block(opened, b)
        Vb = basis_block(group, b, basis_path).astype(np.float64)
        H[...] += Vb.T @ W
        return W

    scratch = Path(tempfile.mkdtemp(prefix=".pca-reduce-", dir=scratch_dir))
    try:
        get, _ = tsqr(blocks, load, scratch)
        M = np.zeros((K, K))

        def get_and_track(b):
            Q = get(b)
            M[...] += basis_block(group, b, basis_path).astype(np.float64).T @ Q
            return Q

        H = 0.5 * (H + H.T)
        evals, S = np.linalg.eigh(H)
        order = np.argsort(evals)[::-1]
        evals, S = evals[order], S[:, order]
        write_basis(out_path, layout, get_and_track,
                    {**{k: attrs[k] for k in ("k", "oversample", "columns", "seed") if k in attrs},
                     "kind": BASIS_KIND, "iteration": t + 1})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    k = int(attrs["k"])
    total = stats.total_variance if stats is not None else float("nan")
    ritz = evals / n
    diag = {
        "iteration": t, "n": n, "k": k, "columns": K,
        "ritz_values": ritz.tolist(),
        "captured_variance": float(np.trace(H) / n / total) if stats is not None else None,
        "captured_variance_topk": float(ritz[:k].sum() / total) if stats is not None else None,
        "total_variance": total,
        "subspace_change": _sine(M),
        "subspace_change_topk": _sine(S[:, :k].T @ M),
    }
    return diag


def rayleigh_ritz(basis_path, partial_paths, out_path, stats=None, k: int | None = None,
                  attrs: dict | None = None) -> dict:
    """Final PCA subspace: eigenvectors of V_Tᵀ C V_T sorted by eigenvalue, keep k of K'."""
    group, battrs, layout = read_basis(basis_path, BASIS_KIND)
    t = int(battrs["iteration"])
    opened, n = open_partials(partial_paths, layout, iteration=t)
    if stats is not None and n != stats.count:
        raise StoreError(f"final partials cover {n} samples, the statistics {stats.count}")
    k = int(k or battrs["k"])
    K = int(battrs["columns"])
    if k > K:
        raise ConfigError(f"cannot keep k={k} of {K} columns")
    H = np.zeros((K, K))
    for b in layout.block_names:
        H += basis_block(group, b, basis_path).astype(np.float64).T @ summed_block(opened, b)
    H = 0.5 * (H + H.T)
    evals, S = np.linalg.eigh(H)
    order = np.argsort(evals)[::-1]
    evals, S = evals[order][:k] / n, S[:, order][:, :k]
    total = stats.total_variance if stats is not None else float("nan")
    info = {"kind": SUBSPACE_KIND, "type": "pca", "k": k, "iterations": t, "n": n,
            "oversample": int(battrs.get("oversample", 0)), "seed": battrs.get("seed"),
            "orthonormal": True, "eigenvalues": evals.tolist(), "total_variance": total,
            "explained_variance_ratio": (evals / total).tolist() if stats is not None else None,
            **dict(attrs or {})}
    write_basis(out_path, layout, lambda b: basis_block(group, b, basis_path).astype(np.float64) @ S, info)
    return info


def iterate_in_memory(op, batches_fn, layout, k, oversample, iterations, seed, workdir, stats=None,
                      start=0, blocks_out=None):
    """Run the unrolled iteration in one process (library use, tests, benchmark): the same
    files as the workflow, V_t stored at ``workdir/V-<t>.zarr``; resumes at ``start``."""
    workdir = Path(workdir)
    if start == 0:
        init_basis(workdir / "V-000.zarr", layout, k, oversample, seed)
    diags = []
    for t in range(start, iterations + 1):
        vpath = workdir / f"V-{t:03d}.zarr"
        g, _, _ = read_basis(vpath, BASIS_KIND)
        V = load_basis_tensors(g, layout, op.device, vpath)
        W, n = partial_products(op, batches_fn(), V, blocks_out)
        ppath = workdir / f"partial-{t:03d}.zarr"
        write_partial(ppath, layout, W, n, {"iteration": t, "shard": "0", "method": op.method})
        if t < iterations:
            diags.append(reduce_iteration(vpath, [ppath], workdir / f"V-{t + 1:03d}.zarr", stats))
        else:
            rayleigh_ritz(vpath, [ppath], workdir / "subspace.zarr", stats, k)
    return diags
