"""File-backed sources: images stay where they are and are decoded at load time.

- ``imagefolder``: ``path`` to a class-per-folder tree (torchvision.datasets.folder
  conventions: classes = sorted sub-folder names, files in sorted walk order, extensions
  ``IMG_EXTENSIONS``), e.g. ImageNet, iNaturalist, SUN, Places, Textures. ``split`` picks
  a sub-folder (``path/<split>``), e.g. ``{"id_train": "train", "id_test": "val"}``.
  Manifest ``index`` = position in that file list, ``id`` = path relative to the tree.
- ``cifar10`` / ``cifar100``: torchvision's python-pickle format under ``root``
  (``cifar-10-batches-py/`` resp. ``cifar-100-python/``), ``split`` train | test.
- ``svhn``: torchvision's ``{train,test,extra}_32x32.mat`` under ``root``.

Nothing is ever downloaded (``download=False``). All kinds take ``crop_fraction``
(0.875): at load time an image that is not already image_size² is resized so its shorter
side is round(image_size / crop_fraction) (256 for 224) and centre-cropped to image_size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .sources import Catalog, Source, register_source


class FileSource(Source):
    backend = "file"

    def read(self, index):  # pragma: no cover - file sources are never copied
        raise NotImplementedError("file-backed sources are read by gradspace.data.loader")

    @staticmethod
    def opener(spec: dict):
        """A picklable callable (index, id) -> PIL.Image for the loader."""
        raise NotImplementedError


@register_source
class ImageFolderSource(FileSource):
    kind = "imagefolder"
    options = {"path": None, "crop_fraction": 0.875}

    def root(self) -> Path:
        if not self.opts.get("path"):
            raise ConfigError(f"dataset '{self.ctx.name}': source kind 'imagefolder' needs option 'path'")
        base = Path(self.opts["path"]).expanduser()
        if not base.is_dir():
            raise self.missing("path", base)
        root = base / self.split if self.split else base
        if not root.is_dir():
            raise self.missing("split", root, f"'{base}' has no sub-folder '{self.split}'")
        return root

    def catalog(self) -> Catalog:
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        root = self.root()
        try:
            classes, class_to_idx = find_classes(str(root))
            samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS,
                                   allow_empty=True)
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"dataset '{self.ctx.name}': cannot list image folder {root}: {exc}") from exc
        if not samples:
            raise DataError(f"dataset '{self.ctx.name}': image folder {root} contains no images "
                            f"with extensions {IMG_EXTENSIONS}")
        start = len(str(root)) + 1
        ids = np.asarray([p[start:] for p, _ in samples], dtype=object)
        labels = np.asarray([c for _, c in samples], dtype=np.int64)
        index = np.arange(len(samples), dtype=np.int64)
        return Catalog(index=index, ids=ids, labels=labels, num_classes=len(classes),
                       class_names=list(classes),
                       description=f"image folder {root} ({len(classes)} classes)",
                       extra={"root": str(root.resolve())})

    def resolved_spec(self) -> dict:
        out = super().resolved_spec()
        out["path"] = str(Path(self.opts["path"]).expanduser().resolve())
        out["root"] = str(self.root().resolve())
        return out

    @staticmethod
    def opener(spec):
        return FolderOpener(spec["root"])


class FolderOpener:
    def __init__(self, root: str):
        self.root = root

    def __call__(self, index: int, ident: str):
        from PIL import Image

        path = os.path.join(self.root, ident)
        try:
            img = Image.open(path)
            img.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"cannot read image {path} (manifest index {index}): {exc}") from exc
        return img


# ----------------------------------------------------------------------------------------
# torchvision on-disk formats
# ----------------------------------------------------------------------------------------
class _TorchvisionSource(FileSource):
    options = {"root": None, "crop_fraction": 0.875}
    default_splits = {"id_train": "train", "id_test": "test", "ood": "test"}
    SPLITS: tuple = ("train", "test")

    def expected_files(self, root: Path) -> list[Path]:
        raise NotImplementedError

    def check(self) -> Path:
        if not self.opts.get("root"):
            raise ConfigError(f"dataset '{self.ctx.name}': source kind '{self.kind}' needs option 'root'")
        if self.split not in self.SPLITS:
            raise ConfigError(f"dataset '{self.ctx.name}': {self.kind} split must be one of "
                              f"{list(self.SPLITS)}, got '{self.split}'")
        root = Path(self.opts["root"]).expanduser()
        if not root.is_dir():
            raise self.missing("root", root, f"expected {self.kind} in torchvision's format there "
                               f"(file {self.expected_files(root)[0]}); nothing is downloaded")
        for f in self.expected_files(root):
            if not f.exists():
                raise self.missing("root", f, f"expected {self.kind} in torchvision's format "
                                   "under root; nothing is downloaded")
        return root

    def catalog(self) -> Catalog:
        self.check()
        ds = open_torchvision(self.kind, self.opts["root"], self.split)
        labels = np.asarray(ds.labels if self.kind == "svhn" else ds.targets, dtype=np.int64)
        index = np.arange(labels.shape[0], dtype=np.int64)
        classes = list(getattr(ds, "classes", [])) or [str(i) for i in range(10)]
        return Catalog(index=index, ids=np.char.add(f"{self.kind}/{self.split}/", index.astype(str))
                       .astype(object), labels=labels, num_classes=len(classes), class_names=classes,
                       description=f"{self.kind} {self.split} split from {self.opts['root']}")

    def resolved_spec(self) -> dict:
        out = super().resolved_spec()
        out["root"] = str(Path(self.opts["root"]).expanduser().resolve())
        return out

    @staticmethod
    def opener(spec):
        return TorchvisionOpener(spec["kind"], spec["root"], spec["split"])


def open_torchvision(kind: str, root: str, split: str):
    """Open a torchvision dataset object without downloading; errors become DataError."""
    import torchvision.datasets as tvd

    try:
        if kind == "cifar10":
            return tvd.CIFAR10(root, train=split == "train", download=False)
        if kind == "cifar100":
            return tvd.CIFAR100(root, train=split == "train", download=False)
        if kind == "svhn":
            return tvd.SVHN(root, split=split, download=False)
    except (RuntimeError, OSError, ValueError) as exc:
        raise DataError(f"{kind} under root {root} (split {split}) is unreadable or corrupt: {exc}") from exc
    raise ConfigError(f"unknown torchvision dataset kind '{kind}'")


class TorchvisionOpener:
    """Opens the torchvision dataset once per process (lazily, so workers load it themselves)."""

    def __init__(self, kind: str, root: str, split: str):
        self.kind, self.root, self.split = kind, root, split
        self._ds = None

    def __getstate__(self):
        return {"kind": self.kind, "root": self.root, "split": self.split, "_ds": None}

    def __call__(self, index: int, ident: str):
        from PIL import Image

        if self._ds is None:
            self._ds = open_torchvision(self.kind, self.root, self.split)
        arr = self._ds.data[index]
        if self.kind == "svhn":
            arr = np.transpose(arr, (1, 2, 0))
        return Image.fromarray(arr)


@register_source
class Cifar10Source(_TorchvisionSource):
    kind = "cifar10"

    def expected_files(self, root):
        from torchvision.datasets import CIFAR10

        names = [f for f, _ in (CIFAR10.train_list if self.split == "train" else CIFAR10.test_list)]
        return [root / CIFAR10.base_folder / f for f in names]


@register_source
class Cifar100Source(_TorchvisionSource):
    kind = "cifar100"

    def expected_files(self, root):
        from torchvision.datasets import CIFAR100

        names = [f for f, _ in (CIFAR100.train_list if self.split == "train" else CIFAR100.test_list)]
        return [root / CIFAR100.base_folder / f for f in names]


@register_source
class SvhnSource(_TorchvisionSource):
    kind = "svhn"
    SPLITS = ("train", "test", "extra")

    def expected_files(self, root):
        return [root / f"{self.split}_32x32.mat"]
