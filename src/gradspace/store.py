"""Zarr v3 shard stores.

A store is a Zarr v3 group directory written by exactly one job. Writes go to a
temporary sibling directory that is renamed into place only after every array is
complete and the completion record is written, so an interrupted job never leaves a
store that looks complete. Readers validate the completion record and shapes before
they trust a store, and ``load_arrays`` gives lazy dask views concatenated over shards.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import zarr

from .errors import StoreError

FORMAT_KEY = "gradspace"
FORMAT_VERSION = 1


def _tmp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class ShardWriter:
    """Write one store atomically.

    >>> with ShardWriter(path, n_rows=100, attrs={...}) as w:
    ...     w.create("logits", (100, 10), "float32")
    ...     w.write("logits", 0, batch)
    """

    def __init__(self, path: str | os.PathLike, n_rows: int, attrs: dict | None = None,
                 chunk_rows: int = 4096):
        self.path = Path(path)
        self.n_rows = int(n_rows)
        self.attrs = dict(attrs or {})
        self.chunk_rows = max(1, int(chunk_rows))
        self._tmp: Path | None = None
        self._group = None
        self._written: dict[str, int] = {}

    def __enter__(self) -> ShardWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _tmp_sibling(self.path)
        self._group = zarr.open_group(str(self._tmp), mode="w", zarr_format=3)
        return self

    @property
    def group(self):
        return self._group

    def create(self, name: str, shape: Sequence[int], dtype, chunks: Sequence[int] | None = None):
        shape = tuple(int(s) for s in shape)
        if shape and shape[0] != self.n_rows:
            raise StoreError(
                f"{self.path}: array '{name}' has {shape[0]} rows, store expects {self.n_rows}")
        if chunks is None:
            chunks = (min(self.chunk_rows, max(1, shape[0])),) + shape[1:] if shape else ()
        self._group.create_array(name, shape=shape, dtype=dtype, chunks=tuple(chunks),
                                 fill_value=0)
        self._written[name] = 0
        return self._group[name]

    def write(self, name: str, start: int, values) -> None:
        values = np.asarray(values)
        arr = self._group[name]
        stop = start + values.shape[0]
        if stop > arr.shape[0]:
            raise StoreError(f"{self.path}: write past the end of '{name}' ({stop} > {arr.shape[0]})")
        arr[start:stop] = values
        self._written[name] += values.shape[0]

    def put(self, name: str, values, chunks: Sequence[int] | None = None) -> None:
        """Create an array and write all of it at once (small arrays)."""
        values = np.asarray(values)
        self.create(name, values.shape, values.dtype, chunks)
        if values.size:
            self._group[name][...] = values
        self._written[name] = values.shape[0] if values.ndim else 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                return
            incomplete = {k: v for k, v in self._written.items()
                          if self._group[k].ndim and self._group[k].shape[0] == self.n_rows
                          and v != self.n_rows}
            if incomplete:
                raise StoreError(f"{self.path}: arrays not fully written: {incomplete}")
            attrs = dict(self.attrs)
            attrs[FORMAT_KEY] = {
                "complete": True,
                "version": FORMAT_VERSION,
                "n": self.n_rows,
                "arrays": {k: list(self._group[k].shape) for k in self._written},
            }
            self._group.attrs.update(attrs)
            if self.path.exists():
                shutil.rmtree(self.path)
            os.replace(self._tmp, self.path)
            self._tmp = None
        finally:
            if self._tmp is not None and self._tmp.exists():
                shutil.rmtree(self._tmp, ignore_errors=True)


def open_store(path: str | os.PathLike, require: Iterable[str] = ()):
    """Open a store read-only after checking that it is complete and consistent."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"store {path} does not exist")
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        meta = dict(group.attrs).get(FORMAT_KEY)
    except Exception as exc:  # noqa: BLE001 - zarr raises many types for broken metadata
        raise StoreError(f"store {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    if not meta or not meta.get("complete"):
        raise StoreError(f"store {path} is incomplete (no completion record); delete it and rerun")
    for name, shape in meta.get("arrays", {}).items():
        if name not in group:
            raise StoreError(f"store {path} lacks array '{name}' listed in its completion record")
        if list(group[name].shape) != list(shape):
            raise StoreError(f"store {path}: array '{name}' has shape {group[name].shape}, "
                             f"record says {shape}")
    for name in require:
        if name not in group:
            raise StoreError(f"store {path} has no array '{name}' (has: {sorted(meta['arrays'])})")
    return group


def verify_store(path: str | os.PathLike) -> None:
    """Read every chunk of every array so truncated/corrupt chunk files are detected."""
    group = open_store(path)
    for name in group.array_keys():
        arr = group[name]
        try:
            step = arr.chunks[0] if arr.ndim else 1
            for start in range(0, max(arr.shape[0] if arr.ndim else 1, 1), step):
                np.asarray(arr[start:start + step] if arr.ndim else arr[...])
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"store {path}: array '{name}' is corrupt ({exc})") from exc


def store_attrs(path: str | os.PathLike) -> dict:
    return dict(open_store(path).attrs)


def load_arrays(paths: Sequence[str | os.PathLike], names: Iterable[str]) -> dict:
    """Lazy dask arrays for ``names``, concatenated over the shard stores in ``paths``."""
    import dask.array as da

    names = list(names)
    parts: dict[str, list] = {n: [] for n in names}
    for p in paths:
        g = open_store(p, require=names)
        for n in names:
            parts[n].append(da.from_zarr(g[n]))
    if not paths:
        raise StoreError("no shard stores given")
    return {n: da.concatenate(v, axis=0) for n, v in parts.items()}


def iter_chunks(paths: Sequence[str | os.PathLike], names: Iterable[str], rows: int = 8192):
    """Yield dicts of numpy arrays, at most ``rows`` rows each, over all shards in order.

    Memory is bounded by ``rows`` whatever the number of samples."""
    names = list(names)
    for p in paths:
        g = open_store(p, require=names)
        n = g[names[0]].shape[0]
        for start in range(0, n, rows):
            yield {k: np.asarray(g[k][start:start + rows]) for k in names}
