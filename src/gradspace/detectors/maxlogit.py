"""Maximum logit (MaxLogit).

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song, "Scaling
Out-of-Distribution Detection for Real-World Settings", ICML 2022.

    S(x) = max_c f_c(x)

with f(x) the logits. No hyperparameters, nothing to fit.
"""

from __future__ import annotations

import numpy as np

from .base import Detector, check_finite, register_detector


@register_detector
class MaxLogit(Detector):
    method = "maxlogit"
    requires = ("logits",)
    defaults = {}

    def score(self, emb) -> np.ndarray:
        logits = check_finite("logits", np.asarray(emb["logits"], dtype=np.float64))
        return logits.max(axis=1)
