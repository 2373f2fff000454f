"""Diagnostics of a gradient subspace (low-dimensional gradient paper, §3.2, §5.1, App. A–B).

From stored outputs only (no gradient pass):

- reconstruction error ‖G − G V Vᵀ‖/‖G‖ = (1 − ‖G V‖²/‖G‖²)^½ per sample for an orthonormal
  V, from the reduced stores (``reduced``, ``gnorm2``); mean ± std per dataset (Tables 2, 8);
- explained-variance curve (Fig. 8): per reduced dimension j, E[(G v_j)²] over ID train
  divided by the total variance E‖G‖² = tr(C)/N of the statistics; for the PCA subspace
  these are the Ritz eigenvalues; cumulative ratio plotted.

With a gradient pass over a seeded random sample of at most ``n_samples`` rows per dataset:

- mean nearest-neighbour distance from ID-test / OOD samples to ID-train samples, between
  unit-normalized gradients, in the whole space and in the reduced space (Table 9);
- cosine between G(x) and its class-mean gradient μ_y (AG means) on ID train and test (Table 13).

Memory (:func:`gradient_pass_diagnostics`): gradients are computed one loader batch at a
time and never held for a whole sample, except the ID-train *reference* of the whole-space
nearest-neighbour search, which every query must meet. That reference is held in pieces of
at most ``max_bytes`` (``subspace.diagnostics.max_gib``); when the n_samples reference
gradients (n·P·4 bytes) exceed it, the search runs one piece at a time and each further
piece costs one more gradient pass over the query samples (results are exact either way).
The cosines stream (the class means, P×C like the AG basis, are held once), and so do
the reduced rows of the sample (m×K). Query gradients are taken at most ``WORK_BYTES``
(1 GiB) of float64 rows at a time, whatever the loader batch: 5 rows of ResNet-50.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from ..errors import DataError, StoreError
from ..files import atomic_path, write_text_atomic
from ..runtime import progress_bar
from ..store import iter_chunks

# bytes of the float64 working arrays of the gradient pass (query rows, reference pieces)
WORK_BYTES = float(2**30)


def _write_csv(path, rows: list[dict]) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["empty"])
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def write_json(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=float))


def reconstruction_errors(stores) -> np.ndarray:
    """Per-sample ‖G − G V Vᵀ‖/‖G‖ from reduced stores of an orthonormal V."""
    out = []
    for c in iter_chunks(stores, ["reduced", "gnorm2"]):
        r2 = (np.asarray(c["reduced"], np.float64) ** 2).sum(1)
        g2 = np.asarray(c["gnorm2"], np.float64)
        if not np.isfinite(g2).all():
            raise StoreError(f"reduced stores {list(map(str, stores))[:2]} lack ‖G‖² (projected with "
                             "jvp_vjp); project with method persample for reconstruction errors")
        out.append(np.sqrt(np.clip(1.0 - r2 / np.maximum(g2, 1e-300), 0.0, 1.0)))
    return np.concatenate(out) if out else np.zeros(0)


def dimension_variances(stores) -> tuple[np.ndarray, int]:
    """E[(G v_j)²] over the samples of the reduced stores (ID train)."""
    total, n = None, 0
    for c in iter_chunks(stores, ["reduced"]):
        r = np.asarray(c["reduced"], np.float64)
        s = (r * r).sum(0)
        total = s if total is None else total + s
        n += r.shape[0]
    if not n:
        raise DataError("no ID-train reduced gradients for the explained-variance curve")
    return total / n, n


def store_diagnostics(subspace_attrs: dict, reduced: dict[str, list], out_dir, space: str) -> dict:
    """Reconstruction table and explained-variance curve (CSV, PNG, JSON) into ``out_dir``."""
    out_dir = Path(out_dir)
    total = subspace_attrs.get("total_variance")
    rows = []
    orth = bool(subspace_attrs.get("orthonormal", True))
    for ds, stores in reduced.items():
        if not orth:
            break
        e = reconstruction_errors(stores)
        rows.append({"subspace": space, "k": subspace_attrs.get("k"), "dataset": ds, "n": int(e.size),
                     "mean": float(e.mean()), "std": float(e.std())})
    _write_csv(out_dir / "reconstruction.csv", rows)
    curve = []
    if "id_train" in reduced and total:
        var, n = dimension_variances(reduced["id_train"])
        if subspace_attrs.get("type") == "pca" and subspace_attrs.get("eigenvalues"):
            ev = np.asarray(subspace_attrs["eigenvalues"], np.float64)
        else:
            ev = np.sort(var)[::-1]
        ratio = ev / float(total)
        cum = np.cumsum(ratio)
        curve = [{"component": j + 1, "variance": float(ev[j]), "ratio": float(ratio[j]),
                  "cumulative": float(cum[j])} for j in range(ev.size)]
        _plot_curve(out_dir / "explained_variance.png", ev, cum, space)
    _write_csv(out_dir / "explained_variance.csv", curve)
    summary = {"space": space, "type": subspace_attrs.get("type"), "k": subspace_attrs.get("k"),
               "reconstruction": rows,
               "captured_variance": curve[-1]["cumulative"] if curve else None}
    if subspace_attrs.get("type") == "pca" and subspace_attrs.get("residuals") is not None:
        summary.update(convergence_report(subspace_attrs, out_dir))
    write_json(out_dir / "summary.json", summary)
    return summary


def convergence_report(attrs: dict, out_dir) -> dict:
    """The PCA's convergence, for the report: ``convergence.csv`` (per data pass: largest
    top-k residual, captured variance, subspace change), ``convergence.png`` (the curve
    against subspace.tol) and ``directions.csv`` (per direction: eigenvalue, residual and
    whether it met the tolerance; unconverged directions are flagged). With the exact
    solver the record is its one data pass (residuals are rounding only) and the figure
    says so."""
    out_dir = Path(out_dir)
    tol = attrs.get("tol")
    rows = [{"pass": c.get("pass"), "data_passes": int(c.get("pass", 0)) + 1,
             "max_residual": c.get("max_residual"), "captured_variance_topk": c.get("captured_variance_topk"),
             "subspace_change_topk": c.get("subspace_change_topk"), "krylov_dim": c.get("krylov_dim")}
            for c in attrs.get("convergence") or []]
    _write_csv(out_dir / "convergence.csv", rows)
    res = np.asarray(attrs["residuals"], np.float64)
    ev = np.asarray(attrs.get("eigenvalues") or [np.nan] * res.size, np.float64)
    dirs = [{"direction": j + 1, "eigenvalue": float(ev[j]), "residual": float(res[j]),
             "converged": "yes" if tol is None or res[j] <= float(tol) else "NO (above tol)"}
            for j in range(res.size)]
    _write_csv(out_dir / "directions.csv", dirs)
    pts = [(r["data_passes"], r["max_residual"]) for r in rows if r["max_residual"] is not None]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    if pts:
        ax.semilogy([p for p, _ in pts], [max(r, 1e-16) for _, r in pts], "o-",
                    label="largest residual of the top-k Ritz pairs")
    if tol is not None:
        ax.axhline(float(tol), color="k", ls="--", lw=1, label=f"subspace.tol = {tol}")
    exact = attrs.get("solver") == "exact"
    if exact:  # one pass, no iteration: say so instead of drawing a one-point "curve"
        ax.text(0.5, 0.5, "exact solver: one data pass, G in memory,\nexact eigendecomposition of G G^T "
                "(no iteration)", transform=ax.transAxes, ha="center", va="center", fontsize=8)
    ax.set(xlabel="data passes" + ("" if exact else " (before the lift pass)"), ylabel="||C v - λ v|| / λ",
           title=f"PCA convergence ({attrs.get('solver', 'krylov')})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "convergence.png", dpi=110)
    plt.close(fig)
    return {"passes": attrs.get("passes"), "tol": tol, "max_residual": float(res.max()),
            "converged": attrs.get("converged"), "unconverged_directions": [int(j) + 1 for j in
                                                                          attrs.get("unconverged") or []]}


def _plot_curve(path, ev, cum, space) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    ax[0].semilogy(np.arange(1, ev.size + 1), np.maximum(ev, 1e-30))
    ax[0].set(xlabel="component", ylabel="eigenvalue", title=f"{space}: eigenvalues")
    ax[1].plot(np.arange(1, cum.size + 1), cum)
    ax[1].set(xlabel="number of components", ylabel="explained variance ratio", ylim=(0, 1.02),
              title="cumulative")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# -- diagnostics with a gradient pass -----------------------------------------------------

def sample_rows(n_total: int, n_samples: int, seed: int, salt: int = 0) -> np.ndarray:
    rng = np.random.default_rng([int(seed), int(salt)])
    if n_total <= n_samples:
        return np.arange(n_total)
    return np.sort(rng.choice(n_total, n_samples, replace=False))


def sampled_chunks(op, batches, rows_wanted: np.ndarray, max_rows: int | None = None):
    """Yield (G, labels, rows) per loader batch for the wanted manifest rows: the normalized
    gradients G (m_c×P float32 numpy) of the batch's wanted samples only, at most
    ``max_rows`` samples at a time (a loader batch of ImageNet-sized gradients would not fit)."""
    import torch

    rows_wanted = np.asarray(rows_wanted)
    for x, y, rows in batches:
        rows = np.asarray(rows.cpu() if hasattr(rows, "cpu") else rows)
        keep = np.flatnonzero(np.isin(rows, rows_wanted))
        if not keep.size:
            continue
        y = np.asarray(y.cpu() if hasattr(y, "cpu") else y)
        step = keep.size if max_rows is None else max(1, int(max_rows))
        for a in range(0, keep.size, step):
            idx = keep[a:a + step]
            g = op.gradients(x[torch.as_tensor(idx, device=x.device)])
            # a copy: G is the operator's reused buffer, overwritten by the next batch
            yield g.cpu().numpy().copy(), y[idx], rows[idx]


def work_rows(num_params: int, work_bytes: float, itemsize: int, cap: int) -> int:
    """Rows of ``num_params`` values of ``itemsize`` bytes that fit ``work_bytes`` (≥ 1, ≤ cap)."""
    return max(1, min(int(cap), int(work_bytes // (itemsize * max(int(num_params), 1)))))


def _unit32(a) -> np.ndarray:
    a = np.asarray(a)
    n = np.linalg.norm(a.astype(np.float64), axis=1, keepdims=True)
    return (a / np.maximum(n, 1e-300)).astype(np.float32)


def _cosines(G, y, means: dict, mu_norm: np.ndarray, layout) -> np.ndarray:
    """cos(G_i, μ_{y_i}) for one chunk, blockwise (means: block -> P_b×C float32)."""
    dots = None
    for b, mb in means.items():
        d = (layout.take(G, b) @ mb).astype(np.float64)
        dots = d if dots is None else dots + d
    gn = np.linalg.norm(np.asarray(G, np.float64), axis=1)
    y = np.asarray(y, np.int64)
    return dots[np.arange(y.size), y] / np.maximum(gn * mu_norm[y], 1e-300)


def load_class_means(ag_group, layout, path="") -> tuple[dict, np.ndarray]:
    """The AG class means per block (float32) and ‖μ_c‖."""
    means, mu2 = {}, None
    for b in layout.block_names:
        key = f"means.{b}"
        if key not in ag_group:
            raise StoreError(f"{path}: no class means '{key}' (not an AG subspace store)")
        means[b] = np.asarray(ag_group[key][...], np.float32)
        m2 = (means[b].astype(np.float64) ** 2).sum(0)
        mu2 = m2 if mu2 is None else mu2 + m2
    return means, np.sqrt(mu2)


def gradient_pass_diagnostics(op, batches: dict, rows: dict, ref: str = "id_train", means=None,
                              cosine_sets=("id_train", "id_test"), max_bytes: float = 8 * 2**30,
                              sub_rows: int = 256, work_bytes: float = WORK_BYTES):
    """Whole-space nearest-neighbour distances and class-mean cosines over sampled rows.

    ``batches``: dataset -> callable returning a fresh batch iterator; ``rows``: dataset ->
    sorted manifest rows of its sample; ``means``: (block means, ‖μ‖) of
    :func:`load_class_means` or None. Returns ({dataset: distance from each sampled row to
    its nearest ``ref`` row, unit-normalized gradients}, {dataset: cosines}, {dataset: labels})
    for every dataset other than ``ref`` (distances) and the ``cosine_sets`` (cosines).
    At most ``max_bytes`` of reference gradients are held at once (see the module doc); the
    query gradients and the float64 pieces of the distance products take at most
    ``work_bytes`` each (fewer rows at a time for large models)."""
    P = op.layout.num_params
    q_rows = work_rows(P, work_bytes, 8, 1 << 30)  # float64 unit queries
    sub_rows = work_rows(P, work_bytes, 8, sub_rows)  # float64 reference rows per product
    per_piece = int(max_bytes // (4 * P))
    if per_piece < 1:
        raise DataError(f"one gradient of {P} parameters ({4 * P / 2**30:.2f} GiB) exceeds the "
                        f"gradient-diagnostics memory limit ({max_bytes / 2**30:.2f} GiB, max_gib)")
    ref_rows = np.asarray(rows[ref])
    queries = [ds for ds in batches if ds != ref]
    best = {ds: np.full(len(rows[ds]), np.inf) for ds in queries}
    cos = {ds: [] for ds in cosine_sets if ds in batches and means is not None}
    labels = {ds: [] for ds in batches}
    pieces = [ref_rows[i:i + per_piece] for i in range(0, max(len(ref_rows), 1), per_piece)]
    # progress: gradients computed (sampled rows), one bar over every pass of the job
    total = ref_rows.size + len(pieces) * sum(len(rows[ds]) for ds in queries)
    with progress_bar("gradient-diagnostics", total) as bar:
        for j, piece in enumerate(pieces):
            R = []
            for G, y, _ in sampled_chunks(op, batches[ref](), piece, q_rows):
                bar.update(G.shape[0])
                R.append(_unit32(G))
                labels[ref].append(y)
                if ref in cos:
                    cos[ref].append(_cosines(G, y, means[0], means[1], op.layout))
            R = np.concatenate(R) if R else np.zeros((0, P), np.float32)
            for ds in queries:
                pos = 0
                for G, y, _ in sampled_chunks(op, batches[ds](), rows[ds], q_rows):
                    bar.update(G.shape[0])
                    if j == 0:
                        labels[ds].append(y)
                        if ds in cos:
                            cos[ds].append(_cosines(G, y, means[0], means[1], op.layout))
                    Q = _unit32(G).astype(np.float64)
                    d2 = best[ds][pos:pos + Q.shape[0]]
                    for a in range(0, R.shape[0], sub_rows):
                        Ra = R[a:a + sub_rows].astype(np.float64)
                        d2 = np.minimum(d2, (2.0 - 2.0 * (Q @ Ra.T)).min(1))
                    best[ds][pos:pos + Q.shape[0]] = d2
                    pos += Q.shape[0]
            del R
    dist = {ds: np.sqrt(np.maximum(d2, 0.0)) for ds, d2 in best.items()}
    cat = {ds: np.concatenate(v) if v else np.zeros(0) for ds, v in cos.items()}
    lab = {ds: np.concatenate(v) if v else np.zeros(0, np.int64) for ds, v in labels.items()}
    return dist, cat, lab


def reduced_rows(stores, rows: np.ndarray) -> np.ndarray:
    """Rows (manifest indices) of the reduced stores, in the order of ``rows`` (streamed:
    only the wanted rows are kept)."""
    want = {int(r) for r in rows}
    parts, idx = [], []
    for c in iter_chunks(stores, ["reduced", "index"]):
        i = np.asarray(c["index"])
        keep = np.fromiter((int(v) in want for v in i), bool, i.size)
        parts.append(np.asarray(c["reduced"])[keep])
        idx.append(i[keep])
    red = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    idx = np.concatenate(idx) if idx else np.zeros(0, np.int64)
    pos = {int(i): j for j, i in enumerate(idx)}
    missing = [int(r) for r in rows if int(r) not in pos]
    if missing:
        raise StoreError(f"reduced stores lack sample index {missing[0]}")
    return red[[pos[int(r)] for r in rows]]


def _unit(a):
    a = np.asarray(a, np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)


def nn_mean_distance(query: np.ndarray, ref: np.ndarray, chunk: int = 256) -> float:
    """Mean over queries of the Euclidean distance to the nearest reference (unit vectors),
    both held in memory (used for the reduced space, m×K)."""
    q, r = _unit(query), _unit(ref)
    best = []
    for a in range(0, q.shape[0], chunk):
        d2 = 2.0 - 2.0 * (q[a:a + chunk] @ r.T)
        best.append(np.sqrt(np.maximum(d2.min(1), 0.0)))
    return float(np.concatenate(best).mean()) if best else float("nan")


def class_mean_cosines(G: np.ndarray, y: np.ndarray, ag_group, layout, path="") -> np.ndarray:
    """cos(G_i, μ_{y_i}) with the AG class means stored per block (P_b×C), for gradients G
    held in memory (reference for the streamed :func:`gradient_pass_diagnostics`)."""
    dots, mu2 = None, None
    for b in layout.block_names:
        key = f"means.{b}"
        if key not in ag_group:
            raise StoreError(f"{path}: no class means '{key}' (not an AG subspace store)")
        mb = np.asarray(ag_group[key][...], np.float64)
        Gb = np.asarray(layout.take(G, b), np.float64)
        d = Gb @ mb
        dots = d if dots is None else dots + d
        m2 = (mb * mb).sum(0)
        mu2 = m2 if mu2 is None else mu2 + m2
    gn = np.linalg.norm(np.asarray(G, np.float64), axis=1)
    y = np.asarray(y, np.int64)
    return dots[np.arange(y.size), y] / np.maximum(gn * np.sqrt(mu2[y]), 1e-300)
