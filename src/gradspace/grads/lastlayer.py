"""Closed forms of last-layer gradient scores from features h (N×D) and logits f (N×C).

For the last layer f = W h + b (W: C×D) and a loss ℓ(f), ∂ℓ/∂W = δ hᵀ with δ = ∂ℓ/∂f and
∂ℓ/∂b = δ (GradNorm, Huang et al. 2021, §5; Igoe et al. 2022, appendix B). Including the
bias is the same as appending a constant 1 to h (``bias=True``). Because the gradient is an
outer product, every entrywise L_p norm factorizes exactly:

    ‖δ hᵀ‖_p = ‖δ‖_p · ‖h‖_p      for p in (0, ∞], and for p = 0 (count of non-zeros),

so no N×C×D tensor is ever formed. With p = softmax(f/T) and a label y,
∇_W log p_y = (e_y − p) hᵀ / T. Everything here is numpy, float64, vectorized over samples;
the only Python loops run over classes (BatchGrad) or blocks of rows (memory bound).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..numerics import energy_score, softmax_t  # noqa: F401  (softmax_t: part of this module's API)

NORMS = ("l1", "l2sq")  # Igoe et al.'s L1 and squared L2




def check_p(p) -> float:
    """Validate an L_p order: a number >= 0, or inf ('inf' accepted)."""
    if isinstance(p, str) and p.lower() in ("inf", "infinity"):
        return float("inf")
    try:
        p = float(p)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"norm order p must be a number >= 0 or 'inf', got {p!r}") from exc
    if not p >= 0:
        raise ConfigError(f"norm order p must be >= 0 or 'inf', got {p!r}")
    return p


def lp_norm(x: np.ndarray, p: float, axis=-1) -> np.ndarray:
    """Entrywise ‖x‖_p = (Σ|x|^p)^(1/p); p = inf: max|x|; p = 0: number of non-zeros.
    (For p < 1 this is the quasi-norm of GradNorm's fraction-norm ablation.)"""
    a = np.abs(np.asarray(x, dtype=np.float64))
    if p == np.inf:
        return a.max(axis=axis)
    if p == 0:
        return np.count_nonzero(a, axis=axis).astype(np.float64)
    if p == 1:
        return a.sum(axis=axis)
    if p == 2:
        return np.sqrt((a * a).sum(axis=axis))
    return (a ** p).sum(axis=axis) ** (1.0 / p)


def with_bias(features: np.ndarray, bias: bool) -> np.ndarray:
    """h̃ = [h, 1] when the bias gradient is included, else h (float64, N×D)."""
    h = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    return np.concatenate([h, np.ones((len(h), 1))], axis=1) if bias else h


def gradnorm(features, logits, p=1.0, temperature=1.0, target="uniform", bias=False) -> np.ndarray:
    """GradNorm (Huang et al. 2021, eq. 5): ‖∂ KL(u ‖ softmax(f/T)) / ∂W‖_p
    = ‖h‖_p · ‖p − u‖_p / T; for p = 1 this is (1/(C·T))·U·V with U = ‖h‖₁,
    V = Σ_c |1 − C·p_c| (eq. 9). ``target="onehot"`` uses CE with the predicted label
    (eq. 7) and returns the negated norm, as the paper does, so higher = more ID."""
    p = check_p(p)
    T = float(temperature)
    prob = softmax_t(logits, T)
    C = prob.shape[1]
    if target == "uniform":
        delta = (prob - 1.0 / C) / T
        sign = 1.0
    elif target == "onehot":
        delta = prob.copy()
        delta[np.arange(len(prob)), prob.argmax(axis=1)] -= 1.0
        delta /= T
        sign = -1.0
    else:
        raise ConfigError(f"gradnorm target must be 'uniform' or 'onehot', got {target!r}")
    return sign * lp_norm(delta, p) * lp_norm(with_bias(features, bias), p)


def _norm_p_minus_onehot(prob: np.ndarray, p: float) -> np.ndarray:
    """N×C matrix of ‖prob_n − e_y‖_p for every label y, without an N×C×C tensor."""
    if p == np.inf:
        order = np.sort(prob, axis=1)
        top1, top2 = order[:, -1:], order[:, -2:-1] if prob.shape[1] > 1 else np.zeros_like(order[:, -1:])
        other_max = np.where(prob >= top1, top2, top1)  # max over c != y
        return np.maximum(other_max, 1.0 - prob)
    if p == 0:
        nnz = np.count_nonzero(prob, axis=1)[:, None].astype(np.float64)
        return nnz - (prob != 0) + (1.0 - prob != 0)
    if p == 1:
        return 2.0 * (1.0 - prob)  # Σ_{c≠y} p_c + (1 − p_y), with Σ p = 1
    s = (prob ** p).sum(axis=1, keepdims=True)
    inner = np.maximum(s - prob ** p, 0.0) + (1.0 - prob) ** p
    return inner ** (1.0 / p)


def _hash_uniform(seed: int, index: np.ndarray, k: int) -> np.ndarray:
    """Counter-based uniforms U(0,1), N×k, from (seed, sample index, draw): the same
    sample gets the same draws whatever the chunking (splitmix64 finalizer)."""
    with np.errstate(over="ignore"):
        z = (np.asarray(index, dtype=np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)
             + np.arange(k, dtype=np.uint64)[None, :] * np.uint64(0xBF58476D1CE4E5B9)
             + np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x94D049BB133111EB))
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def row_keys(values: np.ndarray) -> np.ndarray:
    """A uint64 key per row from the bits of its float64 values (order-independent of
    the other rows), used to seed Monte Carlo label draws per sample."""
    bits = np.ascontiguousarray(np.asarray(values, dtype=np.float64)).view(np.uint64)
    with np.errstate(over="ignore"):
        cols = np.arange(bits.shape[1], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = bits ^ cols[None, :]
        z ^= z >> np.uint64(31)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(29)
        return np.bitwise_xor.reduce(z * (cols[None, :] | np.uint64(1)), axis=1)


def sample_labels(q: np.ndarray, k: int, seed: int, keys: np.ndarray) -> np.ndarray:
    """N×k labels drawn from the rows of q by inverse CDF of counter-based uniforms
    (``keys``: one integer per sample, e.g. ``row_keys(logits)``)."""
    u = _hash_uniform(seed, keys, int(k))  # N×k
    cdf = np.cumsum(q, axis=1)
    cdf[:, -1] = 1.0
    return (u[:, :, None] >= cdf[:, None, :]).sum(axis=2)


def label_weights(prob: np.ndarray, dist: str, samples=None, seed: int = 0,
                  index: np.ndarray | None = None) -> np.ndarray:
    """N×C weights w_y of the expectation E_{Y~q}: q itself (exact), or the empirical
    distribution of ``samples`` labels drawn from q (Monte Carlo, seeded per sample)."""
    N, C = prob.shape
    if dist == "pred":
        q = prob
    elif dist == "uniform":
        q = np.full_like(prob, 1.0 / C)
    else:
        raise ConfigError(f"label distribution must be 'pred' or 'uniform', got {dist!r}")
    if samples is None:
        return q
    k = int(samples)
    if k < 1:
        raise ConfigError(f"samples must be a positive integer or null, got {samples!r}")
    if index is None:
        raise ConfigError("Monte Carlo label samples need the 'index' array (sample ids)")
    labels = sample_labels(q, k, seed, index)
    w = np.zeros_like(prob)
    np.add.at(w, (np.repeat(np.arange(N), k), labels.ravel()), 1.0 / k)
    return w


def igoe_score(features, logits, order="exp_norm", dist="pred", norm="l1", weight="none",
               temperature=1.0, bias=False, samples=None, seed=0, index=None) -> np.ndarray:
    """Igoe et al. (2022) Table 1 gradient scores, shallow (last-layer weights):

    - ``exp_norm``: E_{Y~q}[ w(Y)·‖∇_W log p^(Y)‖ ] = Σ_y q_y w_y ‖h‖·‖e_y − p‖ / T
      (ExGrad, eq. 3, is q = p, L1: (2/T)·‖h‖₁·Σ_y p_y(1 − p_y), eq. 5);
    - ``norm_exp``: ‖E_{Y~q}[∇_W log p^(Y)]‖ = ‖h‖·‖q − p‖ / T (q = uniform: GradNorm;
      q = p: identically 0 when exact — use ``samples`` for the Monte Carlo estimate);
    - ``norm``: "l1" or "l2sq" (squared L2: both factors squared);
    - ``weight``: "none" or "logp_over_p" (w(Y) = log p^(Y) / p^(Y), Table 1's weighted rows).
    """
    if norm not in NORMS:
        raise ConfigError(f"igoe norm must be one of {NORMS}, got {norm!r}")
    if weight not in ("none", "logp_over_p"):
        raise ConfigError(f"igoe weight must be 'none' or 'logp_over_p', got {weight!r}")
    T = float(temperature)
    prob = softmax_t(logits, T)
    pn = 1.0 if norm == "l1" else 2.0
    power = 1.0 if norm == "l1" else 2.0
    hn = lp_norm(with_bias(features, bias), pn) ** power
    w = label_weights(prob, dist, samples, seed, index)
    if order == "norm_exp":
        if weight != "none":
            raise ConfigError("igoe weight 'logp_over_p' applies to order 'exp_norm' only")
        return hn * (lp_norm(w - prob, pn) / T) ** power
    if order != "exp_norm":
        raise ConfigError(f"igoe order must be 'exp_norm' or 'norm_exp', got {order!r}")
    per_label = (_norm_p_minus_onehot(prob, pn) / T) ** power  # N×C
    if weight == "logp_over_p":
        logp = np.log(np.maximum(prob, np.finfo(np.float64).tiny))
        per_label = per_label * logp / np.maximum(prob, np.finfo(np.float64).tiny)
    return hn * (w * per_label).sum(axis=1)


V_TERMS = ("msp", "energy", "varsum", "tv", "none")


def v_term(logits, v: str, temperature: float = 1.0) -> np.ndarray:
    """Igoe et al. (2022) §4.2 output terms: MSP = max_k p_k; Energy = T·logsumexp(f/T);
    VarSum = 1 − Σ_k p_k(1 − p_k); TV = ½·Σ_k |1/C − p_k|; "none" = 1."""
    if v == "energy":
        return energy_score(logits, float(temperature))
    prob = softmax_t(logits, temperature)
    if v == "msp":
        return prob.max(axis=1)
    if v == "varsum":
        return 1.0 - (prob * (1.0 - prob)).sum(axis=1)
    if v == "tv":
        return 0.5 * np.abs(1.0 / prob.shape[1] - prob).sum(axis=1)
    if v == "none":
        return np.ones(len(prob))
    raise ConfigError(f"v_term must be one of {V_TERMS}, got {v!r}")


def hnorm_v(features, logits, p=1.0, v="tv", temperature=1.0) -> np.ndarray:
    """Encoding-output composition U·V (Igoe et al. 2022, §4.2–4.3): U = ‖h‖_p (p = None:
    U = 1, the V term alone), V from ``v_term``. ‖h‖₁·TV = (T/2)·GradNorm exactly."""
    V = v_term(logits, v, temperature)
    if p is None:
        return V
    return lp_norm(np.asarray(features, dtype=np.float64).reshape(len(V), -1), check_p(p)) * V


def batchgrad_reference(features, logits, labels, temperature=1.0, bias=False) -> np.ndarray:
    """B = Σ_i ∇_W log p^(y_i)(x_i) = Σ_i (e_{y_i} − p_i) h̃_iᵀ / T over the ID reference
    points (one per class in BatchGrad), C×D̃."""
    prob = softmax_t(logits, temperature)
    e = np.zeros_like(prob)
    e[np.arange(len(prob)), np.asarray(labels, dtype=np.int64)] = 1.0
    return (e - prob).T @ with_bias(features, bias) / float(temperature)


def batchgrad(features, logits, reference: np.ndarray, temperature=1.0, bias=False,
              block_elems: int = 1 << 22) -> np.ndarray:
    """Shallow BatchGrad (Igoe et al. 2022, eq. 6):
    S(x) = Σ_y p_y ‖(e_y − p) h̃ᵀ/T + B‖₁ with B from ``batchgrad_reference``.
    Loops over classes and row blocks (≤ ``block_elems`` floats), vectorized inside."""
    T = float(temperature)
    prob = softmax_t(logits, T)
    h = with_bias(features, bias)
    N, C = prob.shape
    D = h.shape[1]
    B = np.asarray(reference, dtype=np.float64)
    if B.shape != (C, D):
        raise ConfigError(f"batchgrad reference has shape {B.shape}, expected {(C, D)}")
    out = np.zeros(N)
    rows = max(1, block_elems // max(1, C * D))
    for s in range(0, N, rows):
        pb, hb = prob[s:s + rows], h[s:s + rows]
        base = (-pb[:, :, None] * hb[:, None, :]) / T + B[None]  # −p hᵀ/T + B, n×C×D
        for y in range(C):
            g = base.copy()
            g[:, y, :] += hb / T
            out[s:s + rows] += pb[:, y] * np.abs(g).sum(axis=(1, 2))
    return out
