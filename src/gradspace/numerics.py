"""The numerics every score shares (numpy, float64): log-sum-exp, softmax and the energy
score T·logsumexp(f/T) (the negative free energy of Liu et al. 2020; eq. 1 of the
low-dimensional gradient paper is its negative). Feature detectors, the reduced-gradient
detectors and the last-layer gradient scores all use these; the torch energy of the
gradient operators is ``gradspace.subspace.operators.energy``."""

from __future__ import annotations

import numpy as np


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log Σ exp(x) along ``axis``, shifted by the maximum (no overflow)."""
    m = np.max(x, axis=axis, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def softmax_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(f/T) over the class axis, in float64."""
    return softmax(np.asarray(logits, dtype=np.float64) / float(temperature), axis=-1)


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """T·logsumexp(f/T) over the class axis, in float64 (higher = more in-distribution)."""
    logits = np.asarray(logits, dtype=np.float64)
    return temperature * logsumexp(logits / temperature, axis=-1)


__all__ = ["energy_score", "logsumexp", "softmax", "softmax_t"]
