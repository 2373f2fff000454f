"""Average-gradient (AG) subspace (low-dimensional gradient paper, eq. 4):

    μ_c = E[G(x) | y = c],  c = 1..C,   V_AG = span{μ_1, …, μ_C}.

Per ID-train shard the class sums S_c = Σ_{i: y_i = c} G_i = Gᵀ Y (Y the N×C one-hot
labels) come from one ``gtu`` product of either operator (a single vmapped vjp for
``jvp_vjp``). The reduce divides by the class counts. The stored basis is orthonormalized
by the same TSQR as the PCA (Gram–Schmidt order of the classes, diag(R) ≥ 0) so that
projections G·V are coordinates in the span and ‖G − G V Vᵀ‖ is the reconstruction error
of Table 2. Columns whose R diagonal is below 1e-6 of the largest are dropped: with the
centring by M the class means satisfy Σ_c n_c μ_c = 0, so the span has dimension C − 1
(k is the rank, recorded with C). ``orthonormalize: false`` keeps the C raw class means as V
(G·V = inner products with the class means, as the paper's eq. 4 reads literally).
The raw means are stored as well (``means.<block>``), for the
cosine-to-class-mean diagnostic (Table 13).
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError, StoreError
from .io import atomic_group, put_array
from .layout import ParamLayout
from .power import SUBSPACE_KIND, open_partials, summed_block, tsqr

AG_PARTIAL_KIND = "ag_partial"


def class_sums(op, batches, num_classes: int, timer=None, device=None, where: str = ""):
    """{b: Σ_{i: y=c} G_{i,b}} (P_b×C, float64) and the class counts over ``batches``."""
    import torch

    acc = {b: torch.zeros(op.layout.block_size(b), num_classes, dtype=torch.float64, device=op.device)
           for b in op.layout.block_names}
    counts = np.zeros(num_classes, np.int64)
    for batch in batches:
        x, y = batch[0].to(op.device), batch[1]
        y = torch.as_tensor(y).long()
        if (y < 0).any() or (y >= num_classes).any():
            bad = int(y[(y < 0) | (y >= num_classes)][0])
            raise DataError(f"label {bad} outside [0, {num_classes}) in ID-train data"
                            f"{' ' + where if where else ''}")
        Y = torch.nn.functional.one_hot(y, num_classes).to(op.device, torch.float32)
        if timer is not None:
            with timer("products", device):
                S = op.gtu(x, Y)
        else:
            S = op.gtu(x, Y)
        for b in acc:
            acc[b] += S[b].to(torch.float64)
        counts += np.bincount(y.cpu().numpy(), minlength=num_classes)
    return {b: a.cpu().numpy() for b, a in acc.items()}, counts


def write_ag_partial(path, layout: ParamLayout, sums: dict, counts: np.ndarray, attrs: dict) -> None:
    with atomic_group(path, {"kind": AG_PARTIAL_KIND, "layout": layout.to_dict(), "n": int(counts.sum()),
                             "blocks": list(sums), "counts": counts.tolist(), **attrs}) as g:
        for b, arr in sums.items():
            if not np.isfinite(arr).all():
                raise StoreError(f"{path}: non-finite class sums in block '{b}'")
            put_array(g, f"S.{b}", arr)


def reduce_ag(partial_paths, layout: ParamLayout, out_path, orthonormalize: bool = True,
              stats=None, attrs: dict | None = None) -> dict:
    opened, n = open_partials(partial_paths, layout, kind=AG_PARTIAL_KIND)
    if stats is not None and n != stats.count:
        raise StoreError(f"AG partials cover {n} samples, the statistics {stats.count}")
    counts = np.zeros(len(opened[0][2]["counts"]), np.int64)
    seen = set()
    for _, _, a in opened:
        if str(a.get("shard")) not in seen:
            counts += np.asarray(a["counts"], np.int64)
            seen.add(str(a.get("shard")))
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise DataError(f"AG subspace: class(es) {empty.tolist()} have no ID-train samples")

    def means(b):
        return summed_block(opened, b, key="S") / counts[None, :]

    C = counts.size
    if orthonormalize:
        get, R = tsqr(layout.block_names, means)
        r = np.abs(np.diag(R))
        keep = np.flatnonzero(r > 1e-6 * r.max())
        rank = int(keep.size)

        def basis(b):
            return get(b)[:, keep]
    else:
        basis, rank, keep = means, None, np.arange(C)
    info = {"kind": SUBSPACE_KIND, "type": "ag", "k": int(keep.size), "classes": C, "n": n,
            "counts": counts.tolist(), "orthonormal": bool(orthonormalize), "rank": rank,
            "total_variance": stats.total_variance if stats is not None else None, **dict(attrs or {})}
    with atomic_group(out_path, {"layout": layout.to_dict(), **info}) as g:
        for b in layout.block_names:
            mb = means(b)
            put_array(g, f"means.{b}", mb.astype(np.float32))
            put_array(g, f"V.{b}", np.asarray(basis(b), dtype=np.float32))
    return info
