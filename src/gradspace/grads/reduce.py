"""Per-sample reductions of gradients, computed parameter tensor by parameter tensor.

Consumers that need only norms of the per-sample gradients (GradNorm, ExGrad and the other
deep gradient-norm scores of ``gradspace grad-scores``) never need the N×P matrix: the
engine (``GradientEngine.reduce`` / ``iter_reduced``) hands each parameter tensor's
per-sample gradient to a ``NormReducer`` as soon as it exists and keeps only N×T
numbers per power (T = number of parameter tensors, e.g. 62 for ResNet-18).

For every power p of the reducer, every parameter tensor t and sample n the result holds

- p finite > 0:  S_p[n, t] = Σ_i |g_{n,t,i}|^p     (the p-th power of the L_p norm);
- p = 0:         S_0[n, t] = #{i : g_{n,t,i} ≠ 0};
- p = inf:       S_∞[n, t] = max_i |g_{n,t,i}|,

optionally of shifted gradients g + c (``shifts``: named constant vectors in the engine's
flattened layout; BatchGrad's ID reference term). ``GradReductions.norm(p, names)``
combines the tensors of any parameter set (all, one block, one parameter): sums for finite
p (then ^(1/p)), maxima for inf, so block and whole-network norms come from one pass.

Precision: the per-tensor reductions run in the gradient's dtype for p ∈ {0, 1, 2, inf}
(float64 stays float64; float32 uses PyTorch's cascade summation, relative error ~1e-7,
below the rounding of the float32 gradients themselves), and in float64 for other p
(|g|^p would underflow or overflow in float32); the results and every sum across tensors
and chunks are float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from ..errors import ConfigError

INF = float("inf")


def check_power(p) -> float:
    """A norm order: a number ≥ 0 or inf (math.inf, "inf")."""
    try:
        v = float(p)
    except (TypeError, ValueError):
        raise ConfigError(f"norm order must be a number >= 0 or inf, got {p!r}") from None
    if isinstance(p, bool) or math.isnan(v) or v < 0:
        raise ConfigError(f"norm order must be a number >= 0 or inf, got {p!r}")
    return v


def power_sums(g: torch.Tensor, powers: Sequence[float], inplace: bool = False) -> dict:
    """{p: S_p of each row of ``g`` (n×m)}: Σ|g|^p, the non-zero count (p = 0) or max|g|
    (p = inf); float64, one value per row.

    At most one temporary of g's size (|g|); none with ``inplace``, which overwrites g
    (with |g| and then g²): only for gradients the caller owns."""
    n = g.shape[0]
    if g.shape[1] == 0:
        return {p: torch.zeros(n, dtype=torch.float64, device=g.device) for p in powers}
    a = g.abs_() if inplace else g.abs()
    out = {}
    for p in powers:
        if p == 1:
            out[p] = a.sum(1)
        elif p == INF:
            out[p] = a.amax(1)
        elif p == 0:
            out[p] = torch.count_nonzero(a, dim=1)
        elif p != 2:
            out[p] = a.double().pow(p).sum(1)  # not in place: a.double() may be a itself
    if 2 in powers:
        out[2.0] = a.mul_(a).sum(1)  # a is ours (a copy, or g itself with inplace)
    return {p: out[p].double() for p in powers}


class NormReducer:
    """What to reduce: the powers p (see module docstring) and optional named shifts c
    (flat vectors in the engine's layout; the reduction of g + c is kept under that name,
    the plain gradient's under ``None``)."""

    def __init__(self, powers: Iterable = (1.0,), shifts: Mapping[str, torch.Tensor] | None = None):
        ps: list[float] = []
        for p in powers:
            v = check_power(p)
            if v not in ps:
                ps.append(v)
        if not ps:
            raise ConfigError("NormReducer: at least one power is needed")
        self.powers = tuple(ps)
        self.shifts = dict(shifts or {})
        for key in self.shifts:
            if key is None or not isinstance(key, str):
                raise ConfigError(f"NormReducer: shift names must be strings, got {key!r}")

    @property
    def keys(self) -> list[tuple[str | None, float]]:
        return [(s, p) for s in (None, *self.shifts) for p in self.powers]


class GradReductions:
    """Per-sample, per-parameter-tensor reductions of one batch or chunk.

    ``sums[(shift, p)]`` is an N×T float64 tensor (T = ``len(names)``)."""

    def __init__(self, names: Sequence[str], sums: dict):
        self.names = list(names)
        self.sums = sums

    def __len__(self) -> int:
        return next(iter(self.sums.values())).shape[0]

    def _columns(self, names) -> list[int]:
        if names is None:
            return list(range(len(self.names)))
        if isinstance(names, str):
            names = [names]
        cols = []
        for want in names:  # a parameter name or a module prefix ("layer4" -> "layer4.*")
            hit = [j for j, n in enumerate(self.names) if n == want or n.startswith(want + ".")]
            if not hit:
                raise ConfigError(f"no selected parameter named or under '{want}' "
                                  f"(parameters: {self.names[:4]}...)")
            cols.extend(j for j in hit if j not in cols)
        return cols

    def _get(self, p, shift):
        key = (shift, check_power(p))
        if key not in self.sums:
            raise ConfigError(f"reduction {key} was not computed; have {sorted(self.sums, key=str)}")
        return self.sums[key]

    def power_sum(self, p, names=None, shift: str | None = None) -> torch.Tensor:
        """Σ_t S_p[:, t] over the chosen tensors (max for p = inf): Σ|g|^p, the non-zero
        count or max|g| of the gradient restricted to those parameters (N, float64)."""
        s = self._get(p, shift)[:, self._columns(names)]
        if check_power(p) == INF:
            return s.amax(1) if s.shape[1] else torch.zeros(s.shape[0], dtype=s.dtype)
        return s.sum(1)

    def norm(self, p, names=None, shift: str | None = None) -> torch.Tensor:
        """‖g‖_p of each sample's gradient restricted to ``names`` (all when None)."""
        p = check_power(p)
        s = self.power_sum(p, names, shift)
        return s if p in (0.0, 1.0, INF) else s ** (1.0 / p)

    def block_norms(self, p, blocks: Mapping[str, Sequence[str]], shift: str | None = None) -> dict:
        """{block: ‖g_block‖_p} for blocks given as lists of parameter names / prefixes."""
        return {b: self.norm(p, names, shift) for b, names in blocks.items()}

    @staticmethod
    def cat(parts: Sequence[GradReductions]) -> GradReductions:
        if not parts:
            raise ConfigError("GradReductions.cat: nothing to concatenate")
        if len(parts) == 1:
            return parts[0]
        return GradReductions(parts[0].names, {k: torch.cat([q.sums[k] for q in parts])
                                               for k in parts[0].sums})


__all__ = ["GradReductions", "NormReducer", "check_power", "power_sums"]
