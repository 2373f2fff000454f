"""``gradspace fit`` and ``gradspace score``: fit a detector on ID-train embedding stores,
save its state, and score a dataset with it.

Fitted detectors are ``.npz`` files: one array per state entry (``state.<key>``) plus
``meta``, a JSON string {method, name, hparams, space, embedding, arrays, format}.
``space`` is the results sub-folder (feature | pca | ag); ``embedding`` is the
metrics.csv column: the detector class's own (``feature`` or ``gradient``) in the
feature space, ``gradient`` in the reduced-gradient spaces, unless ``--embedding``. ``arrays``
maps the detector's array names (``requires``: logits, features, labels, ...) to the store arrays
they are read from (identity unless ``--map`` renamed them), so score reads what fit read.

Array detectors are scored chunk by chunk over the shard stores (memory bounded by
``--rows``); scores are placed in manifest order through the stores' ``index`` array when
every store has one (checked to be a permutation of 0..N-1), else in store order.
Model-pass detectors (ODIN, BATS) run the model over the prepared dataset with
:func:`gradspace.data.loader.iter_batches`. Outputs are written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, GradspaceError, NumericalError, StoreError
from ..files import write_bytes_atomic
from ..params import Schema, merge_params
from .base import Detector, FitContext, build_detector

log = logging.getLogger(__name__)

FORMAT = "gradspace-detector/1"
DEFAULT_ROWS = 8192
COMPUTE_KEYS = {"batch_size": Schema("compute.batch_size"), "device": Schema("compute.device"),
                "num_workers": Schema("compute.num_workers"), "mean": None, "std": None}


# -- atomic output -------------------------------------------------------------------------
def save_scores(path, scores: np.ndarray) -> None:
    """Write a float64 .npy atomically (temp file + os.replace)."""
    scores = np.ascontiguousarray(scores, dtype=np.float64)
    write_bytes_atomic(path, lambda fh: np.save(fh, scores))


def save_fitted(path, det: Detector, name: str, space: str, arrays: dict[str, str],
                embedding: str | None = None) -> None:
    """Save a fitted detector (state arrays + JSON meta) atomically as .npz."""
    if embedding is None:
        embedding = det.embedding if space == "feature" else "gradient"
    meta = {"format": FORMAT, "method": det.method, "name": name, "hparams": det.hparams,
            "space": space, "embedding": embedding, "arrays": arrays}
    payload = {f"state.{k}": np.asarray(v) for k, v in det.state_dict().items()}
    for k, v in payload.items():
        if v.dtype == object:
            raise GradspaceError(f"detector '{det.method}': state entry '{k[6:]}' is not an array")
    payload["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
    write_bytes_atomic(path, lambda fh: np.savez(fh, **payload))


def read_fitted_meta(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise DataError(f"fitted detector {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"][()]))
    except Exception as exc:  # noqa: BLE001 - zipfile/json/KeyError for corrupt files
        raise DataError(f"fitted detector {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != FORMAT:
        raise DataError(f"fitted detector {path} has format {meta.get('format')!r}, expected {FORMAT}")
    return meta


def load_fitted(path) -> tuple[Detector, dict]:
    """Rebuild a detector from a fitted .npz: (detector with state loaded, meta)."""
    meta = read_fitted_meta(path)
    det = build_detector(meta["method"], meta["hparams"])
    with np.load(path, allow_pickle=False) as f:
        state = {}
        for key in f.files:
            if key.startswith("state."):
                value = f[key]
                state[key[6:]] = value.item() if value.ndim == 0 else value
    det.load_state_dict(state)
    return det, meta


# -- reading stores ------------------------------------------------------------------------
def parse_map(items) -> dict[str, str]:
    """``--map NAME=ARRAY`` options -> {detector array name: store array name}."""
    mapping = {}
    for item in items or []:
        name, sep, array = item.partition("=")
        if not sep or not name or not array:
            raise ConfigError(f"--map expects NAME=ARRAY (e.g. features=reduced), got {item!r}")
        mapping[name] = array
    return mapping


def _check_chunk(name: str, values: np.ndarray, store, start: int) -> None:
    if values.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(values)
    if bad.any():
        first = np.argwhere(bad)[0]
        column = f", column {first[1:].tolist()}" if first.size > 1 else ""
        raise NumericalError(
            f"array '{name}' of store {store} has {int(bad.sum())} non-finite value(s), first at "
            f"sample row {start + int(first[0])}{column}")


class StoreChunks:
    """Re-iterable chunks {detector name: array} over shard stores (ViM reads twice).

    Each chunk holds at most ``rows`` rows. Floating arrays are checked for NaN/inf, the
    error naming the store and sample row."""

    def __init__(self, paths, names, mapping: dict[str, str] | None = None, rows: int = DEFAULT_ROWS,
                 extra=()):
        if not paths:
            raise ConfigError("no shard stores given")
        self.paths = [str(p) for p in paths]
        self.names = list(names)
        self.mapping = dict(mapping or {})
        self.rows = int(rows)
        self.extra = list(extra)  # store arrays read as-is (e.g. "index")

    def __iter__(self):
        from ..store import check_shard_set, iter_chunks

        check_shard_set(self.paths)  # shard stores of one dataset, one consistent layout
        src = [self.mapping.get(n, n) for n in self.names] + self.extra
        for path in self.paths:
            start = 0
            for chunk in iter_chunks([path], src, rows=self.rows):
                out = {}
                for name, array in zip(self.names, src, strict=False):
                    _check_chunk(array, chunk[array], path, start)
                    out[name] = chunk[array]
                for array in self.extra:
                    out[array] = chunk[array]
                start += chunk[src[0]].shape[0]
                yield out


def _store_sizes_and_index(paths) -> tuple[list[int], bool]:
    from ..store import open_store

    sizes, has_index = [], True
    for p in paths:
        meta = dict(open_store(p).attrs).get("gradspace", {})
        sizes.append(int(meta["n"]))
        has_index &= "index" in meta.get("arrays", {})
    return sizes, has_index


# -- fit -----------------------------------------------------------------------------------
def _model_context(model_path, seed: int, data_dir=None, compute=None) -> FitContext:
    ctx = FitContext(seed=seed)
    if data_dir:
        ctx.extra["data_dir"] = str(data_dir)
    ctx.extra["compute"] = dict(compute or {})
    if not model_path:
        return ctx
    from ..models import load_model
    from ..runtime import resolve_device

    model, meta = load_model(model_path, resolve_device("cpu"))
    head = getattr(model, "head", None)
    if head is None or getattr(head, "weight", None) is None:
        raise ConfigError(f"model {model_path} has no linear 'head' layer")
    ctx.head_weight = head.weight.detach().cpu().double().numpy()
    ctx.head_bias = None if head.bias is None else head.bias.detach().cpu().double().numpy()
    ctx.num_classes = int((meta or {}).get("num_classes") or ctx.head_weight.shape[0])
    ctx.model_path = str(model_path)
    ctx.extra["model"] = model
    return ctx


def fit_detector(method: str, hparams: dict, train, out, *, name: str | None = None,
                 space: str = "feature", model_path=None, seed: int = 0,
                 mapping: dict[str, str] | None = None, rows: int = DEFAULT_ROWS,
                 embedding: str | None = None, data_dir=None, compute: dict | None = None) -> Detector:
    """Build, fit and save one detector instance; returns the fitted detector."""
    from ..runtime import Timer, seed_everything

    seed_everything(seed)
    det = build_detector(method, hparams)
    mapping = dict(mapping or {})
    usable = {r for r in det.requires if r != "model"}
    unknown = set(mapping) - usable
    if unknown:
        raise ConfigError(f"--map: detector '{method}' reads no array named {sorted(unknown)}; "
                          f"it reads {sorted(usable)}")
    needed = [r for r in det.requires if r != "model"]
    if not (det.needs_head or det.needs_model):
        model_path = None  # nothing to read from the model: skip loading it (and torch)
    ctx = _model_context(model_path, seed, data_dir, compute)
    ctx.extra["space"] = space  # gradient detectors' `dims` applies to ordered (PCA) spaces only
    timer = Timer()
    with timer("fit"):
        if needed and det.needs_fit:
            if not train:
                raise ConfigError(f"detector '{method}' needs ID-train stores (--train) with "
                                  f"arrays {needed}")
            det.fit_chunks(StoreChunks(train, needed, mapping, rows), ctx)
        else:
            det.fit({}, ctx)
    arrays = {n: mapping.get(n, n) for n in det.requires if n != "model"}
    if hasattr(det, "score_requires"):
        arrays = {n: mapping.get(n, n) for n in det.score_requires}
    save_fitted(out, det, name or method, space, arrays, embedding)
    log.info("fitted %s (%s) in %.2fs -> %s", name or method, method, timer.totals["fit"], out)
    return det


# -- score ---------------------------------------------------------------------------------
def score_arrays(det: Detector, shards, arrays: dict[str, str], rows: int = DEFAULT_ROWS) -> np.ndarray:
    """Scores of an array detector over shard stores, in manifest order."""
    if not shards:
        raise ConfigError(f"detector '{det.method}' scores stored arrays: pass --shards")
    names = list(getattr(det, "score_requires", [r for r in det.requires if r != "model"]))
    sizes, has_index = _store_sizes_and_index(shards)
    n = sum(sizes)
    chunks = StoreChunks(shards, names, arrays, rows, extra=["index"] if has_index else [])
    if not has_index:
        parts = [np.asarray(det.score(c), dtype=np.float64) for c in chunks]
        return np.concatenate(parts) if parts else np.zeros(0)
    out = np.full(n, np.nan)
    seen = np.zeros(n, dtype=bool)
    for c in chunks:
        idx = np.asarray(c.pop("index"), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise StoreError(f"store 'index' values out of range 0..{n - 1} (min {idx.min()}, "
                             f"max {idx.max()}): pass every shard of the dataset to --shards")
        uniq, counts = np.unique(idx, return_counts=True)
        repeated = np.concatenate([idx[seen[idx]], uniq[counts > 1]])
        if repeated.size:
            raise StoreError(f"store 'index' lists sample {int(repeated[0])} more than once "
                             f"(overlapping or repeated shards in --shards)")
        out[idx] = np.asarray(det.score(c), dtype=np.float64)
        seen[idx] = True
    if not seen.all():
        raise StoreError(f"stores do not cover samples {np.flatnonzero(~seen)[:5].tolist()}...")
    return out


def compute_params(params: dict | None) -> dict:
    out = merge_params(params, COMPUTE_KEYS, "score --params")
    for key in ("mean", "std"):
        if out[key] is None:
            raise ConfigError(f"score --params: '{key}' (input normalization) is required for "
                              f"model-pass detectors")
    return out


def score_model_pass(det: Detector, model_path, data_dir, params: dict | None) -> np.ndarray:
    """Scores of a model-pass detector (ODIN, BATS) over a prepared dataset, manifest order."""
    if not model_path or not data_dir:
        raise ConfigError(f"detector '{det.method}' runs the model: pass --model and --data-dir")
    from ..data.loader import num_samples
    from ..job import batch_source, open_model
    from ..runtime import progress

    p = compute_params(params)
    device, model, _ = open_model(model_path, p)
    if hasattr(det, "set_input_normalization"):
        det.set_input_normalization(p["mean"], p["std"])
    n = num_samples(data_dir)
    out = np.full(n, np.nan)
    seen = np.zeros(n, dtype=bool)
    batches = batch_source(data_dir, None, p, device, where="score --params")()
    for x, _y, rows in progress(f"score {det.method} {data_dir}", batches, n):
        rows = np.asarray(rows.cpu() if hasattr(rows, "cpu") else rows, dtype=np.int64)
        s = det.score_batch(model, x.to(device))
        out[rows] = s.detach().cpu().double().numpy() if hasattr(s, "detach") else np.asarray(s)
        seen[rows] = True
    if not seen.all():
        raise DataError(f"{data_dir}: the loader did not yield samples {np.flatnonzero(~seen)[:5].tolist()}")
    return out


def score_fitted(fitted, out, *, shards=None, model_path=None, data_dir=None, params=None,
                 mapping: dict[str, str] | None = None, rows: int = DEFAULT_ROWS) -> np.ndarray:
    from ..runtime import Timer

    det, meta = load_fitted(fitted)
    timer = Timer()
    with timer("score"):
        if det.needs_model:
            scores = score_model_pass(det, model_path, data_dir, params)
        else:
            arrays = {**meta.get("arrays", {}), **(mapping or {})}
            scores = score_arrays(det, shards, arrays, rows)
    if not np.all(np.isfinite(scores)):
        bad = np.flatnonzero(~np.isfinite(scores))
        raise NumericalError(f"detector '{meta['name']}' produced {bad.size} non-finite score(s), "
                             f"first at sample {int(bad[0])}")
    save_scores(out, scores)
    log.info("scored %d samples with %s in %.2fs -> %s", scores.shape[0], meta["name"],
             timer.totals["score"], out)
    return scores


# -- CLI -----------------------------------------------------------------------------------
def cmd_fit(args) -> None:
    from ..runtime import set_threads

    set_threads()
    fit_detector(args.method, args.params, args.train, args.out, name=args.name, space=args.space,
                 model_path=args.model, seed=args.seed, mapping=parse_map(args.map), rows=args.rows,
                 embedding=args.embedding, data_dir=args.data_dir, compute=args.compute)


def cmd_score(args) -> None:
    from ..runtime import set_threads

    set_threads()
    score_fitted(args.fitted, args.out, shards=args.shards, model_path=args.model,
                 data_dir=args.data_dir, params=args.params, mapping=parse_map(args.map),
                 rows=args.rows)
