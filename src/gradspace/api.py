"""gradspace from Python: detectors on arrays, per-sample gradients, a subspace fitted in
memory, and the stores of a finished workflow run.

Everything here calls the code the workflow's jobs call (the same detectors, gradient
engine, statistics, Krylov/exact PCA and AG basis, projection); only the files are left
out. Scores follow one convention throughout: **higher = more in-distribution**.

    import gradspace as gs

    det = gs.detector("knn", k=5).fit({"features": train_feats})
    scores = det.score({"features": test_feats})           # higher = more ID
    gs.ood_metrics(id_scores, ood_scores)                   # {"auroc": ..., "fpr95": ...}

    G = gs.per_sample_gradients(model, x)                   # N x P energy gradients
    sub = gs.fit_subspace(model, (x_train, y_train), kind="pca", k=8)
    Z = sub.project(model, x_test)                           # N x k reduced gradients

    run = gs.open_run("results/demo")
    run.scores("energy", "id_test"); run.embeddings("id_test"); run.subspace("pca")

Data for the gradient functions is a re-iterable of batches — a ``DataLoader`` or list of
``(x, y)`` / ``(x, y, ...)`` tuples, or bare ``x`` tensors — or one ``(x, y)`` pair / one
``x`` tensor, which is cut into ``batch_size`` batches. Labels are needed only by the AG
subspace and the reduced-gradient detectors' fits.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .detectors.base import Detector, FitContext, build_detector, known_detectors
from .errors import ConfigError, DataError, StoreError
from .metrics import ood_metrics

__all__ = [
    "Detector",
    "FitContext",
    "Run",
    "Subspace",
    "detector",
    "list_detectors",
    "fit_subspace",
    "gradient_engine",
    "ood_metrics",
    "open_run",
    "per_sample_gradients",
]


# ---- detectors --------------------------------------------------------------------------


def detector(method: str, **hparams) -> Detector:
    """A detector by method name (``gradspace.list_detectors()`` lists them) with its
    hyperparameters; unknown names or hyperparameters raise ``ConfigError``.

    ``det.fit(train)`` takes a mapping of ID-train arrays named as in ``det.requires``
    (``logits``, ``features``, ``labels``; ``reduced`` for the reduced-gradient detectors)
    and an optional ``FitContext`` (head weights, class count, seed) and returns the
    detector; ``det.score(arrays)`` returns one score per row, higher = more ID."""
    return build_detector(method, hparams)


def list_detectors() -> list[str]:
    """Method names ``detector`` accepts (feature and reduced-gradient detectors)."""
    return known_detectors()


# ---- data -------------------------------------------------------------------------------


def _is_tensorlike(v) -> bool:
    return hasattr(v, "shape") and hasattr(v, "__getitem__") and not isinstance(v, (list, tuple, dict))


def _batches(data, batch_size: int = 64, need_labels: bool = False):
    """A function returning a fresh iterator of (x, y, rows) batches over ``data``."""
    import torch

    def as_tensor(v):
        return v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))

    pair = (
        isinstance(data, tuple) and len(data) == 2 and all(_is_tensorlike(v) for v in data)
        and getattr(data[0], "ndim", 0) >= 2 and getattr(data[1], "ndim", 0) == 1
    )
    if _is_tensorlike(data) or pair:
        x = as_tensor(data[0] if pair else data)
        y = as_tensor(data[1]).long() if pair else None
        if y is not None and len(y) != len(x):
            raise DataError(f"data: {len(x)} inputs but {len(y)} labels")
        if need_labels and y is None:
            raise DataError("data: labels are needed here; pass (x, y)")
        bs = int(batch_size)
        if bs < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")

        def tensors():
            for a in range(0, len(x), bs):
                z = min(a + bs, len(x))
                yy = y[a:z] if y is not None else torch.zeros(z - a, dtype=torch.long)
                yield x[a:z], yy, torch.arange(a, z)

        return tensors

    if iter(data) is data:
        raise ConfigError(
            "data: a one-shot iterator cannot be read more than once; pass a DataLoader, a list "
            "of batches or (x, y) tensors (statistics, PCA passes and the lift each read the data)"
        )

    def loader():
        n = 0
        for j, batch in enumerate(data):
            if isinstance(batch, Mapping):
                raise DataError(f"data: batch {j} is a mapping; yield (x, y) tuples or x tensors")
            if isinstance(batch, (tuple, list)):
                if not batch:
                    raise DataError(f"data: batch {j} is empty")
                x = as_tensor(batch[0])
                y = as_tensor(batch[1]).long() if len(batch) > 1 else None
            else:
                x, y = as_tensor(batch), None
            if x.ndim < 2:
                raise DataError(
                    f"data: batch {j} has inputs of shape {tuple(x.shape)}; expected a batch (N x ...) "
                    "of inputs, e.g. (x, y) with x of shape N x C x H x W"
                )
            if y is None:
                if need_labels:
                    raise DataError(f"data: batch {j} has no labels; yield (x, y) here")
                y = torch.zeros(x.shape[0], dtype=torch.long)
            elif y.shape[0] != x.shape[0]:
                raise DataError(f"data: batch {j} has {x.shape[0]} inputs but {y.shape[0]} labels")
            yield x, y, torch.arange(n, n + x.shape[0])
            n += x.shape[0]

    return loader


# ---- per-sample gradients ---------------------------------------------------------------


def gradient_engine(model, params="all", loss: str = "energy", temperature: float = 1.0, **options):
    """The workflow's per-sample gradient engine (``gradspace.grads.GradientEngine``):
    ``engine.batch(x)`` gives the N x P gradients of the per-sample ``loss`` with respect
    to the selected parameters (``params``: ``"all"``, ``"last"``, stage names), in the
    order of ``engine.param_names``. ``options``: strategy, chunk_size, precision,
    max_chunk_bytes."""
    from .grads import GradientEngine

    return GradientEngine(model, params, loss, temperature, **options)


def per_sample_gradients(model, x, params="all", loss: str = "energy", temperature: float = 1.0,
                         target=None, **options):
    """N x P per-sample gradients of ``loss`` (default the energy, as the low-dimensional
    gradient paper) for the inputs ``x`` (one batch tensor); ``target`` for label losses."""
    import torch

    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if x.ndim < 2:
        raise DataError(f"x has shape {tuple(x.shape)}; expected a batch N x ...")
    return gradient_engine(model, params, loss, temperature, **options).batch(x, target)


# ---- subspaces --------------------------------------------------------------------------


@dataclass
class Subspace:
    """A gradient subspace: per parameter block, V_b (P_b x k, float32), the layout that
    maps blocks to the model's parameters, and the statistics G = s ⊙ (∇E − m) is formed
    with. ``info`` holds what the workflow stores in ``subspace.zarr``'s attributes
    (eigenvalues, residuals, passes; rank and class counts for AG)."""

    kind: str
    V: dict
    layout: object
    stats: object
    info: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(next(iter(self.V.values())).shape[1])

    def basis(self) -> np.ndarray:
        """V as one P x k array in the gradient engine's flat parameter order."""
        out = np.zeros((self.layout.num_params, self.k), np.float32)
        for b in self.layout.block_names:
            r = 0
            for a, z in self.layout.block_ranges(b):
                out[a:z] = self.V[b][r : r + z - a]
                r += z - a
        return out

    def project(self, model, data, method: str = "persample", batch_size: int = 64,
                chunk_size: int = 64, return_norms: bool = False):
        """Reduced gradients (N x k, float32) of ``data``'s samples: V^T G_i with the
        subspace's normalization, as the workflow's ``project`` jobs compute them. With
        ``return_norms`` also ‖G_i‖² (NaN under ``jvp_vjp``, which never forms G_i)."""
        import torch

        from .runtime import Timer
        from .subspace.operators import make_operator
        from .subspace.project import project_batches

        op = make_operator(method, model.eval(), self.layout, self.stats, self.stats.temperature,
                           params=self.stats.selection, chunk_size=chunk_size)
        V = {b: torch.as_tensor(v, dtype=torch.float32, device=op.device) for b, v in self.V.items()}
        rows, reds, norms = [], [], []
        for r, _, red, gn in project_batches(op, _batches(data, batch_size)(), V, Timer()):
            rows.append(r)
            reds.append(red)
            norms.append(gn)
        if not reds:
            raise DataError("project: no samples in data")
        order = np.argsort(np.concatenate(rows), kind="stable")
        Z = np.concatenate(reds)[order].astype(np.float32)
        return (Z, np.concatenate(norms)[order]) if return_norms else Z


def fit_subspace(model, data, kind: str = "pca", k: int = 32, *, params="all", blocks="top",
                 normalize: Mapping | None = None, method: str = "jvp_vjp", solver: str = "krylov",
                 oversample: int = 10, tol: float | None = 1e-2, iterations="auto",
                 max_iterations: int = 20, num_classes: int | None = None, temperature: float = 1.0,
                 seed: int = 0, batch_size: int = 64, chunk_size: int = 64) -> Subspace:
    """Fit a gradient subspace of ``model`` on ID-train ``data`` in memory.

    kind ``"pca"``: the top-k principal directions of the normalized energy gradients
    (``solver``: ``"krylov"`` block Krylov passes until the largest Ritz residual is
    ≤ ``tol``, ``"power"`` power iteration, ``"exact"`` one pass forming N x N G Gᵀ —
    for N up to a few thousand; it always uses the ``persample`` operator).
    ``iterations="auto"`` stops at ``tol`` (at most
    ``max_iterations``); an integer T runs T + 1 data passes; the lift is one more.
    kind ``"ag"``: the span of the class-average gradients (needs labels; k is the rank).
    ``normalize``: the statistics options of ``subspace.normalize`` in the config
    (mean, scale, var_floor); ``blocks``: parameter block layout (``subspace.blocks``).
    Statistics, operators and bases are the workflow's own code."""
    from .subspace import ag, power, stats
    from .subspace.exact import exact_pca
    from .subspace.layout import build_layout
    from .subspace.operators import make_operator

    if kind not in ("pca", "ag"):
        raise ConfigError(f"subspace kind must be 'pca' or 'ag', got {kind!r}")
    if solver not in ("krylov", "power", "exact"):
        raise ConfigError(f"solver must be 'krylov', 'power' or 'exact', got {solver!r}")
    if solver == "exact":
        method = "persample"  # G G^T needs the explicit per-sample gradients
    model = model.eval()
    batches = _batches(data, batch_size, need_labels=kind == "ag")
    layout = build_layout(model, params, blocks)
    engine = gradient_engine(model, params, "energy", temperature, chunk_size=chunk_size)
    sums = stats.accumulate_moments(engine, batches(), layout)
    st = stats.reduce_moments([sums], layout, dict(normalize or {}))
    st.selection, st.temperature = params, float(temperature)
    op = make_operator(method, model, layout, st, temperature,
                       engine=engine if method == "persample" else None, params=params, chunk_size=chunk_size)
    n = int(sums["count"])
    if kind == "pca":
        if solver == "exact":
            V, info = exact_pca(op, batches(), n, int(k), stats=st)
        else:
            V, info = power.fit_pca_in_memory(op, batches, layout, int(k), int(oversample), seed, tol,
                                              iterations, max_iterations, solver, stats=st)
        info = {**info, "type": "pca"}
    else:
        C = int(num_classes) if num_classes is not None else None
        if C is None:
            C = int(max(int(y.max()) for _, y, _ in batches())) + 1
        S, counts = ag.class_sums(op, batches(), C)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            raise DataError(f"AG subspace: class(es) {empty.tolist()} have no samples in data")
        basis, keep, rank, extra = ag.ag_basis(lambda b: S[b] / counts[None, :], layout, counts, n,
                                              True, st)
        V = {b: np.asarray(basis(b), np.float32) for b in layout.block_names}
        info = {"type": "ag", "k": int(keep.size), "classes": C, "n": n, "counts": counts.tolist(),
                "rank": rank, **extra, "total_variance": st.total_variance}
    return Subspace(kind, {b: np.asarray(v, np.float32) for b, v in V.items()}, layout, st, info)


# ---- a finished run ---------------------------------------------------------------------


class Run:
    """The stores of one workflow run, ``results/<experiment>`` (read only).

    - ``metrics()``: metrics.csv as a DataFrame (one row per detector x OOD set);
    - ``scores(detector, dataset, space="feature")``: one score per sample (higher = ID);
      ``space`` is ``feature``, ``pca``, ``ag``, ``ensemble_pca``, ...;
    - ``embeddings(dataset)``: features, logits, labels, preds of every shard, in order;
    - ``reduced(space, dataset)``: reduced gradients (N x k), labels, ‖G‖²;
    - ``subspace(kind)``: the fitted ``Subspace`` (V, layout, statistics, attributes).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: no such run directory (expected results/<experiment>)")

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    def _need(self, path: Path, what: str) -> Path:
        if not path.exists():
            raise StoreError(f"{path}: no {what} in run {self.root}")
        return path

    @property
    def datasets(self) -> list[str]:
        d = self.root / "embeddings"
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    @property
    def spaces(self) -> list[str]:
        d = self.root / "scores"
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def detectors(self, space: str = "feature") -> list[str]:
        d = self._need(self.root / "scores" / space, f"scores of space '{space}'")
        return sorted(p.name for p in d.iterdir() if p.is_dir())

    def metrics(self):
        from .metrics import read_metrics

        return read_metrics(self._need(self.root / "metrics.csv", "metrics.csv"))

    def scores(self, detector: str, dataset: str, space: str = "feature") -> np.ndarray:
        from .metrics import load_scores

        return load_scores(self._need(self.root / "scores" / space / detector / f"{dataset}.npy",
                                      f"scores of {space}/{detector} on {dataset}"))

    def _shards(self, kind: str, dataset: str) -> list[Path]:
        d = self._need(self.root / kind / dataset, f"{kind} of {dataset}")
        paths = sorted(d.glob("shard-*.zarr"), key=lambda p: int(p.stem.split("-")[1]))
        if not paths:
            raise StoreError(f"{d}: no shard stores")
        return paths

    def _arrays(self, paths, names) -> dict:
        from .store import load_arrays

        return {n: np.asarray(a.compute()) for n, a in load_arrays(paths, names).items()}

    def embeddings(self, dataset: str, names: Iterable[str] = ("features", "logits", "labels", "preds")):
        return self._arrays(self._shards("embeddings", dataset), names)

    def reduced(self, space: str, dataset: str, names: Iterable[str] = ("reduced", "labels", "gnorm2")):
        return self._arrays(self._shards(f"reduced/{space}", dataset), names)

    def subspace(self, kind: str = "pca") -> Subspace:
        from .subspace.power import basis_block, read_basis
        from .subspace.stats import read_stats

        path = self._need(self.root / "subspace" / kind / "subspace.zarr", f"{kind} subspace")
        group, attrs, layout = read_basis(path)
        V = {b: np.asarray(basis_block(group, b, str(path)), np.float32) for b in layout.block_names}
        st = read_stats(self._need(self.root / "subspace" / "stats" / "stats.zarr", "gradient statistics"))
        info = {k: v for k, v in attrs.items() if k != "layout"}
        return Subspace(kind, V, layout, st, info)


def open_run(root: str | os.PathLike) -> Run:
    """The finished run under ``root`` (``results/<experiment>``)."""
    return Run(root)
