"""Per-sample losses on the logits f (C classes, temperature T) and their exact gradients
with respect to the logits.

With p = softmax(f/T):

- ``energy``      E(x) = −T·logsumexp(f/T)          (low-dimensional gradient paper, eq. 1);
                  ∂E/∂f = −p.
- ``kl_uniform``  KL(u ‖ p) = −(1/C)·Σ_c log p_c − log C   (GradNorm, Huang et al. 2021, eq. 3);
                  ∂/∂f = (p − u)/T with u = 1/C.
- ``ce_pred``     −log p_ŷ with ŷ = argmax f, the one-hot target of GradNorm's ablation (eq. 7);
                  ∂/∂f = (p − e_ŷ)/T.
- ``ce_label``    −(1/K)·Σ_k log p_{t_k} for given labels t (one or K per sample). Igoe et al.
                  (2022) write their scores with ∇ log p^(Y); a label Y drawn from a
                  distribution q gives one ``ce_label`` gradient per label, and the
                  expectations over q are taken over those (exactly, label by label, or
                  by Monte Carlo with K sampled labels). ∂/∂f = (p − mean_k e_{t_k})/T.
- ``ce_pred_dist`` −Σ_c p̄_c·log p_c with p̄ = p held constant: −∇E_{Y~p}[log p^(Y)]. Its
                  gradient is (p − p̄)/T, identically zero (Σ_y p_y ∇log p_y = ∇Σ_y p_y = 0);
                  kept so that Igoe's "norm of expectation under p" is computed, not assumed.

Every cross-entropy loss is CE(q, p) = −Σ_c q_c log p_c for a target distribution q
that does not depend on the parameters, hence ∂/∂f = (p − q)/T.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

LOSSES = ("energy", "kl_uniform", "ce_pred", "ce_label", "ce_pred_dist")
NEEDS_TARGET = ("ce_label",)


def check_loss(name: str) -> str:
    if name not in LOSSES:
        raise ConfigError(f"unknown gradient loss '{name}'; known: {', '.join(LOSSES)}")
    return name


def _one_hot(labels: torch.Tensor, C: int, dtype) -> torch.Tensor:
    """One-hot encoding by comparison (works under torch.func.vmap, unlike F.one_hot)."""
    return (labels.unsqueeze(-1) == torch.arange(C, device=labels.device)).to(dtype)


def _one_hot_mean(target: torch.Tensor, shape: torch.Size, dtype) -> torch.Tensor:
    """Empirical distribution of the labels ``target`` (…, or …×K) over C classes."""
    C = shape[-1]
    if target is None:
        raise ConfigError("gradient loss 'ce_label' needs target labels")
    t = target.long()
    if t.dim() == len(shape) - 1:
        t = t.unsqueeze(-1)
    return _one_hot(t, C, dtype).mean(dim=-2)


def target_distribution(name: str, logits: torch.Tensor, temperature: float = 1.0,
                        target: torch.Tensor | None = None) -> torch.Tensor | None:
    """The (constant) target distribution q of a cross-entropy loss; None for energy."""
    C = logits.shape[-1]
    if name == "energy":
        return None
    if name == "kl_uniform":
        return torch.full_like(logits, 1.0 / C)
    if name == "ce_pred":
        return _one_hot(logits.argmax(dim=-1), C, logits.dtype)
    if name == "ce_label":
        return _one_hot_mean(target, logits.shape, logits.dtype)
    if name == "ce_pred_dist":
        return torch.softmax(logits / temperature, dim=-1).detach()
    raise ConfigError(f"unknown gradient loss '{name}'; known: {', '.join(LOSSES)}")


def loss_value(name: str, logits: torch.Tensor, temperature: float = 1.0,
               target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss, shape ``logits.shape[:-1]`` (see module docstring)."""
    T = float(temperature)
    if name == "energy":
        return -T * torch.logsumexp(logits / T, dim=-1)
    q = target_distribution(name, logits, T, target).detach()
    logp = torch.log_softmax(logits / T, dim=-1)
    loss = -(q * logp).sum(dim=-1)
    if name == "kl_uniform":
        loss = loss - math.log(logits.shape[-1])
    return loss


def logit_grad(name: str, logits: torch.Tensor, temperature: float = 1.0,
               target: torch.Tensor | None = None) -> torch.Tensor:
    """Exact ∂loss/∂f, shape of ``logits``: −p for energy, (p − q)/T for CE(q, p)."""
    T = float(temperature)
    p = torch.softmax(logits / T, dim=-1)
    if name == "energy":
        return -p
    q = target_distribution(name, logits, T, target)
    return (p - q) / T
