"""Normalization statistics of the energy gradient (low-dimensional gradient paper, §3.2).

With E(x) = −T·logsumexp(f(x)/T) (eq. 1) and g(x) = ∇θE(x) ∈ R^P over the ID-train set:

    M = E[g]                   (mean),
    diag(I) = E[(g − M)²]      (the "variance matrix" of §3.2, its diagonal),
    G(x) = diag(I)^(-1/2) (g(x) − M).

Each ID-train shard contributes partial sums (count, Σg, Σg²) in float64; one reduce rule
adds them and forms M and the scale s = diag(I)^(-1/2). Options (``subspace.normalize``):

- ``mean: false`` drops the centring (m = 0);
- ``scale``: ``variance`` (default, the paper's: diag(I) = E[g²] − M², the centred variance
  the authors' code computes as the mean of (∇E − M)² and the paper calls "the mean and
  variance matrix"; formed here from the float64 sums and clipped at 0, equal to the
  two-pass mean of (g − M)² up to float64 cancellation), ``second_moment`` (diag(I) = E[g²],
  uncentred; an alternative), or
  ``none`` (s = 1; the paper's choice for MobileNet-v2/DenseNet-121, whose diag(I) had
  many zero entries that made G infinite);
- dead parameters (diag(I) = 0 exactly, e.g. a gradient that is zero on every sample)
  get the largest finite scale of the other parameters, as the authors' code does (it
  replaces the infinite entries of 1/√I by the largest finite one); G is then 0 there
  with the centring, and a scale of the same order as the live ones without it. Only
  when every entry is zero is that an error;
- ``var_floor``: live entries (diag(I) > 0) below ``var_floor``·mean(diag(I)) are raised to
  it, so a near-dead parameter cannot get an unbounded scale (default 1e-8 of the mean,
  which leaves ordinary variances alone; 0 disables it). The floor applies before the
  dead entries take the largest scale, so that largest scale is at most
  (var_floor·mean(diag(I)))^(-1/2).

NaN or inf in a partial sum or in the resulting M and s raise NumericalError naming the
parameter and element. The stats also record tr(C)/N = Σ_p s_p² E[(g_p − m_p)²], the
total variance of G, from which the captured-variance diagnostics of the PCA follow
without another pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DataError, NumericalError, StoreError
from ..params import merge_params, schema_default
from ..store import ShardWriter, open_store
from .io import json_scalar, load_npz, read_json_scalar, save_npz
from .layout import ParamLayout

SCALES = ("variance", "second_moment", "none")
# subspace.normalize's defaults, read from the config schema
DEFAULT_NORMALIZE = {k: schema_default(f"subspace.normalize.{k}") for k in ("mean", "scale", "var_floor")}


def normalize_options(opts: dict | None) -> dict:
    opts = merge_params(opts, DEFAULT_NORMALIZE, "subspace.normalize")
    if opts["scale"] not in SCALES:
        raise ConfigError(f"subspace.normalize.scale must be one of {SCALES}, got {opts['scale']!r}")
    if float(opts["var_floor"]) < 0:
        raise ConfigError("subspace.normalize.var_floor must be >= 0")
    opts["mean"] = bool(opts["mean"])
    opts["var_floor"] = float(opts["var_floor"])
    return opts


@dataclass
class GradStats:
    """m (P), s (P) such that G = s ⊙ (g − m), in the flat engine order of ``layout``."""

    layout: ParamLayout
    mean: np.ndarray          # m: M, or zeros when the centring is dropped
    scale: np.ndarray         # s: diag(I)^(-1/2) after the floor, or ones
    count: int
    total_variance: float     # tr(C)/N = E‖G‖²
    options: dict
    selection: object = "all"  # parameter selection spec of the gradients
    temperature: float = 1.0   # T of the energy

    def block(self, block: str, device=None, dtype=None):
        """(m_b, s_b) as torch tensors for one parameter block."""
        import torch

        dtype = dtype or torch.float32
        m = torch.as_tensor(np.ascontiguousarray(self.layout.take(self.mean, block)), dtype=dtype,
                            device=device)
        s = torch.as_tensor(np.ascontiguousarray(self.layout.take(self.scale, block)), dtype=dtype,
                            device=device)
        return m, s

    def full(self, device=None, dtype=None):
        import torch

        dtype = dtype or torch.float32
        return (torch.as_tensor(self.mean, dtype=dtype, device=device),
                torch.as_tensor(self.scale, dtype=dtype, device=device))


# -- partial sums -------------------------------------------------------------------------

def accumulate_moments(engine, batches, layout: ParamLayout, device=None, timer=None):
    """Σg, Σg² (float64) and the count over ``batches`` of (x, ...) with per-sample
    gradients from the engine, one gradient chunk (``engine.chunk_len()`` samples, at most
    its 1 GiB workspace) at a time: memory is bounded by the chunk, not the loader batch
    (a 256-image batch of ResNet-50 gradients would be 26 GB, and 52 GB more in float64)."""
    import contextlib

    import torch

    P = layout.num_params
    s1 = torch.zeros(P, dtype=torch.float64, device=device)
    s2 = torch.zeros(P, dtype=torch.float64, device=device)
    n = 0
    for j, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or not len(batch) or not hasattr(batch[0], "shape"):
            raise DataError(f"gradient statistics: batch {j} is not an (x, ...) tuple of tensors")
        chunks = engine.iter_chunks([batch[0]], reuse_buffer=True)  # valid until the next chunk
        while True:
            with timer("gradient", device) if timer is not None else contextlib.nullcontext():
                _, g = next(chunks, (None, None))
            if g is None:
                break
            if g.shape[1] != P:
                raise ConfigError(f"gradient engine returned {g.shape[1]} columns, layout has {P} parameters")
            g = g.to(torch.float64)
            s1 += g.sum(0)
            s2 += g.square_().sum(0)
            n += g.shape[0]
    return {"count": np.int64(n), "sum": s1.cpu().numpy(), "sumsq": s2.cpu().numpy()}


def save_partial(path, sums: dict, layout: ParamLayout, meta: dict | None = None) -> None:
    layout.check_finite("gradient partial sum Σ∇E", sums["sum"], str(path))
    layout.check_finite("gradient partial sum Σ(∇E)²", sums["sumsq"], str(path))
    save_npz(path, count=np.int64(sums["count"]), sum=sums["sum"], sumsq=sums["sumsq"],
             layout=json_scalar(layout.to_dict()), meta=json_scalar(dict(meta or {})))


def load_partial(path) -> tuple[dict, ParamLayout, dict]:
    z = load_npz(path, require=("count", "sum", "sumsq", "layout"))
    layout = ParamLayout.from_dict(read_json_scalar(z["layout"]))
    if z["sum"].shape != (layout.num_params,) or z["sumsq"].shape != (layout.num_params,):
        raise StoreError(f"{path}: partial sums have shape {z['sum'].shape}, layout has "
                         f"{layout.num_params} parameters")
    meta = read_json_scalar(z["meta"]) if "meta" in z else {}
    return z, layout, meta


# -- reduce -------------------------------------------------------------------------------

def inverse_sqrt_scale(d: np.ndarray, var_floor: float, layout: ParamLayout, where: str = "") -> np.ndarray:
    """s = diag(I)^(-1/2) with the floor for live entries and the largest finite scale for
    dead (zero) ones (module docstring)."""
    live = d > 0
    if not live.any():
        raise NumericalError(
            f"diag(I) is zero for all {d.size} parameters{' in ' + where if where else ''} "
            f"(first {layout.locate_flat(0)}): every gradient is constant, "
            "G = diag(I)^(-1/2)(∇E − M) has no finite scale; use subspace.normalize.scale: none")
    floor = float(var_floor) * float(d.mean())
    scale = np.empty_like(d)
    scale[live] = 1.0 / np.sqrt(np.maximum(d[live], floor))
    scale[~live] = scale[live].max()
    layout.check_finite("normalization scale diag(I)^(-1/2)", scale, where)
    return scale


def reduce_moments(parts, layout: ParamLayout, options: dict | None = None, where: str = "") -> GradStats:
    """Sum partial (count, Σg, Σg²) and form m, s (see the module docstring)."""
    opts = normalize_options(options)
    n = int(sum(int(p["count"]) for p in parts))
    if n == 0:
        raise StoreError(f"gradient statistics{' from ' + where if where else ''}: no samples")
    s1 = np.zeros(layout.num_params)
    s2 = np.zeros(layout.num_params)
    for p in parts:
        s1 += p["sum"]
        s2 += p["sumsq"]
    mean = s1 / n
    second = s2 / n
    layout.check_finite("gradient mean M", mean, where)
    layout.check_finite("gradient second moment diag(I)", second, where)
    var = np.maximum(second - mean * mean, 0.0)
    m = mean if opts["mean"] else np.zeros_like(mean)
    centred = var if opts["mean"] else second  # E[(g − m)²]
    if opts["scale"] == "none":
        scale = np.ones_like(mean)
    else:
        d = second if opts["scale"] == "second_moment" else var
        scale = inverse_sqrt_scale(d, opts["var_floor"], layout, where)
    total = float(np.sum(centred * scale * scale))
    return GradStats(layout, m, scale, n, total, opts)


def write_stats(path, stats: GradStats, extra_attrs: dict | None = None) -> None:
    P = stats.layout.num_params
    attrs = {"kind": "gradstats", "layout": stats.layout.to_dict(), "count": stats.count,
             "selection": stats.selection, "temperature": stats.temperature,
             "total_variance": stats.total_variance, "normalize": stats.options, **dict(extra_attrs or {})}
    with ShardWriter(path, n_rows=P, attrs=attrs, chunk_rows=1 << 20) as w:
        # uncompressed (CRC-32C only), like the bases and partials: 16 bytes per parameter
        w.put("mean", stats.mean.astype(np.float64), compress=False)
        w.put("scale", stats.scale.astype(np.float64), compress=False)


def read_stats(path) -> GradStats:
    group = open_store(path, require=("mean", "scale"))
    attrs = dict(group.attrs)
    if attrs.get("kind") != "gradstats":
        raise StoreError(f"{path}: not a gradient statistics store (kind '{attrs.get('kind')}')")
    layout = ParamLayout.from_dict(attrs["layout"])
    return GradStats(layout, np.asarray(group["mean"][...]), np.asarray(group["scale"][...]),
                     int(attrs["count"]), float(attrs["total_variance"]), dict(attrs["normalize"]),
                     attrs.get("selection", "all"), float(attrs.get("temperature", 1.0)))
