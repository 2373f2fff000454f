"""ViM: virtual-logit matching.

Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching",
CVPR 2022.

With the last layer logits = W h + b:

    o     = -pinv(W) b                                   (origin of the feature space)
    x~    = h - o
    P     = top-D eigenvectors of (1/N) sum_i x~_i x~_i^T over ID train (principal space)
    r(h)  = || x~^{P-perp} || = || x~ R ||,  R = the remaining eigenvectors
    alpha = mean_i max_c logits_ic / mean_i r(h_i)       (over ID train)
    S(x)  = logsumexp_c logits_c - alpha * r(h)

The paper's score is the softmax probability of the virtual logit v = alpha * r,
p_v = exp(v) / (exp(v) + sum_c exp(logits_c)) = sigmoid(v - logsumexp(logits)), i.e.
OOD-ness; S(x) = -logit(p_v) is a strictly decreasing transform of it (same AUROC/FPR),
exactly the reference code's ``energy - vlogit``. Higher = more ID.

Hyperparameter ``dim`` (D); ``None`` follows the reference code: D = 1000 if the feature
dim is >= 2048 (ResNet-50), 512 if >= 768 (ViT-B), else half the feature dim.
Fitting streams the chunks twice (second moment, then the residual norms for alpha);
memory is O(D_feat^2).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError
from .base import Detector, check_finite, logsumexp, register_detector
from .react import head_from_context


def default_dim(feature_dim: int) -> int:
    """ViM's principal dimension rule (reference implementation)."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return max(1, feature_dim // 2)


@register_detector
class ViM(Detector):
    needs_head = True
    method = "vim"
    requires = ("logits", "features")
    needs_fit = True
    defaults = {"dim": None}

    def __init__(self, **hparams):
        super().__init__(**hparams)
        dim = self.hparams["dim"]
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int | np.integer)
                                or dim < 1):
            raise ConfigError(f"detector 'vim': 'dim' must be a positive integer or null, got {dim!r}")

    def fit(self, train, ctx) -> None:
        self.fit_chunks([train], ctx)

    def fit_chunks(self, chunks, ctx) -> None:
        if iter(chunks) is chunks:  # a one-shot iterator cannot be read twice
            chunks = list(chunks)
        origin = second = None
        n = 0
        sum_maxlogit = 0.0
        for chunk in chunks:
            h = check_finite("features", np.asarray(chunk["features"], dtype=np.float64))
            logits = check_finite("logits", np.asarray(chunk["logits"], dtype=np.float64))
            if origin is None:
                W, b = head_from_context(self.method, ctx, h.shape[1])
                origin = -np.linalg.pinv(W) @ b
                second = np.zeros((h.shape[1], h.shape[1]))
            x = h - origin
            second += x.T @ x
            sum_maxlogit += float(logits.max(axis=1).sum()) if logits.size else 0.0
            n += h.shape[0]
        if n == 0:
            raise DataError("detector 'vim': no ID-train features to fit on")
        feature_dim = origin.shape[0]
        dim = self.hparams["dim"] if self.hparams["dim"] is not None else default_dim(feature_dim)
        if not 0 < dim < feature_dim:
            raise ConfigError(f"detector 'vim': 'dim' = {dim} must be below the feature "
                              f"dimension {feature_dim}")
        eigval, eigvec = np.linalg.eigh((second + second.T) / (2.0 * n))  # ascending
        residual = np.ascontiguousarray(eigvec[:, : feature_dim - dim])
        sum_norm = 0.0
        for chunk in chunks:
            h = np.asarray(chunk["features"], dtype=np.float64)
            sum_norm += float(np.linalg.norm((h - origin) @ residual, axis=1).sum())
        mean_norm = sum_norm / n
        if mean_norm <= 0:
            raise DataError("detector 'vim': ID-train features have no residual outside the "
                            f"{dim}-dim principal space; use a smaller 'dim'")
        alpha = (sum_maxlogit / n) / mean_norm
        self.state = {"origin": origin, "residual": residual, "alpha": alpha, "dim": dim}

    def residual_norm(self, h: np.ndarray) -> np.ndarray:
        if "residual" not in self.state:
            raise ConfigError("detector 'vim' is not fitted")
        origin = np.asarray(self.state["origin"], dtype=np.float64)
        if h.shape[1] != origin.shape[0]:
            raise DataError(f"detector 'vim': features have {h.shape[1]} dims, fitted on "
                            f"{origin.shape[0]}")
        return np.linalg.norm((h - origin) @ np.asarray(self.state["residual"], dtype=np.float64),
                              axis=1)

    def score(self, emb) -> np.ndarray:
        h = check_finite("features", np.asarray(emb["features"], dtype=np.float64))
        logits = check_finite("logits", np.asarray(emb["logits"], dtype=np.float64))
        residual = self.residual_norm(h)
        return logsumexp(logits, axis=1) - float(self.state["alpha"]) * residual
