"""Loading prepared datasets in batches (training, extraction, model-pass detectors).

    from gradspace.data.loader import iter_batches, num_samples, read_info
    for x, y, rows in iter_batches(data_dir, shard=0, batch_size=256, mean=m, std=s):
        ...   # x float32 N×C×H×W, y int64 (-1 for OOD), rows int64 manifest positions

Normalization: x = (u / 255 − mean_c) / std_c for uint8 pixel u in channel c; with
mean=None, std=None x = u / 255. Pixels travel as uint8 and are normalized on
``device``.

Array-backed datasets read whole batches as row slices of ``images.zarr``. With
``shuffle`` the zarr row chunks that make up the selection are visited in a seeded
random order and mixed in a shuffle buffer of ``shuffle_buffer`` rows (default: 128 MiB
of pixels, at least 4 batches), so memory stays bounded; when the selection fits in the
buffer (all demo sets do) the permutation is uniform. File-backed datasets (imagefolder, CIFAR, SVHN)
decode images in a torch DataLoader with ``num_workers`` workers: an image that is not
already image_size² is resized (bilinear, antialiased) so its shorter side is
round(image_size / crop_fraction) and centre-cropped (256 → 224 for ImageNet).

Runs are deterministic given ``seed``; pass seed + epoch for a new order per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError, StoreError
from .manifest import IMAGES, check_prepared, read_info, read_manifest

__all__ = ["iter_batches", "num_samples", "read_info", "check_prepared"]

SEED_TAG_SHUFFLE = 303


def num_samples(data_dir, shard: int | None = None) -> int:
    """Number of samples of the dataset, or of one shard."""
    info = read_info(data_dir)
    if shard is None:
        return int(info["n"])
    _check_shard(data_dir, info, shard)
    shards = read_manifest(data_dir)["shard"].to_numpy()
    return int(np.count_nonzero(shards == shard))


def _check_shard(data_dir, info: dict, shard: int) -> None:
    from .manifest import check_shard_request

    check_shard_request(data_dir, info, shard)


def _norm_stats(name: str, values, channels: int, default: float):
    import torch

    if values is None:
        values = [default]
    v = torch.as_tensor(list(values) if not np.isscalar(values) else [values], dtype=torch.float32)
    if v.ndim != 1 or v.numel() not in (1, channels):
        raise DataError(f"{name} has {v.numel()} values but the dataset has {channels} channels")
    if name == "std" and bool((v <= 0).any()):
        raise DataError(f"std must be positive, got {v.tolist()}")
    return v.expand(channels).reshape(1, channels, 1, 1).clone()


def iter_batches(data_dir, shard: int | None = None, batch_size: int = 256, shuffle: bool = False,
                 seed: int = 0, num_workers: int = 0, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, device=None, image_size: int | None = None,
                 channels: int | None = None, shuffle_buffer: int | None = None
                 ) -> Iterator[tuple]:
    """Yield (x float32 N×C×H×W normalized, y int64 N, rows int64 N) over a prepared dataset.

    ``shard=None`` means all shards; ``rows`` are positions in manifest order. If
    ``image_size`` / ``channels`` are given they must match ``info.json``.
    """
    import torch

    data_dir = Path(data_dir)
    info = read_info(data_dir)
    for key, want in (("image_size", image_size), ("channels", channels)):
        if want is not None and int(info[key]) != int(want):
            raise DataError(f"{data_dir / 'info.json'}: {key}={info[key]} but the caller expects "
                            f"{key}={want}; re-run `gradspace prepare` with matching data settings")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    df = read_manifest(data_dir)
    if len(df) != int(info["n"]):
        raise DataError(f"manifest {data_dir / 'manifest.csv'} has {len(df)} rows but info.json "
                        f"says n={info['n']}")
    c = int(info["channels"])
    dev = torch.device(device) if device is not None else torch.device("cpu")
    mean_t = _norm_stats("mean", mean, c, 0.0).to(dev)
    std_t = _norm_stats("std", std, c, 1.0).to(dev)
    labels = torch.from_numpy(df["label"].to_numpy(dtype=np.int64, copy=True))

    if shard is None:
        start, stop = 0, len(df)
    else:
        _check_shard(data_dir, info, shard)
        where = np.flatnonzero(df["shard"].to_numpy() == shard)
        if where.size == 0 or where[-1] - where[0] + 1 != where.size:
            raise DataError(f"manifest {data_dir / 'manifest.csv'}: shard {shard} is not one "
                            "contiguous block of rows")
        start, stop = int(where[0]), int(where[-1]) + 1

    if info["backend"] == "array":
        batches = _array_batches(data_dir, info, start, stop, batch_size, shuffle, seed,
                                 shuffle_buffer)
    else:
        batches = _file_batches(data_dir, info, df, start, stop, batch_size, shuffle, seed,
                                num_workers, pin=dev.type == "cuda")
    for u8, rows in batches:
        x = u8.to(dev, non_blocking=True).float().div_(255.0).sub_(mean_t).div_(std_t)
        yield x, labels[rows].to(dev), rows.to(dev)


# ----------------------------------------------------------------------------------------
# array-backed: images.zarr
# ----------------------------------------------------------------------------------------
def _array_batches(data_dir, info, start, stop, batch_size, shuffle, seed, shuffle_buffer):
    import torch

    from ..store import open_store

    try:
        arr = open_store(data_dir / IMAGES, require=["images"])["images"]
    except StoreError as exc:
        raise DataError(str(exc)) from exc
    s, c = int(info["image_size"]), int(info["channels"])
    if tuple(arr.shape[1:]) != (s, s, c) or arr.shape[0] != int(info["n"]):
        raise DataError(f"{data_dir / IMAGES}: images have shape {arr.shape}, info.json says "
                        f"({info['n']}, {s}, {s}, {c})")

    def read(a: int, b: int) -> np.ndarray:
        try:
            return np.asarray(arr[a:b])
        except Exception as exc:  # noqa: BLE001 - zarr/codec errors for corrupt chunks
            raise DataError(f"{data_dir / IMAGES}: cannot read rows {a}..{b - 1} "
                            f"({type(exc).__name__}: {exc})") from exc

    def emit(images: np.ndarray, rows: np.ndarray):
        return (torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2),
                torch.from_numpy(rows))

    if not shuffle:
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            yield emit(read(a, b), np.arange(a, b, dtype=np.int64))
        return

    chunk = int(arr.chunks[0])
    edges = np.unique(np.clip(np.r_[start, np.arange((start // chunk + 1) * chunk, stop, chunk), stop],
                              start, stop))
    blocks = np.stack([edges[:-1], edges[1:]], axis=1)
    rng = np.random.default_rng([int(seed) % (2**32), SEED_TAG_SHUFFLE])
    blocks = blocks[rng.permutation(len(blocks))]
    row_bytes = s * s * c
    cap = shuffle_buffer or max(4 * batch_size, (128 << 20) // row_bytes)
    cap = max(int(cap), batch_size)

    pend_x = np.zeros((0, s, s, c), dtype=np.uint8)
    pend_r = np.zeros(0, dtype=np.int64)
    i = 0
    while i < len(blocks):
        parts_x, parts_r, have = [pend_x], [pend_r], pend_r.size
        while i < len(blocks) and have < cap:
            a, b = (int(v) for v in blocks[i])
            parts_x.append(read(a, b))
            parts_r.append(np.arange(a, b, dtype=np.int64))
            have += b - a
            i += 1
        buf_x, buf_r = np.concatenate(parts_x), np.concatenate(parts_r)
        perm = rng.permutation(buf_r.size)
        buf_x, buf_r = buf_x[perm], buf_r[perm]
        full = (buf_r.size // batch_size) * batch_size if i < len(blocks) else buf_r.size
        for a in range(0, full, batch_size):
            b = min(a + batch_size, full)
            yield emit(buf_x[a:b], buf_r[a:b])
        pend_x, pend_r = buf_x[full:], buf_r[full:]
    if pend_r.size:
        yield emit(pend_x, pend_r)


# ----------------------------------------------------------------------------------------
# file-backed: images decoded lazily in a DataLoader
# ----------------------------------------------------------------------------------------
class FileDataset:
    """Map-style dataset over manifest rows [start, stop) of a file-backed source.

    Item i -> (uint8 C×S×S tensor, manifest row). Unreadable images raise DataError
    naming the file.
    """

    def __init__(self, opener, index, ids, rows, image_size: int, channels: int,
                 crop_fraction: float):
        self.opener, self.index, self.ids, self.rows = opener, index, ids, rows
        self.size, self.channels = int(image_size), int(channels)
        self.resize_to = max(self.size, round(self.size / float(crop_fraction)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        img = self.opener(int(self.index[i]), str(self.ids[i]))
        try:
            img = img.convert("L" if self.channels == 1 else "RGB")
            if img.size != (self.size, self.size):
                img = TF.resize(img, self.resize_to, interpolation=InterpolationMode.BILINEAR,
                                antialias=True)
                img = TF.center_crop(img, [self.size, self.size])
            return TF.pil_to_tensor(img), int(self.rows[i])
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot decode image '{self.ids[i]}' (manifest row {self.rows[i]}): "
                            f"{exc}") from exc


def _file_batches(data_dir, info, df, start, stop, batch_size, shuffle, seed, num_workers, pin):
    import torch
    from torch.utils.data import DataLoader

    from .sources import get_source

    spec = info["source"]
    source_cls = get_source(spec["kind"])
    ds = FileDataset(source_cls.opener(spec), df["index"].to_numpy()[start:stop],
                     df["id"].to_numpy()[start:stop], np.arange(start, stop, dtype=np.int64),
                     info["image_size"], info["channels"], spec.get("crop_fraction", 0.875))
    gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
    loader = DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,
                        num_workers=int(num_workers), pin_memory=pin, drop_last=False)
    it = iter(loader)
    while True:
        try:
            u8, rows = next(it)
        except StopIteration:
            return
        except DataError as exc:
            raise DataError(_worker_message(str(exc))) from None
        yield u8, rows.to(torch.int64)


def _worker_message(msg: str) -> str:
    """DataLoader workers wrap errors in a traceback; keep the original one-line message."""
    if not msg.startswith("Caught "):
        return msg
    for line in reversed(msg.strip().splitlines()):
        if "DataError: " in line:
            return line.split("DataError: ", 1)[1]
    return msg
