"""Model card: what the model is and how well it classifies the ID test set.

ID test accuracy = (1/N) Σ_i 1[argmax_c f_c(x_i) = y_i] over the ID-test samples with a
label (y ≥ 0), computed from the ``preds`` / ``labels`` arrays of the id_test embedding
stores (streamed chunk by chunk, so memory does not grow with N).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence


def id_accuracy(shard_paths: Sequence[str]) -> dict:
    """{"n", "correct", "accuracy"} from the preds/labels arrays of the stores."""
    from ..errors import StoreError
    from ..store import iter_chunks

    if not shard_paths:
        raise StoreError("model card: no id_test shard stores given")
    n = correct = 0
    for chunk in iter_chunks(list(shard_paths), ["preds", "labels"]):
        labelled = chunk["labels"] >= 0
        n += int(labelled.sum())
        correct += int((chunk["preds"][labelled] == chunk["labels"][labelled]).sum())
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None}


def model_card(model_path: str, shard_paths: Sequence[str]) -> dict:
    """The card as a JSON-ready dict."""
    import torch

    from ..runtime import hardware_description
    from .architectures import count_parameters
    from .load import load_model

    model, meta = load_model(model_path, torch.device("cpu"))
    total = count_parameters(model)
    head = count_parameters(model.head)
    card = {
        "model": str(model_path),
        "arch": model.arch,
        "source": meta.get("source", "train"),
        "num_classes": model.num_classes,
        "in_channels": model.in_channels,
        "feature_dim": model.feature_dim,
        "parameters": {"total": total, "head": head, "body": total - head},
        "stages": model.stage_names,
        "typical_set_bn": model.typical_set_bn_name(),
        "id_test": {**id_accuracy(shard_paths), "shards": [str(p) for p in shard_paths]},
        "num_parameters": total,
        "hardware": hardware_description(),
        "software": {"python": platform.python_version(), "torch": torch.__version__},
    }
    card["id_accuracy"] = card["id_test"]["accuracy"]  # fraction, read by metrics/report
    for key in ("weights", "weights_file", "checkpoint_file"):
        if key in meta:
            card[key] = meta[key]
    if "training" in meta:
        tr = meta["training"]
        last = (tr.get("history") or [{}])[-1]
        card["training"] = {
            "settings": tr.get("settings"), "seed": tr.get("seed"), "n_train": tr.get("n_train"),
            "seconds": tr.get("seconds"), "samples_per_s": tr.get("samples_per_s"),
            "final_loss": last.get("loss"), "final_train_accuracy": last.get("accuracy"),
            "hardware": tr.get("hardware"), "device": tr.get("device"),
        }
    return card
