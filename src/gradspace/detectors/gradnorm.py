"""GradNorm.

Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in
the Wild", NeurIPS 2021.

    S(x) = ‖ ∂ KL(u ‖ softmax(f(x)/T)) / ∂W ‖_p                                 (eq. 5)

with u the uniform distribution over the C classes and W the last linear layer's weight.
For f = W h + b the gradient is the outer product ((p − u)/T) hᵀ (p = softmax(f/T)), so

    S(x) = ‖h‖_p · ‖p − u‖_p / T,   and for p = 1:  S = (1/(C·T)) · U · V,
    U = ‖h‖₁,  V = Σ_c |1 − C·p_c|                                             (eq. 9)

computed from the stored features h and logits f without autograd. Hyperparameters
(the paper's ablations): ``p`` ∈ {0.3, 0.5, 0.8, 1, 2, 3, 4, 5, 6, inf} (default 1),
``temperature`` T (default 1), ``target`` "uniform" (default) or "onehot" (CE with the
predicted label, eq. 7, scored as −‖·‖ as in the paper), ``bias`` (include the bias
gradient; default false: weights only, as the paper). Block and all-parameter variants
need a model pass: ``gradspace grad-scores`` + the ``stored_grad_score`` detector.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..grads import lastlayer
from .base import Detector, check_finite, register_detector
from .energy import positive_float

positive = positive_float  # strictly positive float hyperparameter (shared helper)


def norm_order(method: str, value) -> float:
    try:
        return lastlayer.check_p(value)
    except ConfigError as exc:
        raise ConfigError(f"detector '{method}': 'p': {exc}") from None


def choice(method: str, key: str, value, options) -> str:
    if value not in options:
        raise ConfigError(f"detector '{method}': '{key}' must be one of {list(options)}, got {value!r}")
    return value


def flag(method: str, key: str, value) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ConfigError(f"detector '{method}': '{key}' must be true or false, got {value!r}")
    return bool(value)


def features_logits(emb, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The stored penultimate features (N×D) and logits (N×C), float64, checked finite."""
    feats = check_finite("features", np.asarray(emb["features"], dtype=np.float64))
    logits = check_finite("logits", np.asarray(emb["logits"], dtype=np.float64))
    if feats.shape[0] != logits.shape[0]:
        raise ConfigError(f"detector '{method}': features have {feats.shape[0]} rows, "
                          f"logits {logits.shape[0]}")
    return feats.reshape(len(feats), -1), logits


@register_detector
class GradNorm(Detector):
    method = "gradnorm"
    embedding = "gradient"
    requires = ("logits", "features")
    defaults = {"p": 1.0, "temperature": 1.0, "target": "uniform", "bias": False}

    def __init__(self, **hparams):
        super().__init__(**hparams)
        h = self.hparams
        norm_order(self.method, h["p"])
        h["temperature"] = positive(self.method, "temperature", h["temperature"])
        choice(self.method, "target", h["target"], ("uniform", "onehot"))
        h["bias"] = flag(self.method, "bias", h["bias"])

    def score(self, emb) -> np.ndarray:
        h = self.hparams
        feats, logits = features_logits(emb, self.method)
        return lastlayer.gradnorm(feats, logits, norm_order(self.method, h["p"]), h["temperature"],
                                  h["target"], h["bias"])


@register_detector
class StoredGradScore(Detector):
    """A per-sample score computed in a model pass by ``gradspace grad-scores`` (deep /
    block / all-parameter variants of GradNorm, ExGrad, the Igoe et al. Table 1 rows and
    BatchGrad) and read back from its stores: ``key`` names the store array. Nothing to
    fit; the array is already oriented so that higher = more ID."""

    method = "stored_grad_score"
    embedding = "gradient"
    requires = ()
    defaults = {"key": None}

    def __init__(self, **hparams):
        super().__init__(**hparams)
        key = self.hparams["key"]
        if not isinstance(key, str) or not key or key in ("index", "labels"):
            raise ConfigError(f"detector '{self.method}': 'key' must name a score array of a "
                              f"grad-scores store, got {key!r}")
        self.score_requires = (key,)

    def score(self, emb) -> np.ndarray:
        key = self.hparams["key"]
        if key not in emb:
            raise ConfigError(f"detector '{self.method}': no array '{key}' in the chunk "
                              f"(has: {sorted(emb)})")
        return check_finite(key, np.asarray(emb[key], dtype=np.float64).reshape(-1))
