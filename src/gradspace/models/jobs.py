"""CLI: ``gradspace train``, ``gradspace load-model``, ``gradspace model-card``.

Every command writes a normalized checkpoint / JSON atomically; the later rules always
read ``results/<exp>/model/model.pt`` whichever way the model was obtained.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ..errors import ConfigError, DataError
from ..params import merge_params

log = logging.getLogger(__name__)

TRAIN_PARAM_KEYS = {"arch", "arch_kwargs", "num_classes", "in_channels", "image_size", "mean", "std",
                    "train", "compute"}
COMPUTE_KEYS = {"device", "num_workers"}
LOAD_PARAM_KEYS = {"arch", "arch_kwargs", "num_classes", "in_channels", "weights", "image_size"}


def with_compute(params: dict, compute: dict) -> dict:
    """Merge --compute (runtime settings) under params['compute']; params win."""
    merged = {k: v for k, v in compute.items() if k in COMPUTE_KEYS}
    merged.update(params.get("compute") or {})
    return {**params, "compute": merged} if merged else dict(params)


def _check_keys(params: dict, known: set, where: str) -> None:
    merge_params(params, {}, where, optional=known)


def train_command(data_dir: str, params: dict, seed: int, out: str, log_json: str | None = None,
                  progress: bool = True) -> dict:
    """Train ``params['arch']`` on the prepared ID-train set in ``data_dir``; save ``out``."""
    import torch

    from ..data.loader import iter_batches, num_samples, read_info
    from ..runtime import hardware_description, resolve_device, set_threads
    from .architectures import build_model
    from .load import save_model, write_json_atomic
    from .train import TrainSettings, train_model

    _check_keys(params, TRAIN_PARAM_KEYS, "train --params")
    compute = dict(params.get("compute") or {})
    _check_keys(compute, COMPUTE_KEYS, "train --params compute")
    settings = TrainSettings.from_dict(params.get("train"), "train --params train")
    info = read_info(data_dir)
    num_classes = params.get("num_classes") or info.get("num_classes")
    if not num_classes:
        raise ConfigError("train: num_classes is neither in --params nor in "
                          f"{Path(data_dir) / 'info.json'}")
    if info.get("num_classes") and int(info["num_classes"]) != int(num_classes):
        raise DataError(f"{Path(data_dir) / 'info.json'} has num_classes={info['num_classes']} but "
                        f"data.id.num_classes = {num_classes}")
    in_channels = int(params.get("in_channels") or info.get("channels") or 3)
    set_threads()
    device = resolve_device(compute.get("device", "auto"))
    torch.manual_seed(int(seed))
    model = build_model(params.get("arch", "small_cnn"), int(num_classes), in_channels,
                        **dict(params.get("arch_kwargs") or {}))
    n = num_samples(data_dir)
    steps = math.ceil(n / settings.batch_size)
    mean, std = params.get("mean"), params.get("std")

    def batches(epoch: int):
        return iter_batches(data_dir, shard=None, batch_size=settings.batch_size, shuffle=True,
                            seed=int(seed) + epoch, num_workers=int(compute.get("num_workers", 0)),
                            mean=mean, std=std, device=device, image_size=params.get("image_size"),
                            channels=in_channels)

    log.info("training %s (%d classes) on %s: %d samples, %d epochs, device %s",
             model.arch, model.num_classes, data_dir, n, settings.epochs, device)
    hist = train_model(model, batches, steps, settings, seed=int(seed), device=device,
                       mean=mean, std=std, progress=progress)
    training = {"settings": settings.to_dict(), "seed": int(seed), "n_train": n,
                "data_dir": str(data_dir), "history": hist["epochs"], "seconds": hist["seconds"],
                "samples_per_s": hist["samples_per_s"], "steps": hist["steps"],
                "device": str(device), "hardware": hardware_description(device),
                "torch": torch.__version__}
    meta = {"source": "train", "training": training,
            "data": {"image_size": params.get("image_size"), "mean": mean, "std": std}}
    save_model(out, model.cpu(), meta)
    if log_json:
        write_json_atomic(log_json, training)
    return training


def load_model_command(source: str, params: dict, out: str) -> dict:
    """Normalize ``torchvision:<arch>`` / ``checkpoint:<path>`` into ``out``."""
    from .load import resolve_source, save_model

    _check_keys(params, LOAD_PARAM_KEYS, "load-model --params")
    model, meta = resolve_source(source, params)
    meta = {**meta, "source": source}
    if params.get("image_size"):
        meta["data"] = {"image_size": params["image_size"]}
    save_model(out, model, meta)
    log.info("normalized %s (%s, %d classes, feature dim %d) -> %s", source, model.arch,
             model.num_classes, model.feature_dim, out)
    return meta


def model_card_command(model: str, shards: list[str], out: str) -> dict:
    from .card import model_card
    from .load import write_json_atomic

    card = model_card(model, shards)
    write_json_atomic(out, card)
    acc = card["id_test"]["accuracy"]
    log.info("model card %s: %s, %d parameters, ID test accuracy %s", out, card["arch"],
             card["parameters"]["total"], "n/a" if acc is None else f"{acc:.4f}")
    return card
