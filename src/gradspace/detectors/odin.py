"""ODIN: temperature scaling plus input preprocessing.

Liang, Li & Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection
in Neural Networks", ICLR 2018.

    x~   = x - eps * sign(-grad_x log S_yhat(x; T))          (input preprocessing)
    S(x) = max_c softmax(f(x~) / T)_c

with S_c(x; T) = softmax(f(x)/T)_c and yhat = argmax_c f_c(x). Defaults are the paper's
ImageNet/CIFAR setting used by GradNorm's baselines: T = 1000, eps = 0.0014.

The network sees *normalized* images, so — like the reference implementation — the
step is applied in normalized space with eps divided per channel by the normalization
std: x~_c = x_c - (eps / std_c) * sign(...). The std comes from the compute params of
``gradspace score`` through :meth:`ODIN.set_input_normalization`; without it the step is
eps in normalized units.

Samples are independent in eval mode (BatchNorm uses running statistics), so the
gradient of the loss summed over the batch gives every sample's input gradient in one
backward pass. ``sign`` is torch.sign (0 where the gradient is exactly 0; the reference
code uses +1 there, which only matters on saturated inputs).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, NumericalError
from .base import Detector, register_detector
from .energy import positive_float


@register_detector
class ODIN(Detector):
    method = "odin"
    requires = ("model",)
    needs_model = True
    defaults = {"temperature": 1000.0, "epsilon": 0.0014}

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.hparams["temperature"] = positive_float(self.method, "temperature",
                                                     self.hparams["temperature"])
        eps = self.hparams["epsilon"]
        try:
            eps = float(eps)
        except (TypeError, ValueError):
            raise ConfigError(f"detector 'odin': 'epsilon' must be a number, got {eps!r}") from None
        if not np.isfinite(eps) or eps < 0:
            raise ConfigError(f"detector 'odin': 'epsilon' must be >= 0, got {eps!r}")
        self.hparams["epsilon"] = eps
        self.input_std: tuple[float, ...] | None = None

    def set_input_normalization(self, mean, std) -> None:
        """Record the per-channel std used to normalize inputs (eps is divided by it)."""
        if std is None:
            self.input_std = None
            return
        std = tuple(float(s) for s in np.atleast_1d(np.asarray(std, dtype=np.float64)))
        if not std or any(s <= 0 or not np.isfinite(s) for s in std):
            raise ConfigError(f"detector 'odin': normalization std must be positive, got {std}")
        self.input_std = std

    def _step_scale(self, x):
        import torch

        if self.input_std is None:
            return 1.0
        std = torch.as_tensor(self.input_std, dtype=x.dtype, device=x.device)
        channels = x.shape[1] if x.dim() >= 2 else 1
        if std.numel() == 1:
            return 1.0 / std.reshape(())
        if std.numel() != channels:
            raise ConfigError(f"detector 'odin': normalization std has {std.numel()} values, "
                              f"inputs have {channels} channels")
        return 1.0 / std.reshape((1, channels) + (1,) * (x.dim() - 2))

    def score_batch(self, model, x):
        """Max temperature-scaled softmax of the preprocessed batch (float64 tensor, N)."""
        import torch

        T = self.hparams["temperature"]
        eps = self.hparams["epsilon"]
        x = x.detach()
        if eps > 0:
            xg = x.clone().requires_grad_(True)
            with torch.enable_grad():
                logits = model(xg)
                _check_tensor("logits", logits)
                pred = logits.argmax(dim=1, keepdim=True)
                # -sum_i log S_yhat_i(x_i; T): its x-gradient is -grad_x log S per sample
                loss = -torch.log_softmax(logits / T, dim=1).gather(1, pred).sum()
                (grad,) = torch.autograd.grad(loss, xg)
            x = x - eps * torch.sign(grad) * self._step_scale(x)
        with torch.no_grad():
            logits = model(x)
        _check_tensor("logits", logits)
        return torch.softmax(logits.double() / T, dim=1).amax(dim=1)


def _check_tensor(name, t) -> None:
    import torch

    if not bool(torch.isfinite(t).all()):
        raise NumericalError(f"{name} of the model pass contain non-finite values")
