"""The detector interface shared by every OOD score.

A detector is fitted on ID-train embeddings (only when the method needs ID
statistics), then scores any set of embeddings; higher scores mean "more
in-distribution". Scores are pure functions of precomputed arrays (logits, features,
reduced gradients); model plumbing and I/O live elsewhere. Detectors that need a model
pass (ODIN, BATS) set ``needs_model = True`` and implement ``score_batch``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError, NumericalError
from ..numerics import logsumexp, softmax  # noqa: F401  (the detectors' shared numerics)

Embeddings = Mapping[str, np.ndarray]


@dataclass
class FitContext:
    """What a detector may need besides ID-train embeddings."""

    head_weight: np.ndarray | None = None  # C x D last linear layer
    head_bias: np.ndarray | None = None  # C
    num_classes: int | None = None
    model_path: str | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Detector:
    method: ClassVar[str] = ""
    embedding: ClassVar[str] = "feature"
    requires: ClassVar[tuple[str, ...]] = ("logits",)
    needs_fit: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False
    needs_head: ClassVar[bool] = False  # fit reads the model (head weights, BN, early layers)
    defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs):
        # ``fit(train)`` from Python: the context is optional and ``fit`` returns the
        # detector, whatever signature a subclass's ``fit`` was written with
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("fit")
        if own is not None and not getattr(own, "_gradspace_wrapped", False):

            @functools.wraps(own)
            def fit(self, train, ctx=None, _own=own):
                _own(self, train, FitContext() if ctx is None else ctx)
                return self

            fit._gradspace_wrapped = True
            cls.fit = fit

    def __init__(self, **hparams):
        unknown = set(hparams) - set(self.defaults)
        if unknown:
            raise ConfigError(
                f"detector '{self.method}': unknown hyperparameter(s) {sorted(unknown)}; "
                f"known: {sorted(self.defaults)}")
        self.hparams = {**self.defaults, **hparams}
        self.state: dict[str, Any] = {}

    # -- fitting -------------------------------------------------------------
    def fit(self, train: Embeddings, ctx: FitContext | None = None) -> Detector:
        """Estimate ID statistics from the ID-train arrays ``train`` (named as in
        ``requires``); returns the detector. Default: nothing to fit."""
        return self

    def fit_chunks(self, chunks, ctx: FitContext) -> None:
        """Fit from an iterable of chunks. Default concatenates the required arrays;
        detectors with streaming statistics override this to bound memory."""
        parts: dict[str, list] = {}
        for chunk in chunks:
            for k, v in chunk.items():
                parts.setdefault(k, []).append(np.asarray(v))
        self.fit({k: np.concatenate(v) for k, v in parts.items()}, ctx)

    # -- scoring -------------------------------------------------------------
    def score(self, emb: Embeddings) -> np.ndarray:
        raise NotImplementedError

    def score_batch(self, model, x):  # pragma: no cover - model-pass detectors only
        raise NotImplementedError

    # -- persistence ---------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state)


_REGISTRY: dict[str, type[Detector]] = {}


def register_detector(cls: type[Detector]) -> type[Detector]:
    if not cls.method:
        raise ValueError(f"{cls.__name__} has no method name")
    _REGISTRY[cls.method] = cls
    return cls


def known_detectors() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_detector(method: str) -> type[Detector]:
    _load_all()
    if method not in _REGISTRY:
        raise ConfigError(f"unknown detector '{method}'; known detectors: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[method]


def build_detector(method: str, hparams: Mapping[str, Any] | None = None) -> Detector:
    return get_detector(method)(**dict(hparams or {}))


def _load_all() -> None:
    from . import load_builtin  # noqa: F401  (imports every detector module once)

    load_builtin()


def check_finite(name: str, values: np.ndarray, where: str = "") -> np.ndarray:
    """Raise NumericalError when ``values`` has NaN/inf, naming the array and place."""
    values = np.asarray(values)
    bad = ~np.isfinite(values)
    if bad.any():
        idx = np.argwhere(bad)[0].tolist()
        raise NumericalError(
            f"{name}{' in ' + where if where else ''} has {int(bad.sum())} non-finite value(s), "
            f"first at index {idx}")
    return values


