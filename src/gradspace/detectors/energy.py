"""Energy score.

Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020.

    S(x) = -E(x; f) = T * log sum_c exp(f_c(x) / T)

Higher = more ID. Hyperparameter ``temperature`` T (paper: T = 1).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..numerics import energy_score
from .base import Detector, check_finite, register_detector


def positive_float(method: str, key: str, value) -> float:
    """Validate a strictly positive float hyperparameter."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"detector '{method}': '{key}' must be a number, got {value!r}") from None
    if not np.isfinite(v) or v <= 0:
        raise ConfigError(f"detector '{method}': '{key}' must be > 0, got {value!r}")
    return v


@register_detector
class Energy(Detector):
    method = "energy"
    requires = ("logits",)
    defaults = {"temperature": 1.0}

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.hparams["temperature"] = positive_float(self.method, "temperature",
                                                     self.hparams["temperature"])

    def score(self, emb) -> np.ndarray:
        logits = check_finite("logits", np.asarray(emb["logits"], dtype=np.float64))
        return energy_score(logits, self.hparams["temperature"])
