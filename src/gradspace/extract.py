"""Per-shard forward pass -> embedding store.

For every batch one forward pass computes the penultimate features and the logits
together, ``z = model.forward_features(x)``, ``f = model.head(z) = W z + b`` (no second
pass), in ``torch.inference_mode``. The shard store (``gradspace.store.ShardWriter``) holds

    logits   N×C float32   f(x)
    features N×D float32   z(x)
    labels   N   int64     ID class, -1 for OOD
    preds    N   int64     argmax_c f_c(x)
    index    N   int64     row of the sample in the dataset's manifest

and attrs ``dataset``, ``role``, ``shard``, ``model``, ``n``, ``precision``, ``device``,
``hardware`` and ``timing`` (seconds, samples/s; CUDA-synchronized). Non-finite logits or
features raise :class:`NumericalError` naming the dataset, shard and manifest row, and no
store is written.

Precision: ``fp32`` (default); ``bf16`` runs the model under CUDA autocast to bfloat16
(outputs stored as float32); ``tf32`` enables TF32 matmuls/convolutions on CUDA. On CPU
both fall back to fp32.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .errors import ConfigError, NumericalError
from .params import Schema, merge_params
from .runtime import paused_iter

log = logging.getLogger(__name__)

ARRAYS = ("logits", "features", "labels", "preds", "index")
PRECISIONS = ("fp32", "bf16", "tf32")
DEFAULTS = {"batch_size": Schema("compute.batch_size"), "num_workers": Schema("compute.num_workers"),
            "device": Schema("compute.device"), "precision": Schema("compute.precision"),
            "mean": None, "std": None}


@contextlib.contextmanager
def precision_context(device, precision: str = "fp32"):
    """Autocast / TF32 settings for ``precision`` on ``device`` (restored afterwards)."""
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if device.type != "cuda" or precision == "fp32":
        if precision != "fp32":
            log.warning("precision=%s applies to CUDA only; running fp32 on %s", precision, device)
        yield
        return
    if precision == "bf16":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def effective_precision(device, precision: str) -> str:
    """The precision actually used: bf16/tf32 only on CUDA, fp32 otherwise."""
    return precision if device.type == "cuda" else "fp32"


class NonFinite(Exception):
    """Internal: position of the first non-finite value in a batch."""

    def __init__(self, array: str, row: int):
        super().__init__(array, row)
        self.array, self.row = array, row


def iter_extract(model, batches: Iterable, device, precision: str = "fp32",
                 timer=None, channels_last: bool = False) -> Iterator[dict]:
    """Yield one dict of numpy arrays (``ARRAYS``) per input batch ``(x, y, rows)``.
    ``channels_last`` feeds NHWC images (use with a model converted the same way).

    Raises :class:`NonFinite` (array name, manifest row) at the first NaN/inf."""
    import torch

    model.eval()
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            x, y, rows = next(it)
        except StopIteration:
            return
        if timer is not None:
            timer.totals["data"] = timer.totals.get("data", 0.0) + time.perf_counter() - t0
        ctx = timer("forward", device) if timer is not None else contextlib.nullcontext()
        with ctx, torch.inference_mode(), precision_context(device, precision):
            x = x.to(device, non_blocking=True)
            if channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            feats = model.forward_features(x)
            logits = model.head(feats)
            feats, logits = feats.float(), logits.float()
            preds = logits.argmax(1)
            out = {"logits": logits.cpu().numpy(), "features": feats.cpu().numpy(),
                   "labels": torch.as_tensor(y).to("cpu", torch.int64).numpy(),
                   "preds": preds.to("cpu", torch.int64).numpy(),
                   "index": torch.as_tensor(rows).to("cpu", torch.int64).numpy()}
        for name in ("logits", "features"):
            ok = np.isfinite(out[name]).all(axis=1)
            if not ok.all():
                raise NonFinite(name, int(out["index"][np.argmin(ok)]))
        yield out


def extract_arrays(model, batches: Iterable, device, precision: str = "fp32") -> dict:
    """Run ``model`` over ``batches`` of ``(x, y, rows)`` and return the concatenated arrays
    logits N×C f32, features N×D f32, labels/preds/index N i64 (small data, tests).
    NumericalError on NaN/inf."""
    parts: dict[str, list] = {k: [] for k in ARRAYS}
    try:
        for out in iter_extract(model, batches, device, precision):
            for k in ARRAYS:
                parts[k].append(out[k])
    except NonFinite as nf:
        raise NumericalError(f"non-finite {nf.array} at row {nf.row}") from None
    if not parts["logits"]:
        c, d = model.num_classes, model.feature_dim
        return {"logits": np.zeros((0, c), np.float32), "features": np.zeros((0, d), np.float32),
                **{k: np.zeros(0, np.int64) for k in ("labels", "preds", "index")}}
    return {k: np.concatenate(v) for k, v in parts.items()}


def _sample_id(data_dir: Path, row: int) -> str:
    """Manifest id of ``row`` for error messages (best effort)."""
    try:
        import pandas as pd

        df = pd.read_csv(data_dir / "manifest.csv", dtype={"id": str}, keep_default_na=False,
                         skiprows=range(1, row + 1), nrows=1)
        return f" (id '{df['id'].iloc[0]}')"
    except Exception:  # noqa: BLE001 - only decorates an error message
        return ""


def extract_shard(model_path, data_dir, shard: int, out, params: dict | None = None,
                  progress: bool = True) -> dict:
    """Write the embedding store of one shard; returns the store attrs."""
    import torch
    from tqdm.auto import tqdm

    from .data.loader import num_samples, read_info
    from .job import batch_source, open_model
    from .runtime import Timer, hardware_description, set_threads
    from .store import ShardWriter

    params = merge_params(params, DEFAULTS, "extract --params")
    if params["precision"] not in PRECISIONS:
        raise ConfigError(f"extract --params precision '{params['precision']}' is not one of "
                          f"{', '.join(PRECISIONS)}")
    set_threads()
    data_dir = Path(data_dir)
    info = read_info(data_dir)
    name = info.get("name", data_dir.name)
    where = f"dataset '{name}' ({data_dir}) shard {shard}"
    device, model, meta = open_model(model_path, params)
    model.to(memory_format=torch.channels_last)  # NHWC: faster convolutions on CPU and GPU
    if int(info.get("channels", model.in_channels)) != model.in_channels:
        from .errors import ModelError

        raise ModelError(f"{where} has {info['channels']} channels but model {model_path} takes "
                         f"{model.in_channels}")
    n = num_samples(data_dir, shard)
    c, d = model.num_classes, model.feature_dim
    batches = batch_source(data_dir, shard, params, device, normalized=False)()
    timer = Timer()
    attrs = {"dataset": name, "role": info.get("role"), "shard": int(shard),
             "model": str(model_path), "arch": model.arch, "n": n, "num_classes": c,
             "feature_dim": d, "precision": effective_precision(device, params["precision"]),
             "precision_requested": params["precision"], "device": str(device),
             "hardware": hardware_description(device), "batch_size": int(params["batch_size"])}
    bar = tqdm(total=n, desc=f"extract {name}/{shard}", unit="img", unit_scale=True,
               disable=not progress, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    t_start = time.perf_counter()
    from .data.manifest import shard_layout

    with ShardWriter(out, n_rows=n, attrs=attrs, layout=shard_layout(data_dir, shard, info)) as w:
        w.create("logits", (n, c), "float32")
        w.create("features", (n, d), "float32")
        for k in ("labels", "preds", "index"):
            w.create(k, (n,), "int64")
        pos = 0
        try:
            parts = iter_extract(model, batches, device, params["precision"], timer, channels_last=True)
            for part in paused_iter("extract", parts):
                m = part["logits"].shape[0]
                if pos + m > n:
                    raise NumericalError(f"{where}: loader yielded more than the {n} rows of the shard")
                t0 = time.perf_counter()
                for k in ARRAYS:
                    w.write(k, pos, part[k])
                timer.totals["write"] = timer.totals.get("write", 0.0) + time.perf_counter() - t0
                pos += m
                bar.update(m)
        except NonFinite as nf:
            raise NumericalError(f"non-finite {nf.array} in {where}, manifest row {nf.row}"
                                 f"{_sample_id(data_dir, nf.row)} (model {model_path}); "
                                 "no store written") from None
        finally:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t_start
        w.attrs["timing"] = {"seconds": seconds, "samples_per_s": n / seconds if seconds > 0 else None,
                             **{f"{k}_s": v for k, v in timer.totals.items()}}
    log.info("extracted %s: %d samples in %.2fs (%.0f samples/s) -> %s", where, n, seconds,
             n / max(seconds, 1e-9), out)
    return attrs
