"""Architectures behind one wrapper API.

Every classifier the workflow touches is a :class:`FeatureClassifier`: a native network
(``net``, so state-dict keys stay the native ones under a ``net.`` prefix) plus a
description of its forward pass as an ordered list of named *stages* and a final linear
``head``::

    x ─stage 1─▶ h1 ─stage 2─▶ … ─stage S (pooling/flatten)─▶ z (N×D) ─head─▶ f(x) (N×C)

``forward_features(x) = z`` is the penultimate representation used by the feature-space
detectors (ReAct, BATS, Mahalanobis, KNN, ViM), ``forward(x) = head(z)`` are the logits.
``forward_until(s, x)`` / ``forward_from(s, h)`` split the pass after stage ``s``
(GROOD's early-layer mixup, per-block gradient selections), so
``forward_from(s, forward_until(s, x)) == forward(x)`` for every stage ``s``.

Stages are stored as *data* (submodule paths and a few named operations) and resolved on
every call, so ``copy.deepcopy`` and ``torch.func.functional_call`` see one consistent
module tree.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

# --------------------------------------------------------------------------------------
# Stage operations that are not plain submodule calls.


def _op_flatten(net: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return torch.flatten(h, 1)


def _op_gap(net: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Global average pooling over the spatial dimensions, then flatten: N×C×H×W -> N×C."""
    return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)


def _op_gmp(net: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Global max pooling over the spatial dimensions, then flatten: N×C×H×W -> N×C."""
    return torch.flatten(F.adaptive_max_pool2d(h, 1), 1)


def _op_relu(net: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return F.relu(h)


def _op_vit_embed(net: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """ViT patch embedding + class token + position embedding (+ dropout), as in
    torchvision's ``VisionTransformer.forward`` and ``Encoder.forward``."""
    h = net._process_input(h)
    cls = net.class_token.expand(h.shape[0], -1, -1)
    h = torch.cat([cls, h], dim=1) + net.encoder.pos_embedding
    return net.encoder.dropout(h)


def _op_cls_token(net: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return h[:, 0]


OPS = {
    "@flatten": _op_flatten,
    "@gap": _op_gap,
    "@gmp": _op_gmp,
    "@relu": _op_relu,
    "@vit_embed": _op_vit_embed,
    "@cls_token": _op_cls_token,
}


@dataclass(frozen=True)
class Stage:
    """One split point: ``steps`` are submodule paths of ``net`` or ``@op`` names, run in
    order; ``params`` are the module/parameter paths whose parameters belong to the stage
    (defaults to the submodule steps)."""

    name: str
    steps: tuple[str, ...]
    params: tuple[str, ...] | None = None

    def param_paths(self) -> tuple[str, ...]:
        if self.params is not None:
            return self.params
        return tuple(s for s in self.steps if not s.startswith("@"))


class FeatureClassifier(nn.Module):
    """Uniform wrapper: logits, penultimate features, head, named stages, typical-set BN.

    Parameters
    ----------
    net: the native network (its own ``forward`` is not used).
    stages: ordered :class:`Stage` list; the last stage must output N×D features.
    head: path of the final ``nn.Linear`` (D -> C) inside ``net``.
    pre_head: paths of modules applied between features and head in ``forward`` only
        (dropout layers of torchvision classifiers; identity in eval mode).
    arch, arch_kwargs, in_channels: how to rebuild the model (saved in checkpoints).
    """

    def __init__(self, net: nn.Module, stages: list[Stage], head: str, *, arch: str,
                 in_channels: int, pre_head: tuple[str, ...] = (), arch_kwargs: dict | None = None):
        super().__init__()
        self.net = net
        self._stages = list(stages)
        self._head_path = head
        self._pre_head = tuple(pre_head)
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs or {})
        self.in_channels = int(in_channels)
        if not self._stages:
            raise ModelError(f"{arch}: no stages defined")
        names = [s.name for s in self._stages]
        if len(set(names)) != len(names):
            raise ModelError(f"{arch}: duplicate stage names {names}")
        if not isinstance(self.head, nn.Linear):
            raise ModelError(f"{arch}: head '{head}' is {type(self.head).__name__}, expected nn.Linear")

    # -- basic properties ---------------------------------------------------------------
    @property
    def head(self) -> nn.Linear:
        """The last layer, ``nn.Linear`` D -> C."""
        return self.net.get_submodule(self._head_path)

    @property
    def head_name(self) -> str:
        """Parameter-name prefix of the head in ``named_parameters()``."""
        return f"net.{self._head_path}"

    @property
    def num_classes(self) -> int:
        return int(self.head.out_features)

    @property
    def feature_dim(self) -> int:
        return int(self.head.in_features)

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self._stages]

    # -- forward passes -----------------------------------------------------------------
    def _run_step(self, step: str, h: torch.Tensor) -> torch.Tensor:
        if step.startswith("@"):
            return OPS[step](self.net, h)
        return self.net.get_submodule(step)(h)

    def _run_stages(self, stages, h: torch.Tensor) -> torch.Tensor:
        for st in stages:
            for step in st.steps:
                h = self._run_step(step, h)
        return h

    def _index(self, name: str) -> int:
        for i, s in enumerate(self._stages):
            if s.name == name:
                return i
        raise ModelError(f"{self.arch}: unknown stage '{name}'; stages: {', '.join(self.stage_names)}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features z(x), N×D (after pooling and flattening)."""
        return self._run_stages(self._stages, x)

    def logits_from_features(self, z: torch.Tensor) -> torch.Tensor:
        for p in self._pre_head:
            z = self.net.get_submodule(p)(z)
        return self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits f(x) = W z(x) + b, N×C."""
        return self.logits_from_features(self.forward_features(x))

    def forward_until(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Activations right after stage ``name``."""
        return self._run_stages(self._stages[: self._index(name) + 1], x)

    def forward_from(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """Logits from the activations ``h`` produced by stage ``name``."""
        z = self._run_stages(self._stages[self._index(name) + 1:], h)
        return self.logits_from_features(z)

    # -- parameters by stage --------------------------------------------------------------
    def stage_parameters(self, name: str) -> OrderedDict[str, nn.Parameter]:
        """Parameters owned by stage ``name`` (full names as in ``named_parameters()``)."""
        stage = self._stages[self._index(name)]
        prefixes = [f"net.{p}" for p in stage.param_paths()]
        out: OrderedDict[str, nn.Parameter] = OrderedDict()
        for pname, p in self.named_parameters():
            if any(pname == pre or pname.startswith(pre + ".") for pre in prefixes):
                out[pname] = p
        return out

    def head_parameters(self) -> OrderedDict[str, nn.Parameter]:
        pre = self.head_name + "."
        return OrderedDict((n, p) for n, p in self.named_parameters() if n.startswith(pre))

    # -- BN feeding the features -------------------------------------------------------
    def typical_set_bn_name(self) -> str | None:
        """Path (inside ``net``) of the BatchNorm whose output, after activation and
        pooling only, becomes the features; None when there is no such BN (ViT,
        LayerNorm models, or parametrized layers between the last BN and the head)."""
        last_bn, after_has_params = None, False
        seen: set[int] = set()
        for st in self._stages:
            for step in st.steps:
                if step.startswith("@"):
                    continue
                mod = self.net.get_submodule(step)
                for sub_name, sub in mod.named_modules(prefix=step):
                    if id(sub) in seen:
                        continue
                    seen.add(id(sub))
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        last_bn, after_has_params = sub_name, False
                    elif last_bn is not None and any(True for _ in sub.parameters(recurse=False)):
                        after_has_params = True
        if last_bn is None or after_has_params:
            return None
        return last_bn

    def typical_set_bn(self) -> nn.modules.batchnorm._BatchNorm | None:
        """The BatchNorm module feeding the features (BATS' typical set, Zhu et al. 2022)."""
        name = self.typical_set_bn_name()
        return None if name is None else self.net.get_submodule(name)

    def extra_repr(self) -> str:
        return (f"arch={self.arch!r}, num_classes={self.num_classes}, feature_dim={self.feature_dim}, "
                f"stages={self.stage_names}")


# --------------------------------------------------------------------------------------
# small_cnn: the demo network


class SmallCNN(nn.Module):
    """conv3×3-BN-ReLU blocks (max-pool 2×2 after all but the last), global pooling, linear
    head. Widths (32, 32, 64, 128) give 103,466 parameters for 1×28×28 inputs and 10
    classes (28 -> 14 -> 7 -> 3 pixels, so the last block sees the whole digit); any input
    size works thanks to the global pooling. PyTorch's default initialization: on MNIST-5k
    it trained to a higher test accuracy in 4-8 epochs than Kaiming fan-out
    initialization.

    ``pool`` is the global pooling of the last block's map h (C×H×W):
    ``"max"`` (default) z_c = max_{i,j} h_{c,i,j}; ``"avg"`` z_c = mean_{i,j} h_{c,i,j}.
    Max pooling makes the features a statement about the strongest local pattern, not
    about how much of the image is covered by patterns: with average pooling an image
    that is edge-dense everywhere (a texture, a photo) accumulates more class evidence
    than any centred digit, so its logits and energy exceed the ID ones and
    logit-based scores rank it as *more* in-distribution (on MNIST-5k, energy AUROC
    0.5-0.7 on textures and 0.2-0.6 on photos with ``"avg"`` against 0.96-0.99 with
    ``"max"``, same test accuracy; cf. Hein et al. 2019 on ReLU networks' growing
    confidence away from the data)."""

    POOLS = {"max": F.adaptive_max_pool2d, "avg": F.adaptive_avg_pool2d}

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths=(32, 32, 64, 128),
                 pool: str = "max"):
        super().__init__()
        if pool not in self.POOLS:
            raise ModelError(f"small_cnn: pool '{pool}' is not one of {sorted(self.POOLS)}")
        widths = tuple(int(w) for w in widths)
        c = in_channels
        for i, w in enumerate(widths):
            layers = [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            self.add_module(f"block{i + 1}", nn.Sequential(*layers))
            c = w
        self.num_blocks = len(widths)
        self.pool = pool
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        for i in range(self.num_blocks):
            x = getattr(self, f"block{i + 1}")(x)
        return self.fc(torch.flatten(self.POOLS[self.pool](x, 1), 1))


SMALL_CNN_WIDTHS = (32, 32, 64, 128)
SMALL_CNN_POOL = "max"


def small_cnn(num_classes: int, in_channels: int = 1, widths=SMALL_CNN_WIDTHS,
              pool: str = SMALL_CNN_POOL) -> FeatureClassifier:
    """:class:`SmallCNN` as a :class:`FeatureClassifier`: stages ``block1..blockK`` and
    ``pool`` (global ``pool`` pooling); ``arch_kwargs`` records the non-default options."""
    net = SmallCNN(num_classes, in_channels, widths, pool)
    stages = [Stage(f"block{i + 1}", (f"block{i + 1}",)) for i in range(net.num_blocks)]
    stages.append(Stage("pool", ("@gmp" if pool == "max" else "@gap",)))
    kwargs: dict = {} if tuple(widths) == SMALL_CNN_WIDTHS else {"widths": [int(w) for w in widths]}
    if pool != SMALL_CNN_POOL:
        kwargs["pool"] = pool
    return FeatureClassifier(net, stages, "fc", arch="small_cnn", in_channels=in_channels,
                             arch_kwargs=kwargs)


# --------------------------------------------------------------------------------------
# torchvision families


def _resnet_stages() -> list[Stage]:
    return [Stage("stem", ("conv1", "bn1", "relu", "maxpool")),
            *(Stage(f"layer{i}", (f"layer{i}",)) for i in range(1, 5)),
            Stage("pool", ("avgpool", "@flatten"))]


def resnet18_cifar(num_classes: int, in_channels: int = 3) -> FeatureClassifier:
    """CIFAR ResNet-18 (He et al. 2016 as used for CIFAR by the OOD papers): torchvision's
    ResNet-18 with a 3×3 stride-1 stem convolution and no max-pool, so 32×32 inputs keep
    32×32 resolution in layer1 (11,173,962 parameters for 10 classes)."""
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    return FeatureClassifier(net, _resnet_stages(), "fc", arch="resnet18_cifar", in_channels=in_channels)


def _classifier_tail(classifier: nn.Module, prefix: str) -> tuple[list[str], str, list[str]]:
    """Split a torchvision ``classifier`` (Linear or Sequential ending with Linear) into
    (steps before the features, head path, dropout paths between features and head)."""
    if isinstance(classifier, nn.Linear):
        return [], prefix, []
    if not isinstance(classifier, nn.Sequential) or not isinstance(classifier[-1], nn.Linear):
        raise ModelError(f"'{prefix}' does not end with nn.Linear")
    n = len(classifier)
    head = f"{prefix}.{n - 1}"
    j = n - 1
    while j > 0 and isinstance(classifier[j - 1], nn.Dropout):
        j -= 1
    pre_head = [f"{prefix}.{i}" for i in range(j, n - 1)]
    steps: list[str] = []
    flattened = False
    for i in range(j):
        m = classifier[i]
        if isinstance(m, nn.Flatten):
            flattened = True
        if isinstance(m, nn.Linear) and not flattened:
            steps.append("@flatten")
            flattened = True
        steps.append(f"{prefix}.{i}")
    return steps, head, pre_head


def wrap_torchvision(net: nn.Module, arch: str, arch_kwargs: dict | None = None) -> FeatureClassifier:
    """Describe a torchvision classifier as stages + head. Families: ResNet/ResNeXt/
    Wide-ResNet, DenseNet, MobileNetV2, VisionTransformer, and generic
    ``features + avgpool + classifier`` (EfficientNet, MobileNetV3, ConvNeXt, VGG) or
    ``children + avgpool + fc`` (RegNet) networks."""
    from torchvision import models as tvm

    kw = dict(arch=f"torchvision:{arch}", in_channels=3, arch_kwargs=arch_kwargs)
    if isinstance(net, tvm.ResNet):
        return FeatureClassifier(net, _resnet_stages(), "fc", **kw)
    if isinstance(net, tvm.DenseNet):
        feats = [n for n, _ in net.features.named_children()]
        stem = [f"features.{n}" for n in feats if n in ("conv0", "norm0", "relu0", "pool0")]
        rest = [n for n in feats if n not in ("conv0", "norm0", "relu0", "pool0")]
        stages = [Stage("stem", tuple(stem))]
        for n in rest:
            if n.startswith("norm") and stages[-1].name.startswith("denseblock"):
                # the final BN belongs to the last dense block's output
                last = stages.pop()
                stages.append(Stage(last.name, last.steps + (f"features.{n}",)))
            else:
                stages.append(Stage(n, (f"features.{n}",)))
        stages.append(Stage("pool", ("@relu", "@gap")))
        return FeatureClassifier(net, stages, "classifier", **kw)
    if isinstance(net, tvm.MobileNetV2):
        stages = [Stage(f"features{i}", (f"features.{i}",)) for i in range(len(net.features))]
        steps, head, pre = _classifier_tail(net.classifier, "classifier")
        stages.append(Stage("pool", ("@gap", *steps)))
        return FeatureClassifier(net, stages, head, pre_head=tuple(pre), **kw)
    if isinstance(net, tvm.VisionTransformer):
        embed_params = ("conv_proj", "class_token", "encoder.pos_embedding")
        stages = [Stage("embed", ("@vit_embed",), params=embed_params)]
        for i, (n, _) in enumerate(net.encoder.layers.named_children()):
            stages.append(Stage(f"block{i}", (f"encoder.layers.{n}",)))
        stages.append(Stage("norm", ("encoder.ln",)))
        pool = ["@cls_token"] + [f"heads.{n}" for n, _ in net.heads.named_children() if n != "head"]
        stages.append(Stage("pool", tuple(pool)))
        return FeatureClassifier(net, stages, "heads.head", **kw)
    children = dict(net.named_children())
    if {"features", "avgpool", "classifier"} <= set(children):
        stages = [Stage(f"features{n}", (f"features.{n}",)) for n, _ in net.features.named_children()]
        steps, head, pre = _classifier_tail(net.classifier, "classifier")
        stages.append(Stage("pool", ("avgpool", *steps, "@flatten")))
        return FeatureClassifier(net, stages, head, pre_head=tuple(pre), **kw)
    if {"avgpool", "fc"} <= set(children) and isinstance(children["fc"], nn.Linear):
        names = list(children)
        stages = []
        for n in names[: names.index("avgpool")]:
            child = children[n]
            if (isinstance(child, nn.Sequential) and len(child) > 1
                    and all(any(True for _ in c.children()) for c in child)):  # e.g. RegNet's trunk
                stages += [Stage(c, (f"{n}.{c}",)) for c, _ in child.named_children()]
            else:
                stages.append(Stage(n, (n,)))
        stages.append(Stage("pool", ("avgpool", "@flatten")))
        return FeatureClassifier(net, stages, "fc", **kw)
    raise ModelError(
        f"torchvision:{arch} ({type(net).__name__}) is not supported by the feature wrapper; "
        "supported families: ResNet/ResNeXt/Wide-ResNet, DenseNet, MobileNetV2, ViT, RegNet and "
        "features+avgpool+classifier networks (EfficientNet, MobileNetV3, ConvNeXt, VGG)")


def torchvision_net(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """Randomly initialized torchvision network (never downloads: weights=None)."""
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(f"unknown torchvision architecture '{arch}'; see torchvision.models.list_models()")
    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ModelError(f"torchvision:{arch}: cannot build with {kwargs} ({exc})") from exc


# --------------------------------------------------------------------------------------
# Registry


def build_model(arch: str, num_classes: int, in_channels: int = 3, **arch_kwargs) -> FeatureClassifier:
    """Randomly initialized :class:`FeatureClassifier` for ``arch``:
    ``small_cnn``, ``resnet18_cifar`` or ``torchvision:<name>``."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    if arch == "small_cnn":
        return small_cnn(num_classes, in_channels, **arch_kwargs)
    if arch == "resnet18_cifar":
        if arch_kwargs:
            raise ModelError(f"resnet18_cifar takes no options, got {sorted(arch_kwargs)}")
        return resnet18_cifar(num_classes, in_channels)
    if arch.startswith("torchvision:"):
        name = arch.split(":", 1)[1]
        if in_channels != 3:
            raise ModelError(f"{arch} expects 3 input channels, config has {in_channels} "
                             "(set data.channels: 3 or use small_cnn/resnet18_cifar)")
        return wrap_torchvision(torchvision_net(name, num_classes, **arch_kwargs), name, arch_kwargs)
    raise ModelError(f"unknown architecture '{arch}'; known: small_cnn, resnet18_cifar, torchvision:<name>")


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["FeatureClassifier", "Stage", "SmallCNN", "build_model", "count_parameters",
           "small_cnn", "resnet18_cifar", "wrap_torchvision", "torchvision_net"]
