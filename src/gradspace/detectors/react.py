"""ReAct: rectified activations.

Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations",
NeurIPS 2021.

    c    = p-th percentile of all penultimate activations of the ID training set
    h~   = min(h(x), c)                       (element-wise, upper clip only)
    S(x) = log sum_k exp(W h~ + b)_k          (energy, T = 1)

with (W, b) the model's last linear layer (``FitContext.head_weight/head_bias``).
Hyperparameters: ``percentile`` p (paper: 90) and ``sample_size``, the most feature
values kept to estimate c. The percentile is exact (numpy's linear interpolation over
all N*D values) while N*D <= sample_size; beyond that c is the percentile of a uniform
random sample of sample_size values without replacement (bottom-k of i.i.d. uniform keys,
seeded by ``FitContext.seed``), so memory stays bounded by the sample size and the chunk
size however large the training set is.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError
from .base import Detector, check_finite, logsumexp, register_detector


def head_from_context(method: str, ctx, feature_dim: int | None = None):
    """(W, b) float64 from the FitContext, validated against the feature dimension."""
    if ctx.head_weight is None:
        raise ConfigError(f"detector '{method}' needs the model's last layer "
                          f"(pass --model model.pt to `gradspace fit`)")
    W = check_finite("head weight", np.asarray(ctx.head_weight, dtype=np.float64))
    C = W.shape[0]
    b = (np.zeros(C) if ctx.head_bias is None
         else check_finite("head bias", np.asarray(ctx.head_bias, dtype=np.float64)))
    if W.ndim != 2 or b.shape != (C,):
        raise ConfigError(f"detector '{method}': head weight {W.shape} / bias {b.shape} "
                          f"are not C x D / C")
    if feature_dim is not None and W.shape[1] != feature_dim:
        raise DataError(f"detector '{method}': features have {feature_dim} dims, "
                        f"the model head expects {W.shape[1]}")
    return W, b


@register_detector
class ReAct(Detector):
    needs_head = True
    method = "react"
    requires = ("features",)
    needs_fit = True
    defaults = {"percentile": 90.0, "sample_size": 2**24}

    def __init__(self, **hparams):
        super().__init__(**hparams)
        p = float(self.hparams["percentile"])
        if not 0 < p <= 100:
            raise ConfigError(f"detector 'react': 'percentile' must be in (0, 100], got {p}")
        self.hparams["percentile"] = p
        if int(self.hparams["sample_size"]) < 1:
            raise ConfigError("detector 'react': 'sample_size' must be >= 1")
        self.hparams["sample_size"] = int(self.hparams["sample_size"])

    def fit(self, train, ctx) -> None:
        self.fit_chunks([train], ctx)

    def fit_chunks(self, chunks, ctx) -> None:
        budget = self.hparams["sample_size"]
        rng = np.random.default_rng(ctx.seed)
        values = np.empty(0)
        keys = np.empty(0)
        total = 0
        dim = None
        for chunk in chunks:
            feats = check_finite("features", np.asarray(chunk["features"]))
            if dim is None:
                dim = feats.shape[1]
            flat = feats.reshape(-1)
            total += flat.size
            if total == flat.size:  # first chunk fixes the dtype (float32 stores stay float32)
                values = values.astype(flat.dtype)
            values = np.concatenate([values, flat.astype(values.dtype, copy=False)])
            keys = np.concatenate([keys, rng.random(flat.size)])
            if values.size > budget:
                keep = np.argpartition(keys, budget - 1)[:budget]
                values, keys = values[keep], keys[keep]
        if total == 0:
            raise DataError("detector 'react': no ID-train features to fit on")
        W, b = head_from_context(self.method, ctx, dim)
        threshold = float(np.percentile(values.astype(np.float64), self.hparams["percentile"]))
        self.state = {"threshold": threshold, "head_weight": W, "head_bias": b,
                      "exact": total <= budget}

    def score(self, emb) -> np.ndarray:
        if "threshold" not in self.state:
            raise ConfigError("detector 'react' is not fitted")
        feats = check_finite("features", np.asarray(emb["features"], dtype=np.float64))
        clipped = np.minimum(feats, float(self.state["threshold"]))
        W = np.asarray(self.state["head_weight"], dtype=np.float64)
        b = np.asarray(self.state["head_bias"], dtype=np.float64)
        return logsumexp(clipped @ W.T + b, axis=1)
