"""Per-sample gradient engine.

``GradientEngine(model, params, loss, temperature, strategy, chunk_size)`` returns, for a
batch x, the N×P matrix whose row n is ∇_θ ℓ(f(x_n; θ)) flattened over the selected
parameters θ (``select_params`` order, each parameter row-major). BatchNorm runs in eval
mode (running statistics), so samples do not interact and every row is the gradient of
that sample alone. Work proceeds in chunks of ``chunk_size`` samples, so memory is bounded
by the chunk, never by the data set; ``iter_chunks`` streams (rows, gradients) pairs.

Strategies (interchangeable; all exact up to floating-point rounding):

- ``closed_form`` — the selection is (part of) the last linear layer f = W h + b:
  ∂ℓ/∂W = δ hᵀ and ∂ℓ/∂b = δ with δ = ∂ℓ/∂f (``losses.logit_grad``); one batched forward
  of the features, no autograd (GradNorm eq. 8–9; Igoe et al. appendix B).
- ``vmap``   — ``torch.func.vmap(grad(ℓ ∘ functional_call))`` over the chunk.
- ``hooks``  — one batched forward/backward and per-layer outer products (``hooks.py``).
- ``loop``   — one forward/backward per sample: the reference implementations' way.

``auto`` chooses per device and selection:

1. closed_form when only head parameters are selected and the model exposes
   ``forward_features`` and ``head`` (the gradspace model API);
2. on CUDA, vmap;
3. on CPU, for selections of at most ``CPU_BATCHED_MAX_PARAMS`` parameters: hooks when
   every selected layer has a per-sample rule (Linear, Conv2d, BatchNorm), else vmap;
   for larger selections: loop.
   Measured with benchmarks/bench_grads.py on 2 shared CPU cores (load 4–6), torch 2.14,
   all-parameter energy gradients, demo CNN (94k parameters): hooks 41–100 samples/s,
   vmap 34–47/s, naive batch-size-1 loop 11–14/s (two runs) — batching wins 3–7× on small
   networks (the issue's idle-machine run: vmap 2.1k/s vs naive 1.3k/s). CIFAR ResNet-18
   (11.2M): the issue measured naive loop 21/s, hooks 8/s, vmap 5/s on an idle machine;
   our loaded runs put all strategies within noise of the naive loop. vmap's batched
   convolution-weight gradients become grouped convolutions, and hooks materialize
   unfold(a) (N×Cin·k²×L) per layer — both costly once layers are wide and maps large —
   so past a few million parameters the per-sample loop, which calls the ordinary
   well-tuned kernels, is the safe choice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..errors import ConfigError, NumericalError
from . import losses
from .hooks import HookUnsupported, hook_gradients, plan_hooks
from .params import find_head, is_head_only, select_params

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "closed_form", "vmap", "hooks", "loop")
PRECISIONS = ("fp32", "bf16", "tf32")
CPU_BATCHED_MAX_PARAMS = 2_000_000


class GradientEngine:
    """Per-sample gradients of a per-sample loss for a parameter selection.

    Parameters
    ----------
    model: an ``nn.Module`` mapping x (N×…) to logits (N×C); put in eval mode.
    params: selection spec for ``select_params`` ("last", "last_weight", "all", [stages]).
    loss: one of ``losses.LOSSES``.
    temperature: T of the loss.
    strategy: "auto" | "closed_form" | "vmap" | "hooks" | "loop".
    chunk_size: samples per vectorized step (bounds memory: chunk_size × P floats).
    precision: "fp32" (default) | "bf16" (autocast) | "tf32" (TF32 matmuls); the latter
        two on CUDA only.
    """

    def __init__(self, model: nn.Module, params="all", loss: str = "energy",
                 temperature: float = 1.0, strategy: str = "auto", chunk_size: int = 64,
                 precision: str = "fp32"):
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown gradient strategy '{strategy}'; known: {', '.join(STRATEGIES)}")
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision '{precision}'; known: {', '.join(PRECISIONS)}")
        if int(chunk_size) < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        if float(temperature) <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.model = model.eval()
        self.loss = losses.check_loss(loss)
        self.temperature = float(temperature)
        self.chunk_size = int(chunk_size)
        self.precision = precision
        self.selected = select_params(model, params)
        self.param_names = list(self.selected)
        self.param_shapes = [tuple(p.shape) for p in self.selected.values()]
        self.num_params = sum(p.numel() for p in self.selected.values())
        first = next(iter(self.selected.values()))
        self.device = first.device
        if precision != "fp32" and self.device.type != "cuda":
            raise ConfigError(f"precision '{precision}' needs a CUDA device (model is on {self.device})")
        self.strategy_requested = strategy
        self.strategy_used = self._choose(strategy)
        self._hook_plan = plan_hooks(model, self.selected) if self.strategy_used == "hooks" else None
        log.info("gradient engine: %d parameters (%s), loss %s, strategy %s on %s",
                 self.num_params, params, self.loss, self.strategy_used, self.device)

    # -- strategy ------------------------------------------------------------------
    def _closed_form_ok(self) -> bool:
        return (is_head_only(self.model, self.selected)
                and callable(getattr(self.model, "forward_features", None))
                and isinstance(getattr(self.model, "head", None), nn.Linear))

    def _choose(self, strategy: str) -> str:
        if strategy == "closed_form":
            if not self._closed_form_ok():
                raise ConfigError("strategy 'closed_form' needs a head-only parameter selection "
                                  "('last' or 'last_weight') and a model with forward_features "
                                  "and an nn.Linear head")
            return strategy
        if strategy == "hooks":
            plan_hooks(self.model, self.selected)  # raises HookUnsupported with the culprit
            return strategy
        if strategy != "auto":
            return strategy
        if self._closed_form_ok():
            return "closed_form"
        if self.device.type == "cuda":
            return "vmap"
        if self.num_params > CPU_BATCHED_MAX_PARAMS:
            return "loop"
        try:
            plan_hooks(self.model, self.selected)
            return "hooks"
        except HookUnsupported:
            return "vmap"

    # -- public API ------------------------------------------------------------------
    def batch(self, x: torch.Tensor, target: torch.Tensor | None = None,
              return_logits: bool = False):
        """Per-sample gradients N×P (and the logits N×C when ``return_logits``)."""
        if target is None and self.loss in losses.NEEDS_TARGET:
            raise ConfigError(f"gradient loss '{self.loss}' needs per-sample target labels")
        grads, logits = [], []
        for start in range(0, x.shape[0], self.chunk_size):
            stop = start + self.chunk_size
            t = None if target is None else target[start:stop]
            g, lg = self._chunk(x[start:stop], t)
            self._check_finite(g, start)
            grads.append(g)
            logits.append(lg)
        if len(grads) == 1:  # one chunk: no copy
            g, lg = grads[0], logits[0]
        else:
            g = torch.cat(grads) if grads else torch.zeros(0, self.num_params, device=self.device)
            lg = torch.cat(logits) if logits else None
        if return_logits:
            return g, lg
        return g

    def iter_chunks(self, batches: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream ``(rows, gradients)`` chunks of at most ``chunk_size`` samples.

        ``batches`` yields tensors x, or tuples ``(x, y, rows)`` (``data.loader.iter_batches``)
        / ``(x, rows)``; bare tensors get consecutive row numbers."""
        offset = 0
        for b in batches:
            if isinstance(b, tuple | list):
                x = b[0]
                rows = torch.as_tensor(b[-1]) if len(b) >= 2 else None
            else:
                x, rows = b, None
            if rows is None:
                rows = torch.arange(offset, offset + x.shape[0])
            offset += x.shape[0]
            for start in range(0, x.shape[0], self.chunk_size):
                stop = start + self.chunk_size
                g, _ = self._chunk(x[start:stop], None)
                self._check_finite(g, start, rows[start:stop])
                yield rows[start:stop], g

    # -- internals -------------------------------------------------------------------
    def _check_finite(self, g: torch.Tensor, start: int, rows=None) -> None:
        # One reduction finds any NaN/inf (they propagate into the sum); only then is the
        # element-wise check run, to name the sample and parameter (a sum that overflows
        # from finite values passes it).
        if bool(torch.isfinite(g.sum())):
            return
        bad = ~torch.isfinite(g)
        if bool(bad.any()):
            n, j = (int(v) for v in torch.nonzero(bad)[0])
            row = int(rows[n]) if rows is not None else start + n
            name = self._param_of_column(j)
            raise NumericalError(f"per-sample gradient ({self.loss}) is not finite for sample {row}, "
                                 f"parameter '{name}' ({int(bad.sum())} non-finite entries in chunk)")

    def _param_of_column(self, j: int) -> str:
        for name, p in self.selected.items():
            if j < p.numel():
                return name
            j -= p.numel()
        return "?"

    @contextlib.contextmanager
    def _precision(self):
        if self.precision == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        elif self.precision == "tf32":
            old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            try:
                yield
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        else:
            yield

    @contextlib.contextmanager
    def _requires_grad(self):
        old = [p.requires_grad for p in self.selected.values()]
        for p in self.selected.values():
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p, r in zip(self.selected.values(), old, strict=True):
                p.requires_grad_(r)

    def _loss(self, logits, target):
        return losses.loss_value(self.loss, _full(logits), self.temperature, target)

    def _flatten(self, per_param: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        return torch.cat([_full(per_param[k]).reshape(n, -1) for k in self.param_names], dim=1)

    def _chunk(self, x: torch.Tensor, target):
        x = x.to(self.device, non_blocking=True)
        if target is not None:
            target = target.to(self.device)
        with self._precision():
            fn = getattr(self, f"_chunk_{self.strategy_used}")
            return fn(x, target)

    def _chunk_closed_form(self, x, target):
        _, head = find_head(self.model)
        with torch.no_grad():
            h = _full(self.model.forward_features(x).flatten(1))
            logits = torch.nn.functional.linear(h, head.weight.to(h.dtype),
                                                None if head.bias is None else head.bias.to(h.dtype))
            delta = losses.logit_grad(self.loss, logits, self.temperature, target)  # N×C
        per = {}
        for name, p in self.selected.items():
            per[name] = delta[:, :, None] * h[:, None, :] if p is head.weight else delta
        return self._flatten(per, x.shape[0]), logits

    def _chunk_vmap(self, x, target):
        from torch.func import functional_call, grad, vmap

        model = self.model
        sel = {k: v.detach() for k, v in self.selected.items()}
        sel_ids = {id(v) for v in self.selected.values()}
        frozen = {k: v.detach() for k, v in model.named_parameters() if id(v) not in sel_ids}
        frozen.update(dict(model.named_buffers()))
        if target is None:
            target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

        def per_sample(params, xi, ti):
            out = functional_call(model, {**frozen, **params}, (xi.unsqueeze(0),))
            return self._loss(out, ti.unsqueeze(0)).sum(), out.squeeze(0).detach()

        g, logits = vmap(grad(per_sample, has_aux=True), in_dims=(None, 0, 0))(sel, x, target)
        return self._flatten(g, x.shape[0]), _full(logits)

    def _chunk_hooks(self, x, target):
        with self._requires_grad():
            per, logits = hook_gradients(self.model, self._hook_plan, x,
                                         lambda lg: self._loss(lg, target))
        return self._flatten(per, x.shape[0]), _full(logits)

    def _chunk_loop(self, x, target):
        params = list(self.selected.values())
        n = x.shape[0]
        if n == 0:
            return torch.zeros(0, self.num_params, device=self.device), torch.zeros(0, 0)
        # written in place, one copy per parameter gradient (no per-sample cat + stack)
        dtype = params[0].dtype if params[0].dtype in (torch.float32, torch.float64) else torch.float32
        grads = torch.empty(n, self.num_params, device=self.device, dtype=dtype)
        logits = []
        with self._requires_grad(), torch.enable_grad():
            for i in range(n):
                out = self.model(x[i:i + 1])
                t = None if target is None else target[i:i + 1]
                gs = torch.autograd.grad(self._loss(out, t).sum(), params, allow_unused=True)
                off = 0
                for gi, p in zip(gs, params, strict=True):
                    k = p.numel()
                    if gi is None:
                        grads[i, off:off + k].zero_()
                    else:
                        grads[i, off:off + k].copy_(gi.reshape(-1))
                    off += k
                logits.append(_full(out.detach()))
        return grads, torch.cat(logits)


def _full(t: torch.Tensor) -> torch.Tensor:
    """Half-precision results (bf16 autocast) are returned in fp32; fp32/fp64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


__all__ = ["GradientEngine", "HookUnsupported", "STRATEGIES"]
