"""Atomic writes and checked reads of plain files: the one home of "write to a unique
temporary sibling, then rename into place" for every output that is not a Zarr store
(``gradspace.store`` and ``gradspace.subspace.io`` build stores on the same temporary
names).

A job killed mid-write leaves at most a ``.<name>.tmp-<pid>-<random>`` sibling, never a
truncated output that Snakemake or a rerun would take as complete; two writers of the same
path (a rerun racing a stale job) never share a temporary name. Stdlib only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import DataError

TMP_MARK = ".tmp-"


def tmp_sibling(path: str | os.PathLike) -> Path:
    """A unique temporary name next to ``path``: ``.<name>.tmp-<pid>-<8 hex>``."""
    path = Path(path)
    return path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False):
    """Yield a temporary sibling of ``path`` (created empty when ``directory``); when the
    block succeeds it replaces ``path`` (a directory already there is moved aside and then
    removed, so readers see the old or the new one whole), otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    if directory:
        tmp.mkdir()
    old = None
    try:
        yield tmp
        if directory and path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        _remove(tmp)
        if old is not None:
            _remove(old)


def write_bytes_atomic(path: str | os.PathLike, writer: Callable[[IO[bytes]], object]) -> None:
    """``writer(fh)`` fills a binary temporary file, which then replaces ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        writer(fh)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def write_json_atomic(path: str | os.PathLike, obj, **dumps) -> None:
    """``json.dumps(obj, **dumps)`` plus a final newline, written atomically."""
    write_text_atomic(path, json.dumps(obj, **dumps) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file", kind: type | None = None):
    """The parsed JSON at ``path``; a ``DataError`` naming ``what`` and the path when it is
    missing, not JSON, or (with ``kind``) not of that type."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise DataError(f"{what} '{path}' does not exist") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{what} '{path}' is not valid JSON: {exc}") from exc
    if kind is not None and not isinstance(data, kind):
        raise DataError(f"{what} '{path}': expected a JSON {'object' if kind is dict else kind.__name__}")
    return data


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # Snakemake writes "-" / "NA" for what it could not measure
        return float("nan")


def read_benchmark(path: str | os.PathLike) -> list[dict]:
    """The measurement rows of one Snakemake ``benchmark:`` TSV (columns s, h:m:s,
    max_rss (MB), max_vms, max_uss, max_pss, io_in, io_out, mean_load, cpu_time), every
    column but ``h:m:s`` as a float (NaN where Snakemake wrote "-" or "NA"). An empty file
    or a header without rows gives []; a missing file, a file without the ``s`` column or
    a row of the wrong width is a ``DataError`` naming the file. The one reader of these
    files: the report, the timing tables and ``gradspace plan``'s measured-run check."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"benchmark file '{path}' does not exist") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0].split("\t")
    if "s" not in header:
        raise DataError(f"benchmark file '{path}': expected a Snakemake benchmark TSV with a 's' "
                        f"column (columns: {header})")
    rows = []
    for i, line in enumerate(lines[1:], start=2):
        values = line.split("\t")
        if len(values) != len(header):
            raise DataError(f"benchmark file '{path}', line {i}: {len(values)} fields, the header has "
                            f"{len(header)}")
        rows.append({k: (v if k == "h:m:s" else _number(v)) for k, v in zip(header, values, strict=True)})
    return rows


__all__ = [
    "atomic_path",
    "read_benchmark",
    "read_json",
    "tmp_sibling",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]
