"""The two interchangeable operators behind the PCA power iteration, the AG subspace and the
projection (low-dimensional gradient paper, Appendix A, Alg. 3–4).

Both implement products with the normalized, centred per-sample gradient matrix of a batch,

    G = (g − m) diag(s),   g_i = ∇θE(x_i),  E = −T·logsumexp(f/T)   (N×P, never stored whole),

for one or more parameter blocks b (G = [G_b]):

    gv(x, V)       = Σ_b G_b V_b                            (N×K, Alg. 3)
    gtu(x, U, bs)  = {b: G_bᵀ U}                            (P_b×K, Alg. 4)

``jvp_vjp`` (the paper's matrix-free way). The normalization folds into the directions:
G_b v = (∇_b E)·(s_b ⊙ v) − m_bᵀ(s_b ⊙ v), so one ``torch.func.jvp`` of the batch energy
along the tangent s_b ⊙ v gives the first term for every sample at once; ``vmap`` runs the
K directions together. Gᵀu = s ⊙ (Σ_i u_i g_i − m Σ_i u_i) and Σ_i u_i g_i = ∇θ Σ_i u_i E_i
is one ``torch.func.vjp`` with cotangent u, vmapped over the K columns of U. BatchNorm runs
in eval mode so that E_i depends on x_i only.

``persample``: per-sample gradient chunks from ``gradspace.grads.GradientEngine`` (N×P),
normalized, then two matrix products G·V and Gᵀ·U.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, jvp, vjp, vmap

from ..errors import ConfigError
from .layout import ParamLayout
from .stats import GradStats

METHODS = ("jvp_vjp", "persample")


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """E(x) = −T·logsumexp(f(x)/T) (eq. 1 with temperature)."""
    return -temperature * torch.logsumexp(logits / temperature, dim=-1)


def make_engine(model, params="all", temperature: float = 1.0, chunk_size: int = 64,
                strategy: str = "auto", precision: str = "fp32"):
    """Per-sample energy-gradient engine of ``gradspace.grads``."""
    from ..grads import GradientEngine

    return GradientEngine(model, params=params, loss="energy", temperature=temperature,
                          strategy=strategy, chunk_size=chunk_size, precision=precision)


class _Base:
    method = ""

    def __init__(self, model, layout: ParamLayout, stats: GradStats | None, temperature: float = 1.0,
                 device=None):
        self.model = model.eval()
        self.layout = layout
        self.stats = stats
        self.temperature = float(temperature)
        self.device = device if device is not None else next(model.parameters()).device
        if stats is not None:
            layout.same_as(stats.layout, "gradient statistics vs. model parameter selection")
        self._ms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def norm(self, block: str):
        """(m_b, s_b) on the device; zeros/ones without statistics (raw gradients)."""
        if block not in self._ms:
            if self.stats is None:
                P = self.layout.block_size(block)
                self._ms[block] = (torch.zeros(P, device=self.device), torch.ones(P, device=self.device))
            else:
                self._ms[block] = self.stats.block(block, device=self.device)
        return self._ms[block]

    def gtgv(self, x, V: dict, blocks_out=None):
        """(U = G·V, {b: G_bᵀ U}) for one batch."""
        U = self.gv(x, V)
        return U, self.gtu(x, U, blocks_out)


class JvpVjpOperator(_Base):
    """Matrix-free products by forward- and reverse-mode AD (paper Alg. 3–4)."""

    method = "jvp_vjp"

    def __init__(self, model, layout, stats, temperature=1.0, device=None, direction_chunk: int = 1):
        super().__init__(model, layout, stats, temperature, device)
        self.direction_chunk = max(1, int(direction_chunk))
        self._params = {n: p.detach() for n, p in model.named_parameters()}
        self._buffers = {n: b.detach() for n, b in model.named_buffers()}
        missing = [n for n in layout.names if n not in self._params]
        if missing:
            raise ConfigError(f"parameters {missing[:3]} of the layout are not in the model")

    def _energy_of(self, names, x):
        params, buffers, model, T = self._params, self._buffers, self.model, self.temperature

        def f(*tensors):
            p = dict(params)
            p.update(zip(names, tensors, strict=True))
            return energy(functional_call(model, (p, buffers), (x,)), T)

        return f

    def _names(self, blocks):
        idx = [i for b in blocks for i in self.layout.block_params(b)]
        return [self.layout.names[i] for i in idx], [self.layout.shapes[i] for i in idx], \
            [self.layout.sizes[i] for i in idx]

    def gv(self, x, V: dict) -> torch.Tensor:
        blocks = list(V)
        names, shapes, sizes = self._names(blocks)
        primals = tuple(self._params[n] for n in names)
        f = self._energy_of(names, x)
        K = next(iter(V.values())).shape[1]
        out = torch.empty(x.shape[0], K, device=self.device)

        def along(*tangents):
            return jvp(f, primals, tangents)[1]

        for c0 in range(0, K, self.direction_chunk):
            c1 = min(K, c0 + self.direction_chunk)
            flat, mean_term = [], 0.0
            for b in blocks:
                m, s = self.norm(b)
                t = s[:, None] * V[b][:, c0:c1].to(self.device, torch.float32)   # P_b×k
                mean_term = mean_term + m @ t
                flat.append(t)
            flat = torch.cat(flat, 0).T.contiguous()                                # k×P
            tangents = tuple(piece.reshape((c1 - c0,) + sh)
                             for piece, sh in zip(torch.split(flat, sizes, dim=1), shapes, strict=True))
            out[:, c0:c1] = (vmap(along)(*tangents) - mean_term[:, None]).T
        return out

    def gtu(self, x, U: torch.Tensor, blocks=None) -> dict:
        blocks = self.layout.check_blocks(blocks)
        names, _, sizes = self._names(blocks)
        primals = tuple(self._params[n] for n in names)
        _, pullback = vjp(self._energy_of(names, x), *primals)
        U = U.to(self.device, torch.float32)
        K = U.shape[1]
        bsizes = [self.layout.block_size(b) for b in blocks]
        out = {b: torch.empty(P, K, device=self.device) for b, P in zip(blocks, bsizes, strict=True)}
        for c0 in range(0, K, self.direction_chunk):
            c1 = min(K, c0 + self.direction_chunk)
            grads = vmap(pullback)(U[:, c0:c1].T.contiguous())                     # k×param each
            raw = torch.cat([g.reshape(c1 - c0, -1) for g in grads], 1).T           # P×k: Σ_i u_i g_i
            usum = U[:, c0:c1].sum(0)
            for b, piece in zip(blocks, torch.split(raw, bsizes, dim=0), strict=True):
                m, s = self.norm(b)
                out[b][:, c0:c1] = s[:, None] * (piece - m[:, None] * usum[None, :])
        return out


class PerSampleOperator(_Base):
    """Explicit per-sample gradient chunks (N×P) from the gradient engine, then matmuls."""

    method = "persample"

    def __init__(self, model, layout, stats, temperature=1.0, device=None, engine=None,
                 params="all", chunk_size: int = 64, strategy: str = "auto", precision: str = "fp32",
                 blocks=None):
        super().__init__(model, layout, stats, temperature, device)
        # ``local``: the parameters this operator differentiates. A job restricted to some
        # blocks (one group of subspace.block_jobs) computes only their gradients.
        blocks = layout.check_blocks(blocks)
        self.local = layout if set(blocks) == set(layout.block_names) else layout.subset(blocks)
        if engine is None:
            sel = params if self.local is layout else {"names": self.local.names}
            engine = make_engine(model, sel, temperature, chunk_size, strategy, precision)
        self.engine = engine
        names = list(getattr(self.engine, "param_names", self.local.names))
        if names != self.local.names:
            raise ConfigError("gradient engine parameter order differs from the subspace layout "
                              f"(engine {names[:3]}..., layout {self.local.names[:3]}...)")
        self._cache = None
        self._full_ms = None

    def _local_norm(self):
        """(m, s) over the operator's own parameters, in its flat gradient order."""
        if self._full_ms is None:
            if self.local is self.layout:
                self._full_ms = self.stats.full(device=self.device)
            else:
                self._full_ms = tuple(
                    torch.as_tensor(np.ascontiguousarray(self.layout.gather(v, self.local)),
                                    dtype=torch.float32, device=self.device)
                    for v in (self.stats.mean, self.stats.scale))
        return self._full_ms

    def gradients(self, x, timer=None) -> torch.Tensor:
        """Normalized gradients G (N×P) of the samples ``x`` (the last call's are cached).

        G lives in the engine's reused buffer (no fresh pages per call): it is valid until
        the next call with other samples; copy it to keep it. It holds all N rows at once:
        the products below call it one engine chunk at a time (``chunks``)."""
        if self._cache is not None and self._cache[0] is x:
            return self._cache[1]
        if timer is not None:
            with timer("gradient", self.device):
                g = self.engine.batch(x, reuse_buffer=True)
        else:
            g = self.engine.batch(x, reuse_buffer=True)
        g = g.to(self.device, torch.float32)
        if self.stats is not None:
            m, s = self._local_norm()
            g = g.sub_(m).mul_(s) if g.is_contiguous() else (g - m) * s  # in place: g is ours
        self._cache = (x, g)
        return g

    def chunks(self, x, timer=None):
        """``(start, G_c)`` over a batch, at most the engine's chunk of samples (its
        ``chunk_len()``, bounded by ``max_chunk_bytes``) each: a loader batch's N×P
        gradients are never held at once, only one chunk's. A batch within one chunk is
        one call (and ``gradients``' cache)."""
        step = self.engine.chunk_len()
        if x.shape[0] <= step:
            yield 0, self.gradients(x, timer)
            return
        for start in range(0, x.shape[0], step):
            yield start, self.gradients(x[start:start + step], timer)

    def _gv_chunk(self, G, V: dict) -> torch.Tensor:
        out = None
        for b, Vb in V.items():
            part = self.local.take(G, b) @ Vb.to(self.device, torch.float32)
            out = part if out is None else out + part
        return out

    def gv(self, x, V: dict) -> torch.Tensor:
        parts = [self._gv_chunk(G, V) for _, G in self.chunks(x)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def gtu(self, x, U: torch.Tensor, blocks=None) -> dict:
        U = U.to(self.device, torch.float32)
        blocks = self.local.check_blocks(blocks)
        out: dict = {}
        for start, G in self.chunks(x):
            Uc = U[start:start + G.shape[0]]
            for b in blocks:
                part = self.local.take(G, b).T @ Uc
                out[b] = part if b not in out else out[b].add_(part)
        return out

    def gtgv(self, x, V: dict, blocks_out=None):
        """(U = G·V, {b: G_bᵀ U}) for one batch, each chunk's gradients computed once."""
        blocks = self.local.check_blocks(blocks_out)
        Us, out = [], {}
        for _, G in self.chunks(x):
            Uc = self._gv_chunk(G, V)
            Us.append(Uc)
            for b in blocks:
                part = self.local.take(G, b).T @ Uc
                out[b] = part if b not in out else out[b].add_(part)
        return (Us[0] if len(Us) == 1 else torch.cat(Us)), out


def make_operator(method: str, model, layout, stats, temperature=1.0, device=None, engine=None,
                  params="all", chunk_size: int = 64, direction_chunk: int = 1, strategy: str = "auto",
                  precision: str = "fp32", blocks=None):
    """``blocks``: the only blocks the caller multiplies with (``persample`` then computes
    just their gradients; ``jvp_vjp`` differentiates only the blocks of each product anyway)."""
    if method == "jvp_vjp":
        return JvpVjpOperator(model, layout, stats, temperature, device, direction_chunk)
    if method == "persample":
        return PerSampleOperator(model, layout, stats, temperature, device, engine, params, chunk_size,
                                 strategy, precision, blocks)
    raise ConfigError(f"subspace.method must be one of {METHODS}, got {method!r}")
