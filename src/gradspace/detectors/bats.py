"""BATS: boosting OOD detection with typical features.

Zhu, Chen, Xie, Yi, Liu, Li & Ye, "Boosting Out-of-distribution Detection with Typical
Features", NeurIPS 2022.

The output of the BatchNorm layer whose activations (after the nonlinearity and global
pooling) become the penultimate features — ``model.typical_set_bn()`` — is truncated to
the per-channel typical set

    [beta - lam * |gamma|,  beta + lam * |gamma|]

(gamma, beta: that BN's weight and bias; the BN output of a channel is distributed as
N(beta, gamma^2) on ID data, so lam counts standard deviations), and the score is the
energy of the logits of the modified forward pass:

    S(x) = log sum_c exp(f_c(x; truncated BN))           (T = 1)

Hyperparameter ``lam`` (default 1.0). The BATS paper uses lam = 1 for ImageNet
ResNet-50 (its recommended setting and the config default); it tunes lam on small-scale
benchmarks separately, and Wu et al. (low-dimensional gradients) use lam = 0.1 when the
same rectification is applied to reduced gradients. |gamma| (instead of gamma) keeps the
interval well-formed for negative BN weights.

``fit`` reads gamma and beta from the model (``FitContext.extra['model']`` or
``FitContext.model_path`` via :func:`gradspace.models.load_model`) and stores them;
``score_batch`` runs the model with a forward hook that clamps the BN output, and
removes the hook afterwards. Models without such a BN (e.g. ViT, LayerNorm only) are
rejected with a ConfigError.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, ModelError
from .base import Detector, check_finite, register_detector
from .energy import positive_float

NOT_APPLICABLE = ("detector 'bats' is not applicable to this model: it has no BatchNorm layer "
                  "feeding the penultimate features (typical_set_bn() is None, e.g. a ViT with "
                  "LayerNorm only); remove 'bats' from config['detectors']")


def _typical_set_bn(model):
    getter = getattr(model, "typical_set_bn", None)
    bn = getter() if callable(getter) else None
    if bn is None:
        raise ConfigError(NOT_APPLICABLE)
    return bn


@register_detector
class BATS(Detector):
    needs_head = True
    method = "bats"
    requires = ("model",)
    needs_fit = True
    needs_model = True
    defaults = {"lam": 1.0}

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.hparams["lam"] = positive_float(self.method, "lam", self.hparams["lam"])

    def fit(self, train, ctx) -> None:
        model = ctx.extra.get("model")
        if model is None:
            if not ctx.model_path:
                raise ConfigError("detector 'bats' needs the model (pass --model model.pt to fit)")
            from ..models import load_model
            from ..runtime import resolve_device

            model, _ = load_model(ctx.model_path, resolve_device("cpu"))
        bn = _typical_set_bn(model)
        n = int(bn.num_features)
        gamma = (np.ones(n) if bn.weight is None
                 else bn.weight.detach().cpu().double().numpy())
        beta = (np.zeros(n) if bn.bias is None
                else bn.bias.detach().cpu().double().numpy())
        self.state = {"gamma": check_finite("BN weight (gamma)", gamma),
                      "beta": check_finite("BN bias (beta)", beta)}

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) of the typical set, one value per BN channel."""
        if "gamma" not in self.state:
            raise ConfigError("detector 'bats' is not fitted (no gamma/beta in its state)")
        lam = self.hparams["lam"]
        gamma = np.asarray(self.state["gamma"], dtype=np.float64)
        beta = np.asarray(self.state["beta"], dtype=np.float64)
        return beta - lam * np.abs(gamma), beta + lam * np.abs(gamma)

    def score_batch(self, model, x):
        """Energy (T = 1) of the logits with the BN output clamped (float64 tensor, N)."""
        import torch

        bn = _typical_set_bn(model)
        lower, upper = self.bounds()
        if int(bn.num_features) != lower.shape[0]:
            raise ModelError(f"detector 'bats' was fitted on a BN with {lower.shape[0]} channels, "
                             f"the model's typical_set_bn() has {bn.num_features}")
        lo = torch.as_tensor(lower, dtype=x.dtype, device=x.device)
        hi = torch.as_tensor(upper, dtype=x.dtype, device=x.device)

        def clamp_hook(module, inputs, output):
            shape = (1, -1) + (1,) * (output.dim() - 2)
            return torch.clamp(output, min=lo.to(output.dtype).view(shape),
                               max=hi.to(output.dtype).view(shape))

        handle = bn.register_forward_hook(clamp_hook)
        try:
            with torch.no_grad():
                logits = model(x)
        finally:
            handle.remove()
        if not bool(torch.isfinite(logits).all()):
            from ..errors import NumericalError

            raise NumericalError("logits of the BATS model pass contain non-finite values")
        return torch.logsumexp(logits.double(), dim=1)
