"""Mahalanobis distance to the closest class mean (tied covariance).

Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks", NeurIPS 2018 — in the form used by GradNorm, KNN and
Wu et al. (penultimate features only, no input preprocessing, no feature ensemble):

    mu_c  = mean of the ID-train features of class c (ground-truth labels)
    Sigma = (1/N) sum_c sum_{i: y_i = c} (z_i - mu_c)(z_i - mu_c)^T     (tied covariance)
    S(z)  = - min_c (z - mu_c)^T Sigma^+ (z - mu_c)

Sigma^+ is the Moore-Penrose pseudo-inverse (as sklearn's EmpiricalCovariance
precision_). Fitting streams chunks: per-class sums, counts and the scatter matrix are
accumulated in float64 around a shift (the first chunk's mean) to avoid cancellation, so
memory is O(C*D + D^2) whatever N is. Classes absent from ID train are left out of the min.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError
from .base import Detector, check_finite, register_detector


@register_detector
class Mahalanobis(Detector):
    method = "mahalanobis"
    requires = ("features", "labels")
    score_requires = ("features",)  # labels are only needed to fit
    needs_fit = True
    defaults = {}

    def fit(self, train, ctx) -> None:
        self.fit_chunks([train], ctx)

    def fit_chunks(self, chunks, ctx) -> None:
        shift = sums = counts = scatter = None
        for chunk in chunks:
            z = check_finite("features", np.asarray(chunk["features"], dtype=np.float64))
            y = np.asarray(chunk["labels"]).astype(np.int64).reshape(-1)
            if y.shape[0] != z.shape[0]:
                raise DataError(f"labels ({y.shape[0]}) and features ({z.shape[0]}) differ in length")
            if z.shape[0] == 0:
                continue
            if (y < 0).any():
                raise DataError("detector 'mahalanobis': ID-train labels contain negative values "
                                f"(first at chunk row {int(np.argmax(y < 0))}); fit on ID data only")
            if shift is None:
                D = z.shape[1]
                shift = z.mean(axis=0)
                sums = np.zeros((0, D))
                counts = np.zeros(0, dtype=np.int64)
                scatter = np.zeros((D, D))
            n_cls = int(y.max()) + 1
            if n_cls > sums.shape[0]:
                sums = np.vstack([sums, np.zeros((n_cls - sums.shape[0], sums.shape[1]))])
                counts = np.concatenate([counts, np.zeros(n_cls - counts.shape[0], dtype=np.int64)])
            zs = z - shift
            order = np.argsort(y, kind="stable")
            classes, starts = np.unique(y[order], return_index=True)
            sums[classes] += np.add.reduceat(zs[order], starts, axis=0)
            counts += np.bincount(y, minlength=counts.shape[0])
            scatter += zs.T @ zs
        if shift is None:
            raise DataError("detector 'mahalanobis': no ID-train features to fit on")
        present = np.flatnonzero(counts > 0)
        n = counts.sum()
        mean_shifted = sums[present] / counts[present, None]
        within = scatter - (sums[present].T @ mean_shifted)  # sum_i z z^T - sum_c n_c m_c m_c^T
        cov = (within + within.T) / (2.0 * n)
        precision = np.linalg.pinv(cov, hermitian=True)
        means = mean_shifted + shift
        center = (counts[present] @ means) / n
        self.state = {"classes": present, "means": means, "precision": precision,
                      "center": center}

    def distances(self, z: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances N x C' to the class means present in ID train."""
        if "precision" not in self.state:
            raise ConfigError("detector 'mahalanobis' is not fitted")
        P = np.asarray(self.state["precision"], dtype=np.float64)
        center = np.asarray(self.state["center"], dtype=np.float64)
        mu = np.asarray(self.state["means"], dtype=np.float64) - center
        z = z - center
        zP = z @ P
        d = (np.einsum("nd,nd->n", zP, z)[:, None] - 2.0 * zP @ mu.T
             + np.einsum("cd,cd->c", mu @ P, mu)[None, :])
        return np.maximum(d, 0.0)

    def score(self, emb) -> np.ndarray:
        z = check_finite("features", np.asarray(emb["features"], dtype=np.float64))
        return -self.distances(z).min(axis=1)
