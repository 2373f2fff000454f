"""Per-sample gradients from layer hooks: one batched forward and one batched backward.

Forward hooks keep each hooked layer's input a and its output z; one backward of the
summed per-sample losses gives ∂ℓ_n/∂z_n for every sample at once (samples do not
interact in eval mode). The per-sample parameter gradients follow layer by layer:

- Linear  W (out×in):  ∂ℓ_n/∂W = Σ_t g_{n,t} a_{n,t}ᵀ      (t: extra token dims, if any)
- Conv2d  W:           ∂ℓ_n/∂W = g_n · unfold(a_n)ᵀ           (bmm over the L patch positions)
- BatchNorm (eval):    ∂ℓ_n/∂γ = Σ_s g_{n,s}·â_{n,s},  ∂ℓ_n/∂β = Σ_s g_{n,s},
                       â = (a − running_mean)/sqrt(running_var + eps)
- any bias:            ∂ℓ_n/∂b = Σ_{t or s} g_n

Layers of other types, grouped/dilated-with-string-padding convolutions, BatchNorm
without running statistics and modules called twice in one forward are not supported:
``HookUnsupported`` is raised and the engine's "auto" strategy does not pick hooks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import ConfigError


class HookUnsupported(ConfigError):
    """The model/selection cannot use the hooks strategy."""


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def plan_hooks(model: nn.Module, selected: Mapping[str, torch.Tensor]):
    """Map every selected parameter to (module name, module, attribute).

    Returns a list of ``(module_name, module, [(param_name, attr)])``. Raises
    HookUnsupported naming the first parameter that has no per-sample rule."""
    owner: dict[int, tuple[str, nn.Module, str]] = {}
    for mname, mod in model.named_modules():
        for attr, p in mod.named_parameters(recurse=False):
            owner.setdefault(id(p), (mname, mod, attr))
    plan: dict[str, tuple[nn.Module, list]] = {}
    for pname, p in selected.items():
        mname, mod, attr = owner[id(p)]
        ok = isinstance(mod, (nn.Linear, nn.Conv2d, *_BN)) and attr in ("weight", "bias")
        if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or isinstance(mod.padding, str)
                                           or mod.padding_mode != "zeros"):
            ok = False
        if isinstance(mod, _BN) and (mod.running_mean is None or mod.training):
            ok = False
        if not ok:
            raise HookUnsupported(f"hooks strategy: no per-sample rule for parameter '{pname}' "
                                  f"({type(mod).__name__})")
        plan.setdefault(mname, (mod, []))[1].append((pname, attr))
    return [(m, mod, attrs) for m, (mod, attrs) in plan.items()]


def _per_sample(mod: nn.Module, attr: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    n = g.shape[0]
    if isinstance(mod, nn.Linear):
        g3 = g.reshape(n, -1, g.shape[-1])
        if attr == "bias":
            return g3.sum(dim=1)
        a3 = a.reshape(n, -1, a.shape[-1]).to(g.dtype)
        return torch.bmm(g3.transpose(1, 2), a3)
    if isinstance(mod, nn.Conv2d):
        if attr == "bias":
            return g.sum(dim=(2, 3))
        cols = torch.nn.functional.unfold(a.to(g.dtype), mod.kernel_size, dilation=mod.dilation,
                                          padding=mod.padding, stride=mod.stride)  # n×(Cin·k·k)×L
        gw = torch.bmm(g.reshape(n, g.shape[1], -1), cols.transpose(1, 2))
        return gw.reshape(n, *mod.weight.shape)
    # BatchNorm in eval mode: an affine map per channel (dim 1)
    dims = tuple(d for d in range(g.dim()) if d not in (0, 1))
    if attr == "bias":
        return g.sum(dim=dims) if dims else g
    shape = (1, -1) + (1,) * (a.dim() - 2)
    ahat = (a.to(g.dtype) - mod.running_mean.view(shape)) / torch.sqrt(mod.running_var.view(shape) + mod.eps)
    prod = g * ahat
    return prod.sum(dim=dims) if dims else prod


def hook_gradients(model: nn.Module, plan, x: torch.Tensor, loss_fn):
    """Per-sample gradients of ``loss_fn(logits)`` (a per-sample loss vector) for every
    parameter in ``plan``. Returns ({param_name: n×shape tensor}, logits)."""
    saved: dict[str, tuple] = {}
    handles = []

    def make_hook(name):
        def hook(mod, inputs, output):
            if name in saved:
                raise HookUnsupported(f"hooks strategy: module '{name}' is called more than once "
                                      "per forward pass")
            a = inputs[0]
            saved[name] = (a, a._version, output)
            # Hand a copy downstream so that later in-place ops (ReLU(inplace=True),
            # residual '+=') cannot rewrite the tensor we differentiate against.
            return output.clone()
        return hook

    try:
        for name, mod, _ in plan:
            handles.append(mod.register_forward_hook(make_hook(name)))
        with torch.enable_grad():
            logits = model(x)
            loss = loss_fn(logits).sum()
            outs = [saved[name][2] for name, _, _ in plan]
            gouts = torch.autograd.grad(loss, outs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    grads: dict[str, torch.Tensor] = {}
    for (name, mod, attrs), g in zip(plan, gouts, strict=True):
        a, version, out = saved[name]
        if a._version != version:
            raise HookUnsupported(f"hooks strategy: the input of module '{name}' was modified "
                                  "in place after use")
        if g is None:
            g = torch.zeros_like(out)
        for pname, attr in attrs:
            grads[pname] = _per_sample(mod, attr, a.detach(), g.detach())
    return grads, logits.detach()
