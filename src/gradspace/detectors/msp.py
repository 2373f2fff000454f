"""Maximum softmax probability (MSP).

Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
Examples in Neural Networks", ICLR 2017.

    S(x) = max_c softmax(f(x))_c

with f(x) the logits. No hyperparameters, nothing to fit.
"""

from __future__ import annotations

import numpy as np

from .base import Detector, check_finite, register_detector, softmax


@register_detector
class MSP(Detector):
    method = "msp"
    requires = ("logits",)
    defaults = {}

    def score(self, emb) -> np.ndarray:
        logits = check_finite("logits", np.asarray(emb["logits"], dtype=np.float64))
        return softmax(logits, axis=1).max(axis=1)
