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
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..errors import DataError, StoreError
from ..store import iter_chunks


def _write_csv(path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["empty"])
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    tmp.replace(path)


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
    write_json(out_dir / "summary.json", summary)
    return summary


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
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


# -- diagnostics with a gradient pass -----------------------------------------------------

def sample_rows(n_total: int, n_samples: int, seed: int, salt: int = 0) -> np.ndarray:
    rng = np.random.default_rng([int(seed), int(salt)])
    if n_total <= n_samples:
        return np.arange(n_total)
    return np.sort(rng.choice(n_total, n_samples, replace=False))


def sampled_gradients(op, batches, rows_wanted: np.ndarray, max_bytes: float):
    """Normalized gradients G (m×P float32, numpy) and labels of the wanted manifest rows."""
    P = op.layout.num_params
    if rows_wanted.size * P * 4 > max_bytes:
        raise DataError(f"gradient diagnostics would hold {rows_wanted.size}×{P} gradients "
                        f"({rows_wanted.size * P * 4 / 2**30:.1f} GiB > limit); lower n_samples")
    G, Y, R = [], [], []
    for x, y, rows in batches:
        rows = np.asarray(rows)
        keep = np.isin(rows, rows_wanted)
        if not keep.any():
            continue
        import torch

        g = op.gradients(x[torch.as_tensor(keep, device=x.device)])
        G.append(g.cpu().numpy())
        Y.append(np.asarray(y)[keep])
        R.append(rows[keep])
    if not G:
        return np.zeros((0, P), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(G), np.concatenate(Y), np.concatenate(R)


def reduced_rows(stores, rows: np.ndarray) -> np.ndarray:
    """Rows (manifest indices) of the reduced stores, in the order of ``rows``."""
    parts, idx = [], []
    for c in iter_chunks(stores, ["reduced", "index"]):
        parts.append(np.asarray(c["reduced"]))
        idx.append(np.asarray(c["index"]))
    red, idx = np.concatenate(parts), np.concatenate(idx)
    pos = {int(i): j for j, i in enumerate(idx)}
    missing = [int(r) for r in rows if int(r) not in pos]
    if missing:
        raise StoreError(f"reduced stores lack sample index {missing[0]}")
    return red[[pos[int(r)] for r in rows]]


def _unit(a):
    a = np.asarray(a, np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)


def nn_mean_distance(query: np.ndarray, ref: np.ndarray, chunk: int = 256) -> float:
    """Mean over queries of the Euclidean distance to the nearest reference (unit vectors)."""
    q, r = _unit(query), _unit(ref)
    best = []
    for a in range(0, q.shape[0], chunk):
        d2 = 2.0 - 2.0 * (q[a:a + chunk] @ r.T)
        best.append(np.sqrt(np.maximum(d2.min(1), 0.0)))
    return float(np.concatenate(best).mean()) if best else float("nan")


def class_mean_cosines(G: np.ndarray, y: np.ndarray, ag_group, layout, path="") -> np.ndarray:
    """cos(G_i, μ_{y_i}) with the AG class means stored per block (P_b×C)."""
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
