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


UNFOLD_SLICE_BYTES = 8 << 20  # unfold(a) of at most this many bytes at a time


def _per_sample(mod: nn.Module, attr: str, a: torch.Tensor, g: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample gradient n×shape of ``mod.<attr>``. Weight gradients of Linear and Conv2d
    layers are written into ``out`` when given: an n×numel tensor whose rows may be
    strided (a column block of an n×P buffer, or a workspace)."""
    n = g.shape[0]
    if isinstance(mod, nn.Linear):
        g3 = g.reshape(n, -1, g.shape[-1])
        if attr == "bias":
            return g3.sum(dim=1)
        a3 = a.reshape(n, -1, a.shape[-1]).to(g.dtype)
        if out is None:
            return torch.bmm(g3.transpose(1, 2), a3)
        return torch.bmm(g3.transpose(1, 2), a3, out=out.view(n, *mod.weight.shape))
    if isinstance(mod, nn.Conv2d):
        if attr == "bias":
            return g.sum(dim=(2, 3))
        cout = g.shape[1]
        g3 = g.reshape(n, cout, -1)
        kw = dict(kernel_size=mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                  stride=mod.stride)
        if out is None:
            cols = torch.nn.functional.unfold(a.to(g.dtype), **kw)  # n×(Cin·k·k)×L
            return torch.bmm(g3, cols.transpose(1, 2)).reshape(n, *mod.weight.shape)
        # a few samples at a time: unfold(a) (Cin·k·k×L per sample) stays small enough to
        # be recycled by the allocator instead of faulting in fresh pages
        o3 = out.view(n, cout, -1)
        per = max(1, mod.weight.numel() // cout * g3.shape[2] * g.element_size())
        step = max(1, UNFOLD_SLICE_BYTES // per)
        for s in range(0, n, step):
            cols = torch.nn.functional.unfold(a[s:s + step].to(g.dtype), **kw)
            torch.bmm(g3[s:s + step], cols.transpose(1, 2), out=o3[s:s + step])
        return o3.view(n, *mod.weight.shape)
    # BatchNorm in eval mode: an affine map per channel (dim 1)
    dims = tuple(d for d in range(g.dim()) if d not in (0, 1))
    if attr == "bias":
        return g.sum(dim=dims) if dims else g
    shape = (1, -1) + (1,) * (a.dim() - 2)
    ahat = (a.to(g.dtype) - mod.running_mean.view(shape)) / torch.sqrt(mod.running_var.view(shape) + mod.eps)
    prod = g * ahat
    return prod.sum(dim=dims) if dims else prod


def hook_gradients(model: nn.Module, plan, x: torch.Tensor, loss_fn, consume=None, dest=None):
    """Per-sample gradients of ``loss_fn(logits)`` (a per-sample loss vector) for every
    parameter in ``plan``. Returns ({param_name: n×shape tensor}, logits).

    With ``consume(param_name, n×shape tensor, bound)`` each gradient is handed over as soon
    as it is computed and not kept (the returned dict is empty; ``bound``: an upper bound of
    its entries' magnitude, NaN if the layer saw non-finite values, or None, see
    ``_entry_bound``), so at most one layer's
    per-sample gradients exist at a time. ``dest(param_name, n)`` may then name where a
    weight gradient is to be written (an n×numel tensor, rows possibly strided, or None):
    the caller's output buffer, or a workspace that ``consume`` must be done with before
    it returns."""
    if dest is not None and consume is None:
        raise ValueError("hook_gradients: dest needs a consume callback")
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
            del outs, loss
    finally:
        for h in handles:
            h.remove()
    for name, _, _ in plan:
        a, version, _out = saved[name]
        if a._version != version:
            raise HookUnsupported(f"hooks strategy: the input of module '{name}' was modified "
                                  "in place after use")
    grads: dict[str, torch.Tensor] = {}
    gouts = list(gouts)
    for i, (name, mod, attrs) in enumerate(plan):
        g, gouts[i] = gouts[i], None  # drop each layer's output gradient once used
        a, _version, out = saved.pop(name)
        if g is None:
            g = torch.zeros_like(out)
        a, g = a.detach(), g.detach()
        bound = _entry_bound(mod, a, g) if consume is not None else None
        for pname, attr in attrs:
            out = dest(pname, g.shape[0]) if dest is not None and attr == "weight" else None
            gp = _per_sample(mod, attr, a, g, out)
            if consume is None:
                grads[pname] = gp
            else:
                consume(pname, gp, bound)
        del a, out, g
    return grads, logits.detach()


def _max_abs(t: torch.Tensor) -> float:
    lo, hi = torch.aminmax(t)  # one pass, no |t| temporary; NaN propagates
    return max(abs(float(lo)), abs(float(hi)))


def _entry_bound(mod: nn.Module, a: torch.Tensor, g: torch.Tensor) -> float | None:
    """An upper bound of every entry of the layer's per-sample weight and bias gradients,
    from its input a and output gradient g alone (activation-sized, much smaller than the
    weight gradients): each entry is a sum of at most L terms g·a (bias: g) with L the
    output positions (tokens for Linear), so |entry| ≤ L·max|g|·max(|a|, 1). NaN when a
    or g holds NaN/inf; None for layers without such a rule (BatchNorm)."""
    if g.numel() == 0 or a.numel() == 0:
        return 0.0
    if isinstance(mod, nn.Linear):
        positions = g.numel() // (g.shape[0] * g.shape[-1])
    elif isinstance(mod, nn.Conv2d):
        positions = g.numel() // (g.shape[0] * g.shape[1])
    else:
        return None
    return positions * _max_abs(g) * max(_max_abs(a), 1.0)
