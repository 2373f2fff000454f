"""Block Krylov Rayleigh–Ritz for the PCA subspace, from sample-space images only.

C = GᵀG (P×P, G the N×P normalized gradient matrix). Every data pass t of the unrolled
iteration already computes, for every sample, the image Y_t = G·V_t (N×K') and then
W_t = Gᵀ Y_t = C·V_t (P×K'); the reduce orthonormalizes W_t = V_{t+1} R_t (TSQR). Only
the current parameter-space block V_t is kept on disk (P×K'), but the small sample-space
images Y_t and the K'×K' factors R_t of every pass are (N×K' each), and they determine
the Gram operator GGᵀ on the whole sample-space Krylov space:

    G Gᵀ Y_s = G W_s = G V_{s+1} R_s = Y_{s+1} R_s           (no inverse of R needed).

So after passes 0..q the block Krylov space K = span[Y_0, …, Y_{q−1}] (dimension up to
q·K') and its image GGᵀK = [Y_1 R_0, …, Y_q R_{q−1}] are known exactly. Rayleigh–Ritz of
GGᵀ on K (Q an orthonormal basis of K, from an SVD of the N×qK' Krylov matrix with
numerically dependent directions dropped) gives Ritz pairs (λ_j, u_j = Q s_j); the
corresponding PCA directions are the right Ritz vectors

    v_j = Gᵀ u_j / σ_j,   σ_j = √λ_j,

which are exactly orthonormal (v_iᵀ v_j = s_iᵀ QᵀGGᵀQ s_j / σ_iσ_j = δ_ij) and lie in
span(V_1, …, V_q) = span(C V_0, …, C^q V_0): the Rayleigh–Ritz vectors of C over the whole
parameter-space Krylov space, which is never stored. One more pass (the *lift*, Gᵀ·L with
L = [u_j / σ_j], N×k) writes them. Block Krylov with Rayleigh–Ritz over the whole space
converges much faster than subspace (power) iteration when the spectrum has a flat
tail (Musco & Musco 2015, "Randomized block Krylov methods for stronger and faster
approximate SVD"); ``window=1`` keeps only the last block, which is exactly the
subspace iteration of the paper (Rayleigh–Ritz on V_q).

Per-direction residuals of the Ritz pairs are exact in the same space:
r_j = GGᵀu_j − λ_j u_j = GGᵀK T s_j − λ_j K T s_j, reported as ‖r_j‖ / λ_j (the Gram
operator GGᵀ has the same nonzero eigenvalues as C; u_j ↔ v_j = Gᵀu_j/σ_j).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, NumericalError

# Directions of the Krylov matrix whose singular value is below RTOL times the largest are
# numerically dependent on the others (a converged direction repeated in every block): the
# images are float32 products, relative noise ~1e-6, which such a direction would amplify
# by 1/σ. Dropping them loses nothing the other directions do not already span.
RTOL = 1e-4


@dataclass
class Ritz:
    """Rayleigh–Ritz result over a block Krylov space."""

    eigenvalues: np.ndarray      # λ_j of C (sum over samples), descending, all kept directions
    lift: np.ndarray             # N×k: v_j = Gᵀ lift[:, j]
    residuals: np.ndarray        # ‖GGᵀu_j − λ_j u_j‖ / λ_j for the k leading pairs
    coef: np.ndarray             # m×k: u_j/σ_j = K coef[:, j] over the Krylov matrix columns
    blocks: tuple[int, int]      # passes s in [a, b) whose Y_s form the Krylov matrix
    dim: int                     # dimension kept after dropping dependent directions
    meta: dict = field(default_factory=dict)


def krylov_ritz(Ys, Rs, k: int, window: int | None = None, rtol: float = RTOL) -> Ritz:
    """Rayleigh–Ritz of GGᵀ on span[Y_a..Y_{q−1}], q = len(Rs), a = q − window.

    ``Ys``: [Y_0, …, Y_q] (N×K' each); ``Rs``: [R_0, …, R_{q−1}] with W_s = V_{s+1} R_s.
    """
    q = len(Rs)
    if q < 1 or len(Ys) != q + 1:
        raise ConfigError(f"Rayleigh–Ritz needs images Y_0..Y_q and factors R_0..R_(q-1) "
                          f"(got {len(Ys)} images, {q} factors)")
    w = q if window is None else max(1, min(int(window), q))
    a = q - w
    Kmat = np.hstack([np.asarray(Ys[s], np.float64) for s in range(a, q)])
    Img = np.hstack([np.asarray(Ys[s + 1], np.float64) @ np.asarray(Rs[s], np.float64)
                     for s in range(a, q)])
    if not (np.isfinite(Kmat).all() and np.isfinite(Img).all()):
        raise NumericalError("non-finite sample-space images G·V in the Krylov record")
    U, sv, Zt = np.linalg.svd(Kmat, full_matrices=False)
    if sv.size == 0 or sv[0] == 0:
        raise NumericalError("the Krylov space is empty: G·V is zero for every sample")
    keep = sv > rtol * sv[0]
    T = Zt[keep].T / sv[keep]                      # K T = Q (orthonormal columns)
    Q = U[:, keep]
    GQ = Img @ T                                   # GGᵀ Q
    H = Q.T @ GQ
    H = 0.5 * (H + H.T)
    lam, S = np.linalg.eigh(H)
    order = np.argsort(lam)[::-1]
    lam, S = lam[order], S[:, order]
    k = int(k)
    if k > lam.size:
        raise ConfigError(f"the Krylov space has dimension {lam.size} < k = {k}: more passes, a "
                          "larger oversample, or fewer directions are needed (or fewer samples than k)")
    lead = np.maximum(lam[:k], np.finfo(np.float64).tiny)
    sig = np.sqrt(lead)
    R = GQ @ S[:, :k] - (Q @ S[:, :k]) * lead[None, :]
    residuals = np.linalg.norm(R, axis=0) / lead
    coef = T @ S[:, :k] / sig[None, :]
    lift = Kmat @ coef
    return Ritz(eigenvalues=lam, lift=lift, residuals=residuals, coef=coef, blocks=(a, q),
                dim=int(keep.sum()))


def ritz_overlap(prev: Ritz, cur: Ritz, Ys, Rs) -> np.ndarray:
    """V_prevᵀ V_cur (k_prev×k_cur) of the right Ritz vectors of two Rayleigh–Ritz results
    of the same run, from sample-space data only: v = Gᵀ K c, so v_iᵀ v_j = c_iᵀ KᵀGGᵀK' c_j."""
    def cols(r):
        a, q = r.blocks
        return [(s, Ys[s], np.asarray(Ys[s + 1], np.float64) @ np.asarray(Rs[s], np.float64))
                for s in range(a, q)]

    Kp = np.hstack([y for _, y, _ in cols(prev)])
    Ic = np.hstack([img for _, _, img in cols(cur)])      # GGᵀ K_cur
    return (Kp @ prev.coef).T @ (Ic @ cur.coef)


def largest_sine(M: np.ndarray) -> float:
    """sin of the largest principal angle from the cosine matrix M = AᵀB."""
    if M.size == 0:
        return 0.0
    s = np.linalg.svd(M, compute_uv=False)
    smin = s.min() if M.shape[0] <= M.shape[1] else np.sort(s)[-M.shape[1]]
    return float(np.sqrt(max(0.0, 1.0 - min(1.0, smin) ** 2)))


def best_ritz(Ys, Rs, k: int, window: int | None = None) -> Ritz:
    """Rayleigh–Ritz over the Krylov space of the last ``window`` blocks (all when None).
    With the whole space, the last block alone (subspace iteration) is tried too and the
    result with the smaller largest residual among the k leading pairs is kept: the whole
    space wins by orders of magnitude early on, while late, once the images' float32 noise
    dominates the older blocks, the last block alone can be more accurate."""
    rz = krylov_ritz(Ys, Rs, k, window)
    if window is None and len(Rs) > 1:
        last = krylov_ritz(Ys, Rs, k, 1)
        if last.residuals.max() < rz.residuals.max():
            return last
    return rz
