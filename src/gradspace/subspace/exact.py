"""The in-memory exact PCA: one data pass that materializes the normalized gradients G
(N×P float32), the Gram matrix GGᵀ (N×N float64) and its exact eigendecomposition.

Where the whole G fits in one job's memory (the demo: 4,000 × 103k float32 = 1.6 GB) this
beats every iterative scheme: one gradient pass instead of q + 2, and no convergence
question. The PCA directions are the right singular vectors of G,

    GGᵀ u_j = λ_j u_j,    v_j = Gᵀ u_j / √λ_j     (orthonormal: v_iᵀv_j = u_iᵀGGᵀu_j/√λ_iλ_j = δ_ij),

exactly what ``krylov.krylov_ritz`` approximates over the Krylov space; here the "Krylov
space" is all of sample space, so the Ritz pairs are exact and the residuals
‖GGᵀu_j − λ_j u_j‖/λ_j are rounding only. The rows of G come from the same operator the
data passes use (``PerSampleOperator.gradients``: per-sample energy gradients of the
gradient engine, centred and scaled by the statistics), so both paths see the same G.

Memory is bound by N×P only on this path, so it is taken only when it fits:
``exact_pca_bytes`` is its peak and ``choose_solver`` the decision the workflow
(``subspace.solver: auto`` against ``subspace.exact_max_gib``, checkpoint ``pca_solver``)
and the resource planner make. Those two import neither torch nor zarr.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import ConfigError, DataError, NumericalError

GIB = 2**30
SOLVERS = ("auto", "exact", "krylov", "power")
ITERATIVE_SOLVERS = ("krylov", "power")
EXACT_SOLVER = "exact"
# column chunk of G converted to float64 on the device for one Gram / lift update
CHUNK_BYTES = 64 << 20


# -- the decision (no torch) ----------------------------------------------------------------

def exact_pca_bytes(n: int, p: int, k: int) -> int:
    """Peak memory (bytes) of the exact path for N samples, P parameters, k directions:

    - G, the normalized gradients, float32:                  4·N·P
    - the Gram matrix GGᵀ, float64 (its top-k eigenpairs are
      computed in place, LAPACK ``syevr``):                  8·N²
    - the directions V = GᵀUΛ^(-1/2), accumulated in float64: 8·P·k

    Not counted: the model and one batch of per-sample gradients (chunk_size × P, the same
    as every data pass needs), the N×k eigenvectors and the 64 MiB column chunk of G that
    is converted for one product. The demo (N = 4,000, P = 103,466, k = 32): 1.80 GB."""
    n, p, k = int(n), int(p), int(k)
    if min(n, p, k) < 0:
        raise ConfigError(f"exact_pca_bytes: negative size (n={n}, p={p}, k={k})")
    return 4 * n * p + 8 * n * n + 8 * p * k


def choose_solver(solver: str, n: int, p: int, k: int, budget_bytes: float,
                  iterative: str = "krylov") -> str:
    """The PCA solver a job runs: ``solver`` as configured (``subspace.solver``), for N
    ID-train samples, P parameters, k directions and a memory budget (bytes; the workflow
    passes ``subspace.exact_max_gib`` · 2³⁰).

    - ``auto``: ``"exact"`` when ``exact_pca_bytes(n, p, k) <= budget_bytes``, else
      ``iterative`` (``"krylov"``, the data passes whose memory does not grow with N·P);
    - ``exact``, ``krylov``, ``power``: returned as given (``exact`` is forced; the job then
      refuses to start when it does not fit the budget, see ``check_budget``)."""
    if solver not in SOLVERS:
        raise ConfigError(f"subspace.solver must be one of {SOLVERS}, got {solver!r}")
    if iterative not in ITERATIVE_SOLVERS:
        raise ConfigError(f"the iterative fallback must be one of {ITERATIVE_SOLVERS}, got {iterative!r}")
    if solver != "auto":
        return solver
    return EXACT_SOLVER if exact_pca_bytes(n, p, k) <= float(budget_bytes) else iterative


def check_budget(n: int, p: int, k: int, budget_bytes: float) -> int:
    """The exact path's bytes, or a ConfigError when they exceed the budget."""
    need = exact_pca_bytes(n, p, k)
    if need > float(budget_bytes):
        raise ConfigError(
            f"the exact PCA needs {need / GIB:.2f} GiB (G: {n} x {p} float32, Gram {n} x {n} float64, "
            f"V {p} x {k}) but subspace.exact_max_gib allows {float(budget_bytes) / GIB:.2f} GiB: raise "
            "exact_max_gib (if the job's host really has the memory) or use solver: auto / krylov")
    return need


# -- the computation --------------------------------------------------------------------------

def materialize_gradients(op, batches, n: int, timer=None, device=None):
    """G (N×P float32, host) and the sample rows, in the order of ``batches``, from the
    operator's normalized per-sample gradients, one engine chunk at a time (``op.chunks``, e.g.
    PerSampleOperator)."""
    if not hasattr(op, "chunks"):
        raise ConfigError("the exact PCA needs explicit per-sample gradients (the persample operator)")
    P = op.layout.num_params
    G = np.empty((int(n), P), np.float32)
    rows, pos = [], 0
    for batch in batches:
        x = batch[0]
        m = int(x.shape[0])
        if pos + m > n:
            raise DataError(f"the data holds more than the {n} ID-train samples of the statistics")
        for start, g in op.chunks(x, timer):  # one engine chunk of gradients at a time
            c = int(g.shape[0])
            if g.shape[1] != P or start + c > m:
                raise DataError(f"per-sample gradients of shape {tuple(g.shape)}, expected ({m}, {P})")
            G[pos + start:pos + start + c] = g.detach().float().cpu().numpy()  # a copy: the engine's buffer
        r = batch[2] if len(batch) > 2 else np.arange(pos, pos + m)
        rows.append(np.asarray(r.cpu() if hasattr(r, "cpu") else r, np.int64))
        pos += m
    if pos != n:
        raise DataError(f"the data holds {pos} samples, the statistics {n}: a shard is missing or extra")
    if not np.isfinite(G).all():
        bad = int(np.argwhere(~np.isfinite(G))[0][0])
        raise NumericalError(f"non-finite normalized gradient for sample {bad}")
    return G, (np.concatenate(rows) if rows else np.zeros(0, np.int64))


def _chunks(n_rows: int, p: int):
    step = max(1, CHUNK_BYTES // (8 * max(1, n_rows)))
    return [(a, min(p, a + step)) for a in range(0, p, step)]


def gram_matrix(G: np.ndarray, device=None) -> np.ndarray:
    """GGᵀ in float64 (N×N): column chunks of G converted to float64 on ``device``."""
    import torch

    n, p = G.shape
    dev = torch.device(device) if device is not None else torch.device("cpu")
    acc = torch.zeros(n, n, dtype=torch.float64, device=dev)
    for a, z in _chunks(n, p):
        c = torch.from_numpy(np.ascontiguousarray(G[:, a:z])).to(dev, torch.float64)
        acc.addmm_(c, c.T)
    return acc.cpu().numpy()


def top_eigenpairs(gram: np.ndarray, k: int):
    """(λ descending, U N×k) of the top k eigenpairs of the symmetric Gram matrix (in place)."""
    from scipy.linalg import eigh

    n = gram.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"the exact PCA needs 1 <= k <= N (k = {k}, N = {n} ID-train samples)")
    lam, U = eigh(gram, subset_by_index=[n - k, n - 1], overwrite_a=True, check_finite=False,
                  driver="evr")
    order = np.argsort(lam)[::-1]
    return lam[order], np.ascontiguousarray(U[:, order])


def lift(G: np.ndarray, L: np.ndarray, layout, device=None):
    """(GᵀL in flat parameter order (P×k float64), {block: G_bᵀ L as float32}), G the N×P
    float32 matrix, L N×k."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    Lt = torch.as_tensor(L, dtype=torch.float64, device=dev)
    flat = np.empty((G.shape[1], L.shape[1]), np.float64)
    for a, z in _chunks(G.shape[0], G.shape[1]):
        c = torch.from_numpy(np.ascontiguousarray(G[:, a:z])).to(dev, torch.float64)
        flat[a:z] = (c.T @ Lt).cpu().numpy()
    return flat, {b: np.concatenate([flat[a:z] for a, z in layout.block_ranges(b)], 0).astype(np.float32)
                  for b in layout.block_names}


def image(G: np.ndarray, W: np.ndarray, device=None) -> np.ndarray:
    """G·W (N×k float64) for a P×k matrix W."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = torch.zeros(G.shape[0], W.shape[1], dtype=torch.float64, device=dev)
    for a, z in _chunks(G.shape[0], G.shape[1]):
        c = torch.from_numpy(np.ascontiguousarray(G[:, a:z])).to(dev, torch.float64)
        out += c @ torch.as_tensor(W[a:z], dtype=torch.float64, device=dev)
    return out.cpu().numpy()


def exact_pca_from_matrix(G: np.ndarray, layout, k: int, device=None, total_variance=None):
    """Top-k PCA of an explicit normalized gradient matrix G (N×P): ({block: V_b (P_b×k)
    float32}, info). ``info``: eigenvalues per sample (λ_j / N, as the iterative path
    reports them), residuals ‖GGᵀu_j − λ_j u_j‖/λ_j with GGᵀu_j recomputed from G (not
    from the formed Gram), orthonormality error max|VᵀV − I|, timings."""
    n, p = G.shape
    if p != layout.num_params:
        raise ConfigError(f"G has {p} columns, the layout {layout.num_params} parameters")
    t0 = time.perf_counter()
    gram = gram_matrix(G, device)
    t1 = time.perf_counter()
    lam, U = top_eigenpairs(gram, int(k))
    del gram
    t2 = time.perf_counter()
    if lam[-1] <= 0:
        raise NumericalError(f"the exact PCA found only {int((lam > 0).sum())} positive eigenvalues of "
                             f"GGᵀ among the top k = {k}: G has rank < k")
    sig = np.sqrt(lam)
    flat, Vb = lift(G, U / sig[None, :], layout, device)
    # GGᵀu = G (Gᵀu) = G (V σ): the residual of each eigenpair against G itself
    res = np.linalg.norm(image(G, flat * sig[None, :], device) - U * lam[None, :], axis=0) / lam
    V32 = Vb
    gram_v = sum(v.astype(np.float64).T @ v.astype(np.float64) for v in V32.values())
    orth = float(np.abs(gram_v - np.eye(int(k))).max())
    t3 = time.perf_counter()
    ev = lam / n
    info = {"n": int(n), "k": int(k), "solver": EXACT_SOLVER, "eigenvalues": ev.tolist(),
            "residuals": res.tolist(), "max_residual": float(res.max()), "orthonormality_error": orth,
            "total_variance": total_variance,
            "captured_variance_topk": float(ev.sum() / total_variance) if total_variance else None,
            "seconds": {"gram": t1 - t0, "eigh": t2 - t1, "lift": t3 - t2},
            "bytes": exact_pca_bytes(n, p, k)}
    return V32, info


def exact_pca(op, batches, n: int, k: int, timer=None, device=None, stats=None):
    """The exact PCA in one data pass over ``batches`` (the N ID-train samples): G from
    ``op.chunks``, then ``exact_pca_from_matrix``. Returns ({block: V_b}, info)."""
    t0 = time.perf_counter()
    G, _ = materialize_gradients(op, batches, n, timer, device)
    t1 = time.perf_counter()
    dev = getattr(op, "device", device)
    total = stats.total_variance if stats is not None else None
    V, info = exact_pca_from_matrix(G, op.layout, k, dev, total)
    info["seconds"] = {"gradients": t1 - t0, **info["seconds"]}
    return V, info


def subspace_attrs(info: dict, tol=None, extra: dict | None = None) -> dict:
    """The attributes of the PCA subspace store (as ``power.finalize_pca`` writes them)
    for an exact result: one data pass, no iteration; the convergence record is one row."""
    from .power import SUBSPACE_KIND

    res = np.asarray(info["residuals"], np.float64)
    ev = np.asarray(info["eigenvalues"], np.float64)
    total = info.get("total_variance")
    unconverged = [] if tol is None else [int(j) for j in np.flatnonzero(res > float(tol))]
    row = {"pass": 0, "max_residual": float(res.max()), "captured_variance_topk": info.get(
        "captured_variance_topk"), "subspace_change_topk": None, "krylov_dim": int(info["n"])}
    return {"kind": SUBSPACE_KIND, "type": "pca", "k": int(info["k"]), "iterations": 0, "passes": 1,
            "n": int(info["n"]), "columns": int(info["k"]), "solver": EXACT_SOLVER, "orthonormal": True,
            "orthonormality_error": float(info["orthonormality_error"]), "eigenvalues": ev.tolist(),
            "residuals": res.tolist(), "max_residual": float(res.max()), "tol": tol,
            "converged": None if tol is None else not unconverged, "unconverged": unconverged,
            "total_variance": total, "explained_variance_ratio": (ev / total).tolist() if total else None,
            "convergence": [row], "exact": {"bytes": int(info["bytes"]), "seconds": info.get("seconds")},
            **dict(extra or {})}


def write_exact(path, layout, V: dict, info: dict, tol=None, extra: dict | None = None) -> dict:
    """Write the exact result as a PCA subspace store (same arrays and attrs as pca-finalize)."""
    from .power import write_basis

    attrs = subspace_attrs(info, tol, extra)
    write_basis(path, layout, lambda b: V[b], attrs)
    return attrs
