"""The set-up every model-running job shares: the device, the model, the batches.

One home for it (issue 11): ``open_model`` resolves ``options["device"]`` (``auto``: CUDA
when present) and loads the normalized checkpoint in eval mode; ``batch_source`` checks
that the options carry the model's input normalization and returns a function that
starts a fresh pass over one shard (or the whole dataset) of a prepared data directory,
with the options' batch size and loader workers. Options are the merged ``--params`` of
the job (``gradspace.params.merge_params``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from .errors import ConfigError


def open_model(model_path, options: Mapping):
    """``(device, model, meta)``: the job's device and its model on it, in eval mode."""
    from .models import load_model
    from .runtime import resolve_device

    device = resolve_device(options["device"])
    model, meta = load_model(model_path, device)
    return device, model.eval(), meta


def batch_source(data_dir, shard: int | None, options: Mapping, device, shuffle: bool = False,
                 seed: int = 0, where: str = "--params", normalized: bool = True
                 ) -> Callable[[], Iterator[tuple]]:
    """A function returning a fresh iterator of ``(x, y, rows)`` batches over ``shard``
    (``None``: the whole dataset) of ``data_dir``, normalized with the options' mean/std
    (required unless ``normalized`` is False: then missing ones leave the pixels as
    prepared) and placed on ``device``."""
    from .data.loader import iter_batches

    if normalized and (options.get("mean") is None or options.get("std") is None):
        raise ConfigError(f"{where} needs 'mean' and 'std' (the input normalization of the model)")

    def start():
        return iter_batches(data_dir, shard=shard, batch_size=int(options["batch_size"]), shuffle=shuffle,
                            seed=int(seed), num_workers=int(options["num_workers"]), mean=options["mean"],
                            std=options["std"], device=device)

    return start
