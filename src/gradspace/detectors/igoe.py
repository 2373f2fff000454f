"""Igoe, Chung, Char & Schneider, "How Useful are Gradients for OOD Detection Really?",
2022: ExGrad, the gradient-score variants of their Table 1, the encoding–output scores
U·V of §4.2–4.3 and BatchGrad (eq. 6). All shallow (last-layer weight) variants are
closed forms of the stored features h and logits f (p = softmax(f/T),
∇_W log p^(y) = (e_y − p) hᵀ / T); see ``gradspace.grads.lastlayer``.

Registered detectors and hyperparameters (defaults in brackets):

- ``exgrad``: ExGrad, eq. 3, S = E_{Y~p}[‖∇_W log p^(Y)‖₁] = (2/T)·‖h‖₁·Σ_k p_k(1 − p_k)
  (eq. 5); larger for OOD inputs, so the detector returns −S (see ``orientation``).
  ``temperature`` [1], ``bias`` [false].
- ``igoe_grad``: any Table 1 row: ``order`` "exp_norm" (E‖∇‖) | "norm_exp" (‖E∇‖)
  ["exp_norm"], ``dist`` "pred" (Y ~ p) | "uniform" ["pred"], ``norm`` "l1" | "l2sq"
  ["l1"], ``weight`` "none" | "logp_over_p" (E_{Y~p}[(log p^(Y)/p^(Y))‖∇‖²]) ["none"],
  ``samples`` null (exact expectation) | K (Monte Carlo with K labels per sample, drawn
  with ``seed`` [0] and a hash of the sample's logits, so a sample always gets the same
  labels whatever the chunking) [null], ``temperature`` [1], ``bias`` [false].
  Note ‖E_{Y~p}[∇ log p^(Y)]‖ is identically 0 when exact (Σ_y p_y ∇log p_y = ∇Σ_y p_y).
- ``hnorm_v``: U·V with U = ‖h‖_p (``p`` [1]; null: V alone; Igoe's grid
  {0, 0.1, 0.3, 0.5, 0.8, 1, 2, 3, 4, 5, 6, inf}) and ``v_term`` "msp" | "energy" |
  "varsum" | "tv" | "none" (U alone) ["tv"]: MSP = max p, Energy = T·logsumexp(f/T),
  VarSum = 1 − Σ p(1 − p), TV = ½Σ|1/C − p|. ``temperature`` [1].
- ``batchgrad``: shallow BatchGrad, eq. 6,
  S(x) = E_{Y~p}[‖∇_W(log p^(Y)(x) + Σ_i log p^(y_i)(x_i^ID))‖₁], one ID-train point per
  class i (chosen at fit time by a seeded hash of the sample position, ``seed`` [0]).
  Labels drawn from p as in ExGrad, so larger for OOD inputs: the detector returns −S.
  ``temperature`` [1], ``bias`` [false].

Deep (all-parameter / block) variants need a model pass: ``gradspace grad-scores``.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError
from ..grads import lastlayer
from .base import Detector, check_finite, register_detector
from .gradnorm import choice, features_logits, flag, norm_order, positive


def orientation(dist: str) -> float:
    """+1 where the raw score is larger for ID inputs, −1 where it is larger for OOD ones.

    Igoe et al. score OOD-ness and orient each variant by its trend: with labels drawn from
    the model's own p (ExGrad and its variants) the expected gradient norm decomposes into
    V = Σ p(1 − p)-like terms that are small for confident (ID) inputs, so larger means
    OOD; with uniform labels (the GradNorm family) larger means ID. Our detectors return
    "higher = more ID", so the former are negated."""
    return -1.0 if dist == "pred" else 1.0


@register_detector
class ExGrad(Detector):
    method = "exgrad"
    embedding = "gradient"
    requires = ("logits", "features")
    defaults = {"temperature": 1.0, "bias": False}

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.hparams["temperature"] = positive(self.method, "temperature", self.hparams["temperature"])
        self.hparams["bias"] = flag(self.method, "bias", self.hparams["bias"])

    def score(self, emb) -> np.ndarray:
        feats, logits = features_logits(emb, self.method)
        raw = lastlayer.igoe_score(feats, logits, "exp_norm", "pred", "l1", "none",
                                   self.hparams["temperature"], self.hparams["bias"])
        return orientation("pred") * raw


@register_detector
class IgoeGrad(Detector):
    method = "igoe_grad"
    embedding = "gradient"
    requires = ("logits", "features")
    defaults = {"order": "exp_norm", "dist": "pred", "norm": "l1", "weight": "none",
                "temperature": 1.0, "bias": False, "samples": None, "seed": 0}

    def __init__(self, **hparams):
        super().__init__(**hparams)
        h = self.hparams
        choice(self.method, "order", h["order"], ("exp_norm", "norm_exp"))
        choice(self.method, "dist", h["dist"], ("pred", "uniform"))
        choice(self.method, "norm", h["norm"], lastlayer.NORMS)
        choice(self.method, "weight", h["weight"], ("none", "logp_over_p"))
        if h["weight"] != "none" and h["order"] != "exp_norm":
            raise ConfigError(f"detector '{self.method}': weight '{h['weight']}' needs order 'exp_norm'")
        h["temperature"] = positive(self.method, "temperature", h["temperature"])
        h["bias"] = flag(self.method, "bias", h["bias"])
        s = h["samples"]
        if s is not None and (isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 1):
            raise ConfigError(f"detector '{self.method}': 'samples' must be null or a positive "
                              f"integer, got {s!r}")

    def score(self, emb) -> np.ndarray:
        h = self.hparams
        feats, logits = features_logits(emb, self.method)
        index = lastlayer.row_keys(logits) if h["samples"] is not None else None
        raw = lastlayer.igoe_score(feats, logits, h["order"], h["dist"], h["norm"], h["weight"],
                                   h["temperature"], h["bias"], h["samples"], int(h["seed"]), index)
        return orientation(h["dist"]) * raw


@register_detector
class HNormV(Detector):
    method = "hnorm_v"
    embedding = "gradient"
    requires = ("logits", "features")
    defaults = {"p": 1.0, "v_term": "tv", "temperature": 1.0}

    def __init__(self, **hparams):
        super().__init__(**hparams)
        h = self.hparams
        if h["p"] is not None:
            norm_order(self.method, h["p"])
        choice(self.method, "v_term", h["v_term"], lastlayer.V_TERMS)
        if h["p"] is None and h["v_term"] == "none":
            raise ConfigError(f"detector '{self.method}': p = null and v_term = 'none' is a constant")
        h["temperature"] = positive(self.method, "temperature", h["temperature"])

    def score(self, emb) -> np.ndarray:
        h = self.hparams
        if h["p"] is None:
            logits = check_finite("logits", np.asarray(emb["logits"], dtype=np.float64))
            return lastlayer.v_term(logits, h["v_term"], h["temperature"])
        feats, logits = features_logits(emb, self.method)
        return lastlayer.hnorm_v(feats, logits, norm_order(self.method, h["p"]), h["v_term"],
                                 h["temperature"])


def _position_keys(seed: int, start: int, n: int) -> np.ndarray:
    return lastlayer._hash_uniform(seed, np.arange(start, start + n), 1)[:, 0]


@register_detector
class BatchGrad(Detector):
    method = "batchgrad"
    embedding = "gradient"
    requires = ("logits", "features", "labels")
    score_requires = ("logits", "features")
    needs_fit = True
    defaults = {"temperature": 1.0, "bias": False, "seed": 0}

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.hparams["temperature"] = positive(self.method, "temperature", self.hparams["temperature"])
        self.hparams["bias"] = flag(self.method, "bias", self.hparams["bias"])

    def fit(self, train, ctx) -> None:
        self.fit_chunks([train], ctx)

    def fit_chunks(self, chunks, ctx) -> None:
        """Streaming choice of one ID-train point per class: the one with the smallest
        seeded hash key of its position in the stream (deterministic, chunking-free)."""
        best_key: dict[int, float] = {}
        best: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        start = 0
        for c in chunks:
            feats, logits = features_logits(c, self.method)
            labels = np.asarray(c["labels"], dtype=np.int64)
            keys = _position_keys(int(self.hparams["seed"]), start, len(labels))
            start += len(labels)
            for cls in np.unique(labels[labels >= 0]):  # loop over classes, not samples
                m = np.flatnonzero(labels == cls)
                j = m[np.argmin(keys[m])]
                if keys[j] < best_key.get(int(cls), np.inf):
                    best_key[int(cls)] = float(keys[j])
                    best[int(cls)] = (feats[j], logits[j])
        if not best:
            raise DataError(f"detector '{self.method}': no labelled ID-train samples to fit on")
        C = next(iter(best.values()))[1].shape[0]
        missing = sorted(set(range(C)) - set(best))
        if missing:
            raise DataError(f"detector '{self.method}': ID-train has no sample of class(es) {missing}")
        classes = np.arange(C)
        feats = np.stack([best[c][0] for c in classes])
        logits = np.stack([best[c][1] for c in classes])
        self.state = {"reference": lastlayer.batchgrad_reference(
            feats, logits, classes, self.hparams["temperature"], self.hparams["bias"])}

    def score(self, emb) -> np.ndarray:
        if "reference" not in self.state:
            raise ConfigError(f"detector '{self.method}' is not fitted")
        feats, logits = features_logits(emb, self.method)
        return orientation("pred") * lastlayer.batchgrad(feats, logits, self.state["reference"],
                                                         self.hparams["temperature"], self.hparams["bias"])
