"""Models: one wrapper API over every architecture, sources, checkpoints, training, card.

    from gradspace.models import load_model, save_model, count_parameters
    model, meta = load_model("results/x/model/model.pt", device)   # eval mode
    model(x)                      # logits N×C
    model.forward_features(x)     # penultimate features N×D
    model.head                    # nn.Linear D -> C
    model.stage_names; model.forward_until(name, x); model.forward_from(name, h)
    model.typical_set_bn()        # BN feeding the features, or None

Names are imported lazily so that ``gradspace --help`` does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FeatureClassifier": "architectures",
    "Stage": "architectures",
    "build_model": "architectures",
    "count_parameters": "architectures",
    "wrap_torchvision": "architectures",
    "load_model": "load",
    "save_model": "load",
    "resolve_source": "load",
    "check_num_classes": "load",
    "load_torchvision": "load",
    "load_checkpoint_source": "load",
    "torchvision_weights_path": "load",
    "TrainSettings": "train",
    "train_model": "train",
    "model_card": "card",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
