"""Atomic outputs of the subspace stage: Zarr v3 groups with one array per parameter block
(bases, partial products) and small ``.npz`` files (statistics partial sums).

Groups are written into a temporary sibling and renamed into place after the completion
record of :mod:`gradspace.store` is written, so ``gradspace.store.open_store`` validates
them and an interrupted job leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr

from ..errors import StoreError
from ..files import tmp_sibling, write_bytes_atomic
from ..store import FORMAT_KEY, FORMAT_VERSION, checksum_compressors, file_record, open_store
from .layout import ParamLayout


@contextlib.contextmanager
def atomic_group(path, attrs: dict | None = None):
    """Yield a writable Zarr v3 group; rename it to ``path`` with a completion record on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    try:
        yield group
        meta = dict(attrs or {})
        meta.update(dict(group.attrs))
        arrays = {k: list(group[k].shape) for k in group.array_keys()}
        meta[FORMAT_KEY] = {"complete": True, "version": FORMAT_VERSION, "n": meta.get("n", 0),
                            "arrays": arrays, "files": file_record(tmp)}
        group.attrs.update(meta)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def put_array(group, name: str, values: np.ndarray, chunk_bytes: int = 1 << 25) -> None:
    """Create and fill an array; row chunks of about ``chunk_bytes`` (32 MiB).

    Floating-point arrays (bases, partials, statistics, Krylov records: the bulk of the
    subspace stage's bytes) are stored without zstd, with the per-chunk CRC-32C only: zstd
    gains little on float data (7-35% here, depending on how many exact zeros the
    gradients have), costs more CPU than the write itself (about 100 MB/s per core), and
    makes the bytes a stage writes depend on the data, where `gradspace plan` states them
    exactly (P x K' x 4 bytes for V). Integer arrays (sample indices) keep zstd."""
    values = np.asarray(values)
    if values.ndim:
        row_bytes = max(1, int(np.prod(values.shape[1:], dtype=np.int64)) * values.itemsize)
        n = max(1, values.shape[0])
        rows = min(n, max(1, chunk_bytes // row_bytes))
        rows = -(-n // -(-n // rows))  # equal chunks: an uncompressed edge chunk is stored padded
        chunks = (rows,) + values.shape[1:]
    else:
        chunks = ()
    codecs = checksum_compressors()
    if np.issubdtype(values.dtype, np.floating):
        codecs = codecs[1:]  # CRC-32C only
    arr = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=chunks, fill_value=0,
                              compressors=codecs)
    if values.size:
        arr[...] = values


def save_npz(path, **arrays) -> None:
    """np.savez to a temporary sibling, then rename."""
    write_bytes_atomic(path, lambda fh: np.savez(fh, **arrays))


def load_npz(path, require=()) -> dict:
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - numpy raises many types for broken files
        raise StoreError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from exc
    for k in require:
        if k not in out:
            raise StoreError(f"{path} lacks '{k}' (has: {sorted(out)})")
    return out


def json_scalar(value) -> np.ndarray:
    return np.array(json.dumps(value))


def read_json_scalar(arr) -> dict:
    return json.loads(str(np.asarray(arr)))


# -- block-array groups -------------------------------------------------------------------

def block_key(prefix: str, block: str) -> str:
    return f"{prefix}.{block}"


def write_blocks(group, prefix: str, blocks: dict[str, np.ndarray], dtype=None) -> None:
    for b, arr in blocks.items():
        put_array(group, block_key(prefix, b), arr if dtype is None else np.asarray(arr, dtype=dtype))


def open_blocks(path, kind: str | tuple[str, ...] | None = None):
    """Open a block group written by this stage; return (group, attrs, layout)."""
    group = open_store(path)
    attrs = dict(group.attrs)
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and attrs.get("kind") not in kinds:
        raise StoreError(f"{path}: expected a {' or '.join(kinds)} store, found kind "
                         f"'{attrs.get('kind')}'")
    if "layout" not in attrs:
        raise StoreError(f"{path}: no parameter layout in its attributes")
    return group, attrs, ParamLayout.from_dict(attrs["layout"])


def read_block(group, prefix: str, block: str, path="") -> np.ndarray:
    key = block_key(prefix, block)
    if key not in group:
        raise StoreError(f"{path or 'store'} has no array '{key}'")
    return np.asarray(group[key][...])


def release_consumed(paths, why: str = "") -> int:
    """Delete temporary outputs whose every consumer has finished (and been recorded by
    Snakemake before this job could start), returning the bytes freed.

    Snakemake defers all temp() deletion while checkpoint jobs are pending, which in an
    ``iterations: auto`` PCA is the whole iteration: without this, every pass's basis and
    partials would stay on disk until the last pass. A job therefore releases what its
    predecessors consumed: the reduce of pass t the basis V_t (read only by the pass-t
    jobs), the first jobs of pass t+1 the parts of pass t (read only by the reduce of pass
    t), and the AG reduce its own partials when it is done. The parts of the last pass are
    left to Snakemake, which deletes them as soon as the last checkpoint has run: a job
    deleting them as well would race Snakemake's own deletion (which then fails and stops
    the run). The paths stay temp() in
    the rules, so a missing one is never a reason to rerun. ``GRADSPACE_KEEP_CONSUMED=1``
    keeps them (debugging; the storage test uses it with ``--notemp``)."""
    import logging

    if os.environ.get("GRADSPACE_KEEP_CONSUMED", "0") == "1":
        return 0
    freed = 0
    for p in map(Path, paths or []):
        # rename first (atomic), then delete the renamed copy: several jobs of a pass
        # release the same paths, and none may see a half-deleted store under its name
        trash = p.with_name(f".{p.name}.released-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(p, trash)
        except FileNotFoundError:
            continue
        if trash.is_dir():
            freed += sum(f.stat().st_size for f in trash.rglob("*") if f.is_file())
            shutil.rmtree(trash, ignore_errors=True)
        else:
            freed += trash.stat().st_size
            trash.unlink(missing_ok=True)
    if freed:
        logging.getLogger(__name__).info("released %.1f MB of consumed temporary outputs%s", freed / 1e6,
                                         f" ({why})" if why else "")
    return freed
