"""Per-sample gradient engine.

``GradientEngine(model, params, loss, temperature, strategy, chunk_size)`` returns, for a
batch x, the N×P matrix whose row n is ∇_θ ℓ(f(x_n; θ)) flattened over the selected
parameters θ (``select_params`` order, each parameter row-major). BatchNorm runs in eval
mode (running statistics), so samples do not interact and every row is the gradient of
that sample alone. Work proceeds in chunks of at most ``chunk_size`` samples and at most
``max_chunk_bytes`` of gradient workspace (``chunk_len``), so memory is bounded by the
chunk, never by the data set.

Two ways to consume the gradients:

- materializing — ``batch(x)`` (one N×P tensor, written chunk by chunk in place; ``out=``
  reuses a caller's buffer) and ``iter_chunks(batches)`` (streamed (rows, n×P) chunks;
  ``reuse_buffer=True`` writes every chunk into one engine-owned buffer). For consumers
  of the full vectors: the subspace stages.
- reducing — ``reduce(x, reducer)`` and ``iter_reduced(batches, reducer)`` with a
  ``reduce.NormReducer`` (powers p, incl. 0 and inf, optional constant shifts): per
  sample and parameter tensor Σ|g|^p (counts, maxima), from which ``GradReductions``
  gives L_p norms of the whole selection, of blocks or of single parameters. Each
  parameter tensor's per-sample gradient is reduced as soon as it exists and dropped, so
  the N×P matrix is never formed (loop: one sample's gradient at a time; hooks: one
  layer's n×numel, in a reused workspace). For consumers of norms only: ``grad-scores``.

Strategies (interchangeable; all exact up to floating-point rounding):

- ``closed_form`` — the selection is (part of) the last linear layer f = W h + b:
  ∂ℓ/∂W = δ hᵀ and ∂ℓ/∂b = δ with δ = ∂ℓ/∂f (``losses.logit_grad``); one batched forward
  of the features, no autograd (GradNorm eq. 8–9; Igoe et al. appendix B).
- ``vmap``   — ``torch.func.vmap(grad(ℓ ∘ functional_call))`` over the chunk.
- ``hooks``  — one batched forward/backward and per-layer outer products (``hooks.py``),
  weight gradients written into a workspace reused across layers and chunks.
- ``loop``   — one forward/backward per sample: the reference implementations' way.

``auto`` chooses per device and selection (``strategy_used``, logged at construction):

1. closed_form when only head parameters are selected and the model exposes
   ``forward_features`` and ``head`` (the gradspace model API);
2. on CUDA, vmap;
3. on CPU: hooks when every selected layer has a per-sample rule (Linear, Conv2d,
   BatchNorm), whatever the size; otherwise vmap up to ``CPU_BATCHED_MAX_PARAMS``
   parameters and the loop beyond.
   Measured with benchmarks/bench_grads.py --quick (2 shared CPU cores, 2 threads,
   torch 2.14, load average 0.9–1.8; best of 5 interleaved rounds, two runs; tables in
   benchmarks/README.md), all-parameter energy gradients reduced to L1 norms, CIFAR
   ResNet-18 (11.2M parameters), samples/s: naive batch-size-1 loop 27.3 / 28.0; hooks
   reducing 35.0 / 34.9 (1.28× / 1.25×), materializing into a reused buffer 31.7 / 30.1
   (1.16× / 1.08×), fresh N×P per ``batch()`` 23.4 / 24.7 (0.85× / 0.88×); loop reducing
   26.7 / 27.4 (0.98×); vmap 16.6 / 16.3 (0.6×). Demo CNN (103k): naive 539 / 479, hooks
   2.9× / 2.8× reducing, vmap 2.5× / 3.1×. The hooks strategy used to lose on ResNet-18
   (0.77×) through memory traffic, not arithmetic — every layer's n×numel result, the
   |g| temporaries and the flattened chunk were fresh allocations above the C
   allocator's mmap threshold, page-faulting 45 MB per sample, and the finiteness check
   read the whole chunk once more; its per-sample weight-gradient GEMMs do the work of
   the loop's batch-1 backward, and its batched forward/backward is cheaper. vmap turns
   convolution-weight gradients into grouped convolutions, slow on CPU for wide layers.
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
from .reduce import INF, GradReductions, NormReducer, power_sums

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "closed_form", "vmap", "hooks", "loop")
PRECISIONS = ("fp32", "bf16", "tf32")
CPU_BATCHED_MAX_PARAMS = 2_000_000
MAX_CHUNK_BYTES = 1 << 30  # default gradient workspace per step: 1 GiB


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
    max_chunk_bytes: byte budget of one step's gradient workspace; a step takes fewer
        than ``chunk_size`` samples when chunk_size × P floats would exceed it
        (``chunk_len``). Default 1 GiB (ResNet-18, 45 MB per sample: 23 samples).
    """

    def __init__(self, model: nn.Module, params="all", loss: str = "energy",
                 temperature: float = 1.0, strategy: str = "auto", chunk_size: int = 64,
                 precision: str = "fp32", max_chunk_bytes: int | None = None):
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown gradient strategy '{strategy}'; known: {', '.join(STRATEGIES)}")
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision '{precision}'; known: {', '.join(PRECISIONS)}")
        if int(chunk_size) < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        if float(temperature) <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        max_chunk_bytes = MAX_CHUNK_BYTES if max_chunk_bytes is None else int(max_chunk_bytes)
        if max_chunk_bytes < 1:
            raise ConfigError(f"max_chunk_bytes must be >= 1, got {max_chunk_bytes}")
        self.max_chunk_bytes = max_chunk_bytes
        self.model = model.eval()
        self.loss = losses.check_loss(loss)
        self.temperature = float(temperature)
        self.chunk_size = int(chunk_size)
        self.precision = precision
        self.selected = select_params(model, params)
        self.param_names = list(self.selected)
        self.param_shapes = [tuple(p.shape) for p in self.selected.values()]
        self.num_params = sum(p.numel() for p in self.selected.values())
        self.max_tensor_numel = max(p.numel() for p in self.selected.values())
        self._index = {name: j for j, name in enumerate(self.param_names)}
        self._offsets, off = [], 0
        for p in self.selected.values():
            self._offsets.append((off, p.numel()))
            off += p.numel()
        first = next(iter(self.selected.values()))
        self.device = first.device
        # gradients are returned in the parameters' precision (fp32 under bf16 autocast)
        self.grad_dtype = first.dtype if first.dtype in (torch.float32, torch.float64) else torch.float32
        if precision != "fp32" and self.device.type != "cuda":
            raise ConfigError(f"precision '{precision}' needs a CUDA device (model is on {self.device})")
        self.strategy_requested = strategy
        self.strategy_used = self._choose(strategy)
        self._hook_plan = plan_hooks(model, self.selected) if self.strategy_used == "hooks" else None
        self._ws = None  # hooks' reusable per-sample weight-gradient workspace
        self._buf = None  # the reuse_buffer=True gradient buffer (batch, iter_chunks)
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
        try:
            plan_hooks(self.model, self.selected)
            return "hooks"
        except HookUnsupported:
            return "vmap" if self.num_params <= CPU_BATCHED_MAX_PARAMS else "loop"

    # -- public API ------------------------------------------------------------------
    def chunk_len(self, reducing: bool = False) -> int:
        """Samples per step: ``chunk_size``, lowered so that the step's gradient workspace
        stays within ``max_chunk_bytes`` (never below one sample). The workspace is n×P
        floats when materializing, and when reducing: one parameter tensor's n×numel for
        hooks, n×P for vmap / closed form, nothing for the loop (one sample at a time)."""
        if reducing and self.strategy_used == "loop":
            return self.chunk_size
        per = self.max_tensor_numel if (reducing and self.strategy_used == "hooks") else self.num_params
        per_bytes = max(1, per * self.grad_dtype.itemsize)
        return max(1, min(self.chunk_size, self.max_chunk_bytes // per_bytes))

    def batch(self, x: torch.Tensor, target: torch.Tensor | None = None,
              return_logits: bool = False, out: torch.Tensor | None = None,
              reuse_buffer: bool = False):
        """Per-sample gradients N×P (and the logits N×C when ``return_logits``).

        The result is written chunk by chunk into one N×P tensor (no per-chunk buffers,
        no concatenation): a new one that the caller owns, or ``out`` (a contiguous
        tensor of at least N rows, P columns and the engine's ``grad_dtype``; its first
        N rows are returned), which callers can reuse from batch to batch. With
        ``reuse_buffer`` the engine's own buffer is used (grown when a batch is larger):
        no fresh pages per batch, and the result is valid only until the engine's next
        ``batch(reuse_buffer=True)`` or ``iter_chunks(reuse_buffer=True)``."""
        self._check_target(target)
        n = x.shape[0]
        if reuse_buffer and out is None:
            out = self._grad_buffer(n)
        if out is None:
            out = self._empty(n, self.num_params)
        else:
            if (out.dim() != 2 or out.shape[0] < n or out.shape[1] != self.num_params
                    or out.dtype != self.grad_dtype or not out.is_contiguous()):
                raise ConfigError(f"batch(out=...): need a contiguous {self.grad_dtype} tensor of "
                                  f"at least {n}×{self.num_params}, got {tuple(out.shape)} {out.dtype}")
            out = out[:n]
        logits = []
        step = self.chunk_len()
        for start in range(0, n, step):
            stop = min(start + step, n)
            t = None if target is None else target[start:stop]
            view = out[start:stop]
            sink = _FlatSink(view, self)
            logits.append(self._chunk(x[start:stop], t, sink))
            self._check_finite(view, start, verified=sink.verified)
        if return_logits:
            lg = torch.cat(logits) if logits else torch.zeros(0, 0, device=self.device)
            return out, lg
        return out

    def iter_chunks(self, batches: Iterable, reuse_buffer: bool = False
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream ``(rows, gradients)`` chunks of at most ``chunk_len()`` samples.

        ``batches`` yields tensors x, or tuples ``(x, y, rows)`` (``data.loader.iter_batches``)
        / ``(x, rows)``; bare tensors get consecutive row numbers. With ``reuse_buffer``
        every chunk is written into one buffer that the engine keeps (no allocation and
        no fresh pages per chunk: the large-block allocations of a per-chunk buffer are
        returned to the OS and page-fault again each time): a yielded gradient tensor is
        then valid only until this engine produces the next chunk."""
        step = self.chunk_len()
        for x, rows in self._split(batches):
            for start in range(0, x.shape[0], step):
                stop = min(start + step, x.shape[0])
                if reuse_buffer:
                    g = self._grad_buffer(step)[:stop - start]
                else:
                    g = self._empty(stop - start, self.num_params)
                sink = _FlatSink(g, self)
                self._chunk(x[start:stop], None, sink)
                self._check_finite(g, start, rows[start:stop], sink.verified)
                yield rows[start:stop], g

    def reduce(self, x: torch.Tensor, reducer: NormReducer, target: torch.Tensor | None = None,
               return_logits: bool = False):
        """Per-sample reductions (``reduce.NormReducer``: Σ|g|^p per parameter tensor,
        non-zero counts, maxima, of g or g + shift) of the gradients of a batch, without
        forming the N×P matrix: the loop and hooks strategies reduce each parameter
        tensor's gradient as it is produced; vmap and closed form reduce their chunk.
        Returns a ``GradReductions`` (and the logits when ``return_logits``)."""
        self._check_target(target)
        views = self._shift_views(reducer)
        parts, logits = [], []
        n = x.shape[0]
        step = self.chunk_len(reducing=True)
        for start in range(0, max(n, 1), step):
            stop = min(start + step, n)
            t = None if target is None else target[start:stop]
            sink = _ReduceSink(reducer, stop - start, self, views)
            if stop > start:
                logits.append(self._chunk(x[start:stop], t, sink))
            parts.append(sink.result(start))
        red = GradReductions.cat(parts)
        if return_logits:
            return red, (torch.cat(logits) if logits else torch.zeros(0, 0, device=self.device))
        return red

    def iter_reduced(self, batches: Iterable, reducer: NormReducer
                     ) -> Iterator[tuple[torch.Tensor, GradReductions]]:
        """Stream ``(rows, GradReductions)`` chunks; ``batches`` as for ``iter_chunks``."""
        views = self._shift_views(reducer)
        step = self.chunk_len(reducing=True)
        for x, rows in self._split(batches):
            for start in range(0, x.shape[0], step):
                stop = min(start + step, x.shape[0])
                sink = _ReduceSink(reducer, stop - start, self, views)
                self._chunk(x[start:stop], None, sink)
                yield rows[start:stop], sink.result(start, rows[start:stop])

    # -- internals -------------------------------------------------------------------
    def _grad_buffer(self, n: int) -> torch.Tensor:
        """The engine's reusable N×P gradient buffer, at least n rows (first n returned)."""
        if self._buf is None or self._buf.shape[0] < n:
            self._buf = None  # free the old one before allocating the larger one
            self._buf = self._empty(n, self.num_params)
        return self._buf[:n]

    def _empty(self, *shape) -> torch.Tensor:
        # (Tried: madvise(MADV_HUGEPAGE) on large fresh buffers. Filling a lone 360 MB
        # buffer got 3x faster, but batch() on ResNet-18 got 1.5-2x slower, so 4 KiB pages.)
        return torch.empty(*shape, device=self.device, dtype=self.grad_dtype)

    def _check_target(self, target) -> None:
        if target is None and self.loss in losses.NEEDS_TARGET:
            raise ConfigError(f"gradient loss '{self.loss}' needs per-sample target labels")

    @staticmethod
    def _split(batches: Iterable):
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
            yield x, rows

    def _shift_views(self, reducer: NormReducer) -> dict[str, list[torch.Tensor]]:
        views = {}
        for key, c in reducer.shifts.items():
            c = torch.as_tensor(c).to(self.device, self.grad_dtype).reshape(-1)
            if c.numel() != self.num_params:
                raise ConfigError(f"reduction shift '{key}' has {c.numel()} entries, the selection "
                                  f"has {self.num_params} parameters")
            views[key] = [c[o:o + k].reshape(1, -1) for o, k in self._offsets]
        return views

    def _check_finite(self, g: torch.Tensor, start: int, rows=None, verified=()) -> None:
        # One reduction finds any NaN/inf (they propagate into the sum); only then is the
        # element-wise check run, to name the sample and parameter (a sum that overflows
        # from finite values passes it). Parameters in ``verified`` (indices whose entries
        # a bound proved finite) are not read again.
        if not verified:
            if bool(torch.isfinite(g.sum())):
                return
        else:
            todo = [self._offsets[j] for j in range(len(self._offsets)) if j not in verified]
            if all(bool(torch.isfinite(g[:, o:o + k].sum())) for o, k in todo):
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

    def _chunk(self, x: torch.Tensor, target, sink):
        """Hand every selected parameter's per-sample gradients of the chunk to ``sink``;
        return the chunk's logits."""
        x = x.to(self.device, non_blocking=True)
        if target is not None:
            target = target.to(self.device)
        with self._precision():
            fn = getattr(self, f"_chunk_{self.strategy_used}")
            return fn(x, target, sink)

    def _chunk_closed_form(self, x, target, sink):
        _, head = find_head(self.model)
        with torch.no_grad():
            h = _full(self.model.forward_features(x).flatten(1))
            logits = torch.nn.functional.linear(h, head.weight.to(h.dtype),
                                                None if head.bias is None else head.bias.to(h.dtype))
            delta = losses.logit_grad(self.loss, logits, self.temperature, target)  # N×C
            for j, p in enumerate(self.selected.values()):
                sink.add(j, delta[:, :, None] * h[:, None, :] if p is head.weight else delta)
        return logits

    def _chunk_vmap(self, x, target, sink):
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
        for j, name in enumerate(self.param_names):
            sink.add(j, g.pop(name))
        return _full(logits)

    def _workspace(self, n: int) -> torch.Tensor:
        """A flat buffer of n × the largest selected tensor, kept and reused across chunks
        (the hooks strategy's reduction path writes each layer's per-sample weight
        gradients into it)."""
        need = n * self.max_tensor_numel
        if self._ws is None or self._ws.numel() < need:
            self._ws = None
            self._ws = self._empty(need)  # grows to the largest chunk seen, then stays
        return self._ws

    def _chunk_hooks(self, x, target, sink):
        index = self._index
        # bf16 autocast computes the products in bf16: no preallocated fp32 destinations
        dest = None if self.precision == "bf16" else (lambda name, n: sink.dest(index[name], n))
        with self._requires_grad():
            _, logits = hook_gradients(self.model, self._hook_plan, x,
                                       lambda lg: self._loss(lg, target),
                                       consume=lambda name, g, b: sink.add(index[name], g, b),
                                       dest=dest)
        return _full(logits)

    def _chunk_loop(self, x, target, sink):
        params = list(self.selected.values())
        logits = []
        with self._requires_grad(), torch.enable_grad():
            for i in range(x.shape[0]):
                out = self.model(x[i:i + 1])
                t = None if target is None else target[i:i + 1]
                gs = torch.autograd.grad(self._loss(out, t).sum(), params, allow_unused=True)
                sink.add_sample(i, gs)
                logits.append(_full(out.detach()))
                # free this sample's gradients and graph before the next forward, so that
                # the allocator reuses their memory (else two samples' worth are alive and
                # large blocks come back as fresh, page-faulting pages)
                gs = out = None
        return torch.cat(logits) if logits else torch.zeros(0, 0, device=self.device)


class _FlatSink:
    """Writes each parameter tensor's per-sample gradients into its columns of an n×P
    buffer (row-major per parameter, ``select_params`` order)."""

    def __init__(self, out: torch.Tensor, engine: GradientEngine):
        self.out = out
        self.engine = engine
        self.offsets = engine._offsets
        # parameters whose entries are proven finite by a bound (hooks): not re-read by the
        # finiteness check, which otherwise reads the whole chunk once more
        self.verified: set[int] = set()
        self._limit = torch.finfo(out.dtype).max / 4  # margin for rounding of the sums

    def dest(self, j, n):
        """Where hooks write parameter j's per-sample weight gradients: the engine's
        workspace, then copied into the columns (add). Writing the batched products
        straight into the strided column block was slower (ResNet-18, 2 CPU threads:
        21.7 vs 26.5 samples/s; fresh per-layer tensors: 20.9/s)."""
        k = self.offsets[j][1]
        return self.engine._workspace(n)[:n * k].view(n, k)

    def add(self, j, g, bound=None):
        o, k = self.offsets[j]
        self.out[:, o:o + k].copy_(g.reshape(g.shape[0], -1))
        if bound is not None and bound < self._limit:  # False for NaN
            self.verified.add(j)

    def add_sample(self, i, gs):
        """Sample i's gradients, one tensor (or None: unused) per parameter."""
        for (o, k), g in zip(self.offsets, gs, strict=True):
            if g is None:
                self.out[i, o:o + k].zero_()
            else:
                self.out[i, o:o + k].copy_(g.reshape(-1))


class _ReduceSink:
    """Reduces each parameter tensor's per-sample gradients as they arrive (``reduce``)."""

    def __init__(self, reducer: NormReducer, n: int, engine: GradientEngine, views):
        self.engine = engine
        self.views = views
        self.shifts = (None, *reducer.shifts)
        self.powers = list(reducer.powers)
        # a power that propagates NaN/inf into the sum, for the finiteness check
        for p in (INF, 1.0, *self.powers):
            if p in self.powers and p != 0:
                self.check_p = p
                break
        else:
            self.check_p = 1.0
            self.powers.append(1.0)
        T = len(engine.param_names)
        self.sums = {(s, p): torch.zeros(n, T, dtype=torch.float64, device=engine.device)
                     for s in self.shifts for p in self.powers}

    def _reduce(self, j, g2, owned=False):
        # shifted gradients first: with ``owned``, g2 itself is then overwritten by |g2|
        for s in (*self.shifts[1:], None):
            if s is None:
                sums = power_sums(g2, self.powers, inplace=owned)
            else:
                sums = power_sums(g2 + self.views[s][j], self.powers, inplace=True)
            for p, v in sums.items():
                yield (s, p), v

    def dest(self, j, n):
        """The engine's workspace: reused for every layer and chunk, overwritten here."""
        k = self.engine._offsets[j][1]
        return self.engine._workspace(n)[:n * k].view(n, k)

    def add(self, j, g, bound=None):
        g2 = _full(g).reshape(g.shape[0], -1)
        ws = self.engine._ws
        owned = ws is not None and g2.untyped_storage().data_ptr() == ws.untyped_storage().data_ptr()
        for key, v in self._reduce(j, g2, owned):
            self.sums[key][:, j] = v

    def add_sample(self, i, gs):
        """Sample i's gradients, one tensor (or None: unused) per parameter.

        Few kernels per tensor, one stack per power: |g|.sum() (PyTorch's cascade sum,
        exact to ~1e-8 in float32; ``torch._foreach_norm`` and ``linalg.vector_norm``
        accumulate float32 naively on CPU, 8e-5 relative error on a 2.4M-entry tensor)."""
        eng = self.engine
        gs = [torch.zeros(k, device=eng.device, dtype=eng.grad_dtype) if g is None else _full(g)
              for (_o, k), g in zip(eng._offsets, gs, strict=True)]
        simple = [p for p in self.powers if p in (1.0, 2.0, INF)]
        for p in simple:
            if p == 1.0:
                v = torch.stack([g.abs().sum() for g in gs])
            elif p == 2.0:
                v = torch.stack([(g * g).sum() for g in gs])
            else:
                v = torch.stack([g.abs().amax() if g.numel() else g.new_zeros(()) for g in gs])
            self.sums[(None, p)][i] = v
        rest = [p for p in self.powers if p not in simple]
        if rest or len(self.shifts) > 1:
            for j, g in enumerate(gs):
                g2 = g.reshape(1, -1)
                for s in self.shifts:
                    if s is None and not rest:
                        continue
                    gsh = g2 if s is None else g2 + self.views[s][j]
                    for p, v in power_sums(gsh, rest if s is None else self.powers,
                                           inplace=s is not None).items():
                        self.sums[(s, p)][i, j] = v[0]

    def result(self, start: int, rows=None) -> GradReductions:
        s = self.sums[(None, self.check_p)]
        if s.numel() and not bool(torch.isfinite(s).all()):
            n, t = (int(v) for v in torch.nonzero(~torch.isfinite(s))[0])
            row = int(rows[n]) if rows is not None else start + n
            raise NumericalError(f"per-sample gradient ({self.engine.loss}) is not finite for sample "
                                 f"{row}, parameter '{self.engine.param_names[t]}'")
        return GradReductions(self.engine.param_names, self.sums)


def _full(t: torch.Tensor) -> torch.Tensor:
    """Half-precision results (bf16 autocast) are returned in fp32; fp32/fp64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


__all__ = ["GradientEngine", "HookUnsupported", "STRATEGIES"]
