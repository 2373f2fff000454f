"""Model sources, the normalized checkpoint format, and atomic save/load.

Sources (``model.source`` in the config):

* ``torchvision:<arch>`` — torchvision architecture, weights read **only** from the local
  cache ``$TORCH_HOME/hub/checkpoints/<file>`` (``torch.hub.get_dir()``; TORCH_HOME
  defaults to ``~/.cache/torch``). The file name is the last part of the Weights enum's
  URL (``ResNet50_Weights.IMAGENET1K_V1`` -> ``resnet50-0676ba61.pth``). Nothing is ever
  downloaded; a missing file is a :class:`ModelError` naming the expected path.
* ``checkpoint:<path>`` — a gradspace checkpoint, or a raw state dict (optionally under a
  ``state_dict``/``model`` key, optionally with DataParallel ``module.`` prefixes) plus the
  config's ``model.arch``.

Normalized checkpoint (``model.pt``), written atomically by :func:`save_model`::

    {"format": "gradspace-model", "version": 1, "arch": str, "num_classes": int,
     "in_channels": int, "arch_kwargs": dict, "state_dict": {...}, "meta": {...}}
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .. import files
from ..errors import ModelError

FORMAT = "gradspace-model"
VERSION = 1


# --------------------------------------------------------------------------------------
# atomic writes


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    files.write_json_atomic(path, obj, indent=2, sort_keys=False)


# --------------------------------------------------------------------------------------
# torchvision weights from the local cache


def torchvision_weights(arch: str, weights: str | None = None):
    """The torchvision Weights enum member for ``arch`` (default ``IMAGENET1K_V1``, the
    weights the papers used, else the first member)."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"torchvision:{arch}: unknown architecture or no pretrained weights "
                         f"({exc})") from exc
    members = list(enum)
    if not members:
        raise ModelError(f"torchvision:{arch} has no pretrained weights in torchvision")
    if weights is None:
        names = [m.name for m in members]
        return members[names.index("IMAGENET1K_V1")] if "IMAGENET1K_V1" in names else members[0]
    name = weights.split(".")[-1]
    try:
        return enum[name]
    except KeyError:
        raise ModelError(f"torchvision:{arch}: unknown weights '{weights}'; "
                         f"choose one of {[m.name for m in members]}") from None


def torchvision_cache_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_weights_path(arch: str, weights: str | None = None) -> Path:
    member = torchvision_weights(arch, weights)
    return torchvision_cache_dir() / os.path.basename(member.url)


_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def load_torchvision(arch: str, weights: str | None = None):
    """A :class:`FeatureClassifier` for ``torchvision:<arch>`` with cached pretrained weights.

    Returns (model, meta); meta records the weights enum member, file and URL."""
    from .architectures import torchvision_net, wrap_torchvision

    member = torchvision_weights(arch, weights)
    path = torchvision_cache_dir() / os.path.basename(member.url)
    if not path.is_file():
        raise ModelError(
            f"torchvision:{arch}: pretrained weights {type(member).__name__}.{member.name} not found at "
            f"{path}. Downloads are disabled: fetch {member.url} on a machine with internet access "
            f"and place it at exactly that path (or point TORCH_HOME to a directory whose "
            f"hub/checkpoints/ holds it).")
    kwargs = {}
    min_size = member.meta.get("min_size")
    if arch.startswith("vit_") and min_size and min_size[0] != 224:
        kwargs["image_size"] = int(min_size[0])
    num_classes = len(member.meta.get("categories") or []) or 1000
    model = wrap_torchvision(torchvision_net(arch, num_classes, **kwargs), arch, kwargs)
    state = _torch_load(path)
    if arch.startswith("densenet"):
        state = {(_DENSENET_OLD_KEY.sub(r"\1\2", k)): v for k, v in state.items()}
    load_state_into(model, state, str(path))
    meta = {"source": f"torchvision:{arch}", "weights": f"{type(member).__name__}.{member.name}",
            "weights_file": str(path), "weights_url": member.url}
    return model, meta


# --------------------------------------------------------------------------------------
# state dicts and checkpoints


def _torch_load(path: Path) -> dict:
    import torch

    if not Path(path).is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors come in many types
        raise ModelError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ModelError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict / state dict")
    return obj


_CIFAR_ALIASES = (("shortcut.", "downsample."), ("linear.", "fc."))


def _normalize_keys(state: dict, expected: set[str]) -> dict:
    """Map common key spellings onto the wrapper's ``net.``-prefixed keys."""
    out = {}
    for k, v in state.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k not in expected and f"net.{k}" in expected:
            k = f"net.{k}"
        if k not in expected:
            alt = k if k.startswith("net.") else f"net.{k}"
            for a, b in _CIFAR_ALIASES:
                alt = alt.replace(a, b)
            if alt in expected:
                k = alt
        out[k] = v
    return out


def load_state_into(model, state: dict, source: str) -> None:
    """Strictly load ``state`` into ``model``; any missing/unexpected key or shape
    mismatch is a ModelError naming ``source`` and the first mismatching key."""
    import torch

    own = model.state_dict()
    state = _normalize_keys({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, set(own))
    for k in own:
        if k not in state:
            raise ModelError(f"checkpoint {source} does not match {model.arch}: first mismatching key "
                             f"'{k}' is missing from the checkpoint")
        if tuple(state[k].shape) != tuple(own[k].shape):
            raise ModelError(f"checkpoint {source} does not match {model.arch}: first mismatching key "
                             f"'{k}' has shape {tuple(state[k].shape)} in the checkpoint, "
                             f"model expects {tuple(own[k].shape)}")
    extra = [k for k in state if k not in own]
    if extra:
        raise ModelError(f"checkpoint {source} does not match {model.arch}: first mismatching key "
                         f"'{extra[0]}' is not a parameter/buffer of the model")
    model.load_state_dict(state, strict=True)


def _infer_num_classes(state: dict, model_probe) -> int | None:
    """Number of classes from the head weight in a raw state dict."""
    own = set(model_probe.state_dict())
    state = _normalize_keys(state, own)
    w = state.get(f"{model_probe.head_name}.weight")
    return None if w is None else int(w.shape[0])


def load_checkpoint_source(path: str | os.PathLike, arch: str | None = None,
                           in_channels: int | None = None, num_classes: int | None = None,
                           arch_kwargs: dict | None = None):
    """Model from ``checkpoint:<path>``: a gradspace checkpoint, or a raw state dict
    whose architecture is ``arch`` (the config's ``model.arch``)."""
    from .architectures import build_model

    path = Path(path)
    obj = _torch_load(path)
    if obj.get("format") == FORMAT or {"arch", "state_dict"} <= set(obj):
        try:
            model = build_model(obj["arch"], int(obj["num_classes"]), int(obj.get("in_channels", 3)),
                                **dict(obj.get("arch_kwargs") or {}))
        except KeyError as exc:
            raise ModelError(f"checkpoint {path} lacks key {exc}") from exc
        load_state_into(model, obj["state_dict"], str(path))
        meta = dict(obj.get("meta") or {})
        return model, meta
    state = obj
    for key in ("state_dict", "model", "net"):
        if isinstance(obj.get(key), dict):
            state = obj[key]
            break
    if not arch:
        raise ModelError(f"checkpoint {path} is a raw state dict; set model.arch to its architecture")
    in_channels = 3 if in_channels is None else int(in_channels)
    probe = build_model(arch, int(num_classes or 2), in_channels, **dict(arch_kwargs or {}))
    found = _infer_num_classes(state, probe)
    if found is None:
        raise ModelError(f"checkpoint {path} does not match {arch}: first mismatching key "
                         f"'{probe.head_name}.weight' is missing from the checkpoint")
    model = build_model(arch, found, in_channels, **dict(arch_kwargs or {}))
    load_state_into(model, state, str(path))
    return model, {}


def resolve_source(source: str, params: dict | None = None):
    """(model, meta) for ``torchvision:<arch>`` or ``checkpoint:<path>``.

    ``params`` keys: ``arch`` (raw state dicts), ``in_channels``, ``num_classes``
    (checked against the head), ``weights`` (torchvision enum member), ``arch_kwargs``."""
    params = dict(params or {})
    if source.startswith("torchvision:"):
        model, meta = load_torchvision(source.split(":", 1)[1], params.get("weights"))
    elif source.startswith("checkpoint:"):
        path = source.split(":", 1)[1]
        model, meta = load_checkpoint_source(path, params.get("arch"), params.get("in_channels"),
                                             params.get("num_classes"), params.get("arch_kwargs"))
        meta = {**meta, "source": source, "checkpoint_file": str(Path(path).resolve())}
    else:
        raise ModelError(f"model source '{source}' is not 'torchvision:<arch>' or 'checkpoint:<path>'")
    if params.get("num_classes") is not None:
        check_num_classes(model, int(params["num_classes"]), source)
    if params.get("in_channels") is not None and int(params["in_channels"]) != model.in_channels:
        raise ModelError(f"mismatched model and config: {source} takes {model.in_channels} input "
                         f"channels, config data.channels = {params['in_channels']}")
    return model, meta


def check_num_classes(model, expected: int, source: str = "model") -> None:
    """ModelError when the head's class count differs from ``data.id.num_classes``."""
    if model.num_classes != int(expected):
        raise ModelError(f"mismatched model and config: {source} has {model.num_classes} output classes "
                         f"(head {model.head_name}), config data.id.num_classes = {expected}")


def save_model(path: str | os.PathLike, model, meta: dict | None = None) -> None:
    """Write the normalized checkpoint atomically (temp file + rename); tensors on CPU.
    ``meta`` is stored as plain JSON values (it is read back with weights_only=True)."""
    import torch

    ckpt = {
        "format": FORMAT, "version": VERSION, "arch": model.arch, "num_classes": model.num_classes,
        "in_channels": model.in_channels, "arch_kwargs": dict(model.arch_kwargs),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        # plain JSON types only (str subclasses such as torch.__version__ would not unpickle
        # under weights_only=True)
        "meta": json.loads(json.dumps(dict(meta or {}), default=str)),
    }
    with files.atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_model(path: str | os.PathLike, device=None):
    """(model in eval mode on ``device``, meta). meta = the saved ``meta`` plus ``arch``,
    ``num_classes``, ``in_channels``, ``feature_dim`` and ``path``."""
    from .architectures import build_model

    path = Path(path)
    obj = _torch_load(path)
    if obj.get("format") != FORMAT:
        raise ModelError(f"{path} is not a gradspace checkpoint (normalize it with "
                         f"`gradspace load-model --source checkpoint:{path}`)")
    try:
        model = build_model(obj["arch"], int(obj["num_classes"]), int(obj["in_channels"]),
                            **dict(obj.get("arch_kwargs") or {}))
    except KeyError as exc:
        raise ModelError(f"checkpoint {path} lacks key {exc}") from exc
    load_state_into(model, obj["state_dict"], str(path))
    if device is not None:
        model = model.to(device)
    model.eval()
    meta = {**dict(obj.get("meta") or {}), "arch": model.arch, "num_classes": model.num_classes,
            "in_channels": model.in_channels, "feature_dim": model.feature_dim, "path": str(path)}
    return model, meta
