"""Projection of per-sample normalized gradients onto a subspace (paper Alg. 1):

    G_low(x) = G(x) V = Σ_b G_b(x) V_b   (N×K per shard, parameter blocks summed).

A job projects one (subspace, dataset, shard) over all blocks, or over a subset of blocks
(``blocks``; in the workflow one group of ``subspace.block_jobs``) when V is too large for
one device; ``merge_parts`` sums the block parts (``project-merge``).
The store holds ``reduced`` (N×K float32), ``labels``, ``index`` and ``gnorm2`` = ‖G(x)‖²
restricted to the projected blocks (``persample`` only; NaN for ``jvp_vjp``), from which
the reconstruction error ‖G − G V Vᵀ‖/‖G‖ = (1 − ‖G V‖²/‖G‖²)^½ of an orthonormal V follows
without another gradient pass. In-job timers (CUDA-synchronized) split the time into
``gradient`` (per-sample backward) and ``projection`` (normalization and G·V), the
columns of the paper's Table 12.
"""

from __future__ import annotations

import numpy as np

from ..errors import StoreError
from ..store import ShardWriter, open_store

REDUCED_KIND = "reduced"


def project_batches(op, batches, V: dict, timer, device=None):
    """Yield (rows, labels, reduced N×K, gnorm2 N) per batch."""
    import torch

    from .operators import PerSampleOperator

    for x, y, rows in batches:
        x = x.to(op.device)
        if isinstance(op, PerSampleOperator):
            # one engine chunk at a time (never the loader batch's N x P gradients at once)
            step = op.engine.chunk_len()
            reds, gns = [], []
            for start in range(0, x.shape[0], step):
                with timer("gradient", device):
                    g = op.engine.batch(x[start:start + step], reuse_buffer=True)  # consumed here
                with timer("projection", device):
                    g = g.to(op.device, torch.float32)
                    red, gn = 0.0, 0.0
                    for b, Vb in V.items():
                        m, s = op.norm(b)
                        Gb = (op.local.take(g, b) - m) * s
                        red = red + Gb @ Vb
                        gn = gn + (Gb.double() ** 2).sum(1)
                    reds.append(red.cpu().numpy())
                    gns.append(gn.cpu().numpy())
            red, gn = np.concatenate(reds), np.concatenate(gns)
        else:
            with timer("projection", device):
                red = op.gv(x, V).cpu().numpy()
            gn = np.full(x.shape[0], np.nan)
        yield (np.asarray(rows), np.asarray(torch.as_tensor(y).cpu()), red, gn)


def write_reduced(path, n_rows: int, K: int, batches_out, attrs: dict, timer=None,
                  layout: dict | None = None) -> None:
    """Write a reduced-gradient shard store; ``timer`` totals go to attrs["timing"]["seconds"];
    ``layout`` is the shard's layout record (``data.manifest.shard_layout``)."""
    with ShardWriter(path, n_rows=n_rows, attrs={"kind": REDUCED_KIND, **attrs}, layout=layout) as w:
        w.create("reduced", (n_rows, K), "float32")
        w.create("labels", (n_rows,), "int64")
        w.create("index", (n_rows,), "int64")
        w.create("gnorm2", (n_rows,), "float64")
        start = 0
        for rows, labels, red, gn in batches_out:
            if not np.isfinite(red).all():
                bad = int(np.argwhere(~np.isfinite(red))[0][0])
                raise StoreError(f"{path}: non-finite reduced gradient for sample index {int(rows[bad])}")
            w.write("reduced", start, red.astype(np.float32))
            w.write("labels", start, labels.astype(np.int64))
            w.write("index", start, rows.astype(np.int64))
            w.write("gnorm2", start, gn.astype(np.float64))
            start += red.shape[0]
        if start != n_rows:
            raise StoreError(f"{path}: projected {start} samples, the shard has {n_rows}")
        if timer is not None:
            w.attrs["timing"] = {**dict(w.attrs.get("timing", {})), "seconds": dict(timer.totals)}


def merge_parts(part_paths, out_path, all_blocks) -> dict:
    """Sum block-part reduced stores of one (subspace, dataset, shard)."""
    groups = [open_store(p, require=("reduced", "labels", "index", "gnorm2")) for p in part_paths]
    attrs = [dict(g.attrs) for g in groups]
    covered = sorted(b for a in attrs for b in a["blocks"])
    if covered != sorted(all_blocks):
        raise StoreError(f"reduced parts {list(map(str, part_paths))} cover blocks {covered}, "
                         f"expected each of {sorted(all_blocks)} once")
    n = groups[0]["reduced"].shape[0]
    for p, g in zip(part_paths, groups, strict=True):
        if g["reduced"].shape != groups[0]["reduced"].shape or not np.array_equal(
                g["index"][...], groups[0]["index"][...]):
            raise StoreError(f"{p}: rows or shape differ from {part_paths[0]}")
    timing = {}
    for a in attrs:
        for k, v in a.get("timing", {}).get("seconds", {}).items():
            timing[k] = timing.get(k, 0.0) + v
    meta = {k: v for k, v in attrs[0].items() if k not in ("gradspace", "blocks", "timing")}
    meta["blocks"] = list(all_blocks)
    meta["timing"] = {**attrs[0].get("timing", {}), "seconds": timing}
    with ShardWriter(out_path, n_rows=n, attrs=meta) as w:
        w.put("reduced", sum(np.asarray(g["reduced"][...], np.float64) for g in groups).astype(np.float32))
        w.put("gnorm2", sum(np.asarray(g["gnorm2"][...]) for g in groups))
        w.put("labels", np.asarray(groups[0]["labels"][...]))
        w.put("index", np.asarray(groups[0]["index"][...]))
    return meta
