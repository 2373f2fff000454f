"""Zarr v3 shard stores.

A store is a Zarr v3 group directory written by exactly one job. Writes go to a
temporary sibling directory that is renamed into place only after every array is
complete and the completion record is written, so an interrupted job never leaves a
store that looks complete. Readers validate the completion record and shapes before
they trust a store, and ``load_arrays`` gives lazy dask views concatenated over shards.

Corruption (a truncated, lost or overwritten chunk file, flipped bits) is never read as
data, at two costs:

* the completion record lists every file of the store with its size and CRC-32
  (``files``); ``open_store`` stats the files on every open (cheap: a few files per
  array) and refuses a store with a missing or resized file;
* every chunk carries a CRC-32C (Zarr's ``crc32c`` codec after zstd), checked by Zarr
  whenever a chunk is decoded, so flipped bits fail the read that meets them;
* ``verify_store`` / ``verify_stores`` (``gradspace verify-stores``) compare every file's
  CRC-32 with the record and decode every chunk; with ``--remove`` they delete the broken
  stores so that the next ``snakemake`` run rebuilds exactly those (and reruns what
  depends on them).

Per-shard stores also record their dataset's shard layout (``layout``: dataset, shard,
number of shards, manifest rows), and ``check_shard_set`` refuses shard stores of one
dataset written under different ``data.shards`` settings.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import zarr

from .errors import StoreError
from .files import tmp_sibling

FORMAT_KEY = "gradspace"
FORMAT_VERSION = 1
LAYOUT_KEY = "layout"
VERIFY_HINT = ("run `gradspace verify-stores {root} --remove`, then snakemake with the "
               "`--forcerun <removed stores>` it prints to rebuild them")


def checksum_compressors():
    """zstd (Zarr's default) followed by a CRC-32C of each chunk, verified on every decode."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return (ZstdCodec(level=0), Crc32cCodec())


def _crc32(path: Path, block: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_record(root: str | os.PathLike) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} of every file under ``root`` except the group's own
    ``zarr.json`` (which holds the record). Written into the completion record."""
    root = Path(root)
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel != "zarr.json":
                out[rel] = [p.stat().st_size, _crc32(p)]
    return dict(sorted(out.items()))


def _results_root(path: Path) -> str:
    """The results/<experiment> directory above ``path`` (for messages), else its parent."""
    parts = path.parts
    if "results" in parts:
        i = len(parts) - 1 - parts[::-1].index("results")
        if i + 1 < len(parts):
            return str(Path(*parts[: i + 2]))
    return str(path.parent)


def corrupt(path: Path, what: str) -> StoreError:
    """A StoreError for a corrupt store, naming it and how to rebuild it."""
    return StoreError(f"store {path} is corrupt: {what}; "
                      + VERIFY_HINT.format(root=_results_root(Path(path))))


class ShardWriter:
    """Write one store atomically.

    >>> with ShardWriter(path, n_rows=100, attrs={...}) as w:
    ...     w.create("logits", (100, 10), "float32")
    ...     w.write("logits", 0, batch)
    """

    def __init__(self, path: str | os.PathLike, n_rows: int, attrs: dict | None = None,
                 chunk_rows: int = 4096, layout: dict | None = None):
        self.path = Path(path)
        self.n_rows = int(n_rows)
        self.attrs = dict(attrs or {})
        if layout is not None:  # see gradspace.data.manifest.shard_layout
            self.attrs[LAYOUT_KEY] = dict(layout)
        self.chunk_rows = max(1, int(chunk_rows))
        self._tmp: Path | None = None
        self._group = None
        self._written: dict[str, int] = {}

    def __enter__(self) -> ShardWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = tmp_sibling(self.path)
        self._group = zarr.open_group(str(self._tmp), mode="w", zarr_format=3)
        return self

    @property
    def group(self):
        return self._group

    def create(self, name: str, shape: Sequence[int], dtype, chunks: Sequence[int] | None = None,
               compress: bool = True):
        """An empty array; ``compress=False`` keeps only the CRC-32C (bulk float data whose
        size should be exactly its bytes, e.g. the P-long normalization statistics)."""
        shape = tuple(int(s) for s in shape)
        if shape and shape[0] != self.n_rows:
            raise StoreError(
                f"{self.path}: array '{name}' has {shape[0]} rows, store expects {self.n_rows}")
        if chunks is None and shape:
            n = max(1, shape[0])
            rows = min(self.chunk_rows, n)
            if not compress:  # equal chunks: an uncompressed edge chunk is stored padded
                rows = -(-n // -(-n // rows))
            chunks = (rows,) + shape[1:]
        elif chunks is None:
            chunks = ()
        codecs = checksum_compressors() if compress else checksum_compressors()[1:]
        self._group.create_array(name, shape=shape, dtype=dtype, chunks=tuple(chunks),
                                 fill_value=0, compressors=codecs)
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

    def put(self, name: str, values, chunks: Sequence[int] | None = None, compress: bool = True) -> None:
        """Create an array and write all of it at once (small arrays)."""
        values = np.asarray(values)
        self.create(name, values.shape, values.dtype, chunks, compress)
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
                "files": file_record(self._tmp),
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
    check_files(path, meta, checksums=False)
    return group


def check_files(path: Path, meta: dict, checksums: bool = False) -> bool:
    """Compare the store's files with its completion record: presence and size (one stat
    per file), and with ``checksums`` their CRC-32 (reads every byte). Raises a
    StoreError naming the first bad file; False when the store has no file record
    (written before records existed), True otherwise."""
    files = meta.get("files")
    if files is None:
        return False
    for rel, (size, crc) in files.items():
        f = Path(path) / rel
        try:
            got = f.stat().st_size
        except FileNotFoundError:
            raise corrupt(path, f"file {rel} is missing") from None
        if got != size:
            raise corrupt(path, f"file {rel} has {got} bytes, its completion record says {size} "
                                "(truncated or overwritten)")
        if checksums and _crc32(f) != crc:
            raise corrupt(path, f"file {rel} fails its CRC-32 check (content changed)")
    return True


def verify_store(path: str | os.PathLike, checksums: bool = True, decode: bool = True) -> bool:
    """Check one store completely: completion record, shapes, file sizes, and (default)
    every file's CRC-32 against the record and every chunk decoded (its CRC-32C).
    Raises a StoreError naming the store; returns whether it had a file record."""
    path = Path(path)
    group = open_store(path)
    recorded = check_files(path, dict(group.attrs)[FORMAT_KEY], checksums=checksums)
    if not decode:
        return recorded
    for name in group.array_keys():
        arr = group[name]
        try:
            step = arr.chunks[0] if arr.ndim else 1
            for start in range(0, max(arr.shape[0] if arr.ndim else 1, 1), step):
                np.asarray(arr[start:start + step] if arr.ndim else arr[...])
        except Exception as exc:  # noqa: BLE001
            raise corrupt(path, f"array '{name}' cannot be decoded ({type(exc).__name__}: {exc})") from exc
    return recorded


def quick_check(path: str | os.PathLike) -> None:
    """Cheapest check of a finished store, without Zarr: the completion record exists and
    every recorded file is present with its recorded size. StoreError otherwise."""
    path = Path(path)
    try:
        meta = json.loads((path / "zarr.json").read_text())["attributes"][FORMAT_KEY]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"store {path} is incomplete or unreadable (no completion record: "
                         f"{type(exc).__name__}); "
                         + VERIFY_HINT.format(root=_results_root(path))) from None
    if not meta.get("complete"):
        raise StoreError(f"store {path} is incomplete; " + VERIFY_HINT.format(root=_results_root(path)))
    check_files(path, meta)


def find_stores(root: str | os.PathLike) -> list[Path]:
    """Every finished store under ``root``: a ``*.zarr`` directory holding a ``zarr.json``
    (temporary siblings ``.name.tmp-*`` of running or killed jobs are skipped; stores
    nested inside a store are not visited)."""
    out = []
    for dirpath, dirs, _files in os.walk(root):
        keep = []
        for d in sorted(dirs):
            if d.startswith(".") and ".tmp-" in d:
                continue
            if d.endswith(".zarr"):
                out.append(Path(dirpath) / d)
            else:
                keep.append(d)
        dirs[:] = keep
    return out


def verify_stores(root: str | os.PathLike, full: bool = True) -> list[tuple[Path, str]]:
    """(store, problem) for every broken store under ``root``. ``full``: checksums and
    decoding (reads everything); otherwise sizes only (``quick_check``)."""
    bad = []
    for store in find_stores(root):
        try:
            if full:
                verify_store(store)
            else:
                quick_check(store)
        except StoreError as exc:
            bad.append((store, str(exc)))
    return bad


# -- shard layouts ----------------------------------------------------------------------------

def check_shard_set(paths: Sequence[str | os.PathLike], expected: int | None = None) -> None:
    """Refuse shard stores of one dataset that do not form one consistent layout.

    Uses the ``layout`` attrs that per-shard writers record (dataset, shard, shards, rows,
    n): all stores must name the same dataset and manifest (same number of shards and
    rows), be given in shard order 0..K-1 with K = the number of stores (and ``expected``
    when given), and their row ranges must tile the manifest. Stores without a layout
    (written by other stages or older versions) are not checked."""
    layouts = []
    for p in paths:
        lay = dict(open_store(p).attrs).get(LAYOUT_KEY)
        if lay is not None:
            layouts.append((Path(p), lay))
    if not layouts:
        return
    first_path, first = layouts[0]
    name = first.get("dataset")
    hint = ("the stores were written under a different shard setting (data.shards, "
            "data.id.shards or data.ood.<name>.shards) than the one asked for now; rerun "
            "the dataset's preparation and everything after it, e.g. "
            f"`snakemake --forcerun {first.get('data_dir') or 'prepare'}`")
    for p, lay in layouts:
        if lay.get("dataset") != name:
            raise StoreError(f"shard stores of different datasets mixed: {first_path} is "
                             f"'{name}', {p} is '{lay.get('dataset')}'")
        if (lay.get("shards"), lay.get("n")) != (first.get("shards"), first.get("n")):
            raise StoreError(f"inconsistent shard counts for dataset '{name}': {first_path} was "
                             f"written for {first.get('shards')} shards of {first.get('n')} rows, "
                             f"{p} for {lay.get('shards')} shards of {lay.get('n')} rows; {hint}")
    found = int(first["shards"])
    if expected is None:  # inside the workflow: the config's count ($GRADSPACE_SHARDS)
        from .params import expected_shards

        expected = expected_shards(name)
    want = len(paths) if expected is None else int(expected)
    if found != want or (len(layouts) == len(paths) and found != len(paths)):
        raise StoreError(f"inconsistent shard counts for dataset '{name}': expected {want} shard "
                         f"store(s), found {len(paths)} written for a {found}-shard manifest "
                         f"({first_path} ...); {hint}")
    pos = {str(Path(p)): i for i, p in enumerate(paths)}
    for p, lay in layouts:
        if int(lay["shard"]) != pos[str(p)]:
            raise StoreError(f"dataset '{name}': store {p} holds shard {lay['shard']} but is given "
                             f"as shard {pos[str(p)]} of {len(paths)}; {hint}")
    if len(layouts) == len(paths):
        stop = 0
        for p, lay in layouts:
            a, b = (int(x) for x in lay["rows"])
            if a != stop:
                raise StoreError(f"dataset '{name}': store {p} starts at manifest row {a}, "
                                 f"expected {stop}; {hint}")
            stop = b
        if stop != int(first["n"]):
            raise StoreError(f"dataset '{name}': the shard stores cover {stop} of "
                             f"{first['n']} manifest rows; {hint}")


def store_attrs(path: str | os.PathLike) -> dict:
    return dict(open_store(path).attrs)


def load_arrays(paths: Sequence[str | os.PathLike], names: Iterable[str]) -> dict:
    """Lazy dask arrays for ``names``, concatenated over the shard stores in ``paths``."""
    import dask.array as da

    names = list(names)
    parts: dict[str, list] = {n: [] for n in names}
    if len(paths) > 1:
        check_shard_set(paths)
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
    if len(paths) > 1:
        check_shard_set(paths)
    for p in paths:
        g = open_store(p, require=names)
        n = g[names[0]].shape[0]
        for start in range(0, n, rows):
            yield read_rows(g, p, names, start, start + rows)


def read_rows(group, path, names, start: int, stop: int) -> dict:
    """numpy rows start:stop of ``names``; a chunk that fails to decode (CRC-32C mismatch,
    truncated zstd frame) is a StoreError naming the store, never data."""
    try:
        return {k: np.asarray(group[k][start:stop]) for k in names}
    except Exception as exc:  # noqa: BLE001 - zarr/codec errors for corrupt chunks
        raise corrupt(Path(path), f"rows {start}..{stop - 1} of {names} cannot be decoded "
                                  f"({type(exc).__name__}: {exc})") from exc
