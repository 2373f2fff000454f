"""The files of a prepared dataset directory: manifest.csv, info.json, images.zarr.

``manifest.csv`` has one row per sample, in the order every later stage uses
("rows" / positions 0..N-1): ``index`` (int, position in the source), ``id`` (str),
``label`` (int, -1 for OOD) and ``shard`` (int, floor(position * shards / N)).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

from ..errors import DataError
from ..params import SHARDS_ENV, expected_shards  # noqa: F401 - SHARDS_ENV re-exported

MANIFEST = "manifest.csv"
INFO = "info.json"
IMAGES = "images.zarr"
COLUMNS = ["index", "id", "label", "shard"]
FORMAT_VERSION = 1


def shard_assignment(n: int, shards: int) -> np.ndarray:
    """Contiguous balanced blocks: shard(p) = floor(p * shards / n) for p = 0..n-1.

    Every shard gets floor(n/shards) or ceil(n/shards) samples.
    """
    if shards < 1:
        raise DataError(f"shards must be >= 1, got {shards}")
    if shards > n:
        raise DataError(f"cannot split {n} samples into {shards} shards (shards > samples)")
    return (np.arange(n, dtype=np.int64) * shards) // n


def shard_rows(n: int, shards: int, shard: int) -> tuple[int, int]:
    """Manifest rows [start, stop) of ``shard``: the p with floor(p * shards / n) == shard."""
    return -(-shard * n // shards), -(-(shard + 1) * n // shards)


def check_shard_request(data_dir, info: dict, shard: int | None = None) -> None:
    """DataError when the prepared dataset's shard layout is not the one asked for: ``shard``
    out of range, or (inside the workflow) a manifest prepared with another shard count
    than the config's (a stale manifest after a change of data.shards)."""
    name = info.get("name", Path(data_dir).name)
    found = int(info["shards"])
    want = expected_shards(name)
    if want is not None and want != found:
        raise DataError(
            f"inconsistent shard counts for dataset '{name}': the config asks for {want} "
            f"shard(s), but its manifest {Path(data_dir) / INFO} was prepared with {found}; the "
            f"manifest is stale (prepared before a change of data.shards / data.id.shards / "
            f"data.ood.{name}.shards and not redone, e.g. under --rerun-triggers mtime or after "
            f"losing .snakemake/metadata): rerun its preparation and what depends on it, "
            f"`snakemake --forcerun {data_dir}`")
    if shard is not None and not 0 <= int(shard) < found:
        raise DataError(f"inconsistent shard counts for dataset '{name}': shard {shard} out of "
                        f"range, its manifest {Path(data_dir) / INFO} has {found} shard(s)")


def shard_layout(data_dir, shard: int, info: dict | None = None) -> dict:
    """The layout record of one shard store (``ShardWriter(..., layout=...)``): dataset,
    data_dir, shard, shards, n and the manifest rows [start, stop)."""
    info = read_info(data_dir) if info is None else info
    check_shard_request(data_dir, info, shard)
    n, k = int(info["n"]), int(info["shards"])
    return {"dataset": info.get("name", Path(data_dir).name), "data_dir": str(data_dir),
            "shard": int(shard), "shards": k, "n": n, "rows": list(shard_rows(n, k, int(shard)))}


def write_manifest(path: Path, index, ids, labels, shards) -> None:
    import pandas as pd

    df = pd.DataFrame({"index": np.asarray(index, dtype=np.int64), "id": np.asarray(ids, dtype=object),
                       "label": np.asarray(labels, dtype=np.int64),
                       "shard": np.asarray(shards, dtype=np.int64)})
    df.to_csv(path, index=False)


def read_manifest(data_dir) -> pd.DataFrame:
    """Read ``manifest.csv`` with fixed dtypes; DataError naming the file when broken."""
    import pandas as pd

    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"prepared dataset {data_dir} has no {MANIFEST} ({path} missing); "
                        "run `gradspace prepare`")
    try:
        df = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from exc
    if list(df.columns) != COLUMNS:
        raise DataError(f"manifest {path} has columns {list(df.columns)}, expected {COLUMNS}")
    for col in ("index", "label", "shard"):
        if not pd.api.types.is_integer_dtype(df[col]):
            raise DataError(f"manifest {path}: column '{col}' is not integer")
    return df


def read_info(data_dir) -> dict:
    """The dataset's ``info.json`` as a dict (DataError naming the file when missing/broken)."""
    path = Path(data_dir) / INFO
    if not path.exists():
        raise DataError(f"prepared dataset {data_dir} has no {INFO} ({path} missing); "
                        "run `gradspace prepare`")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    missing = [k for k in ("name", "role", "kind", "backend", "n", "shards", "image_size", "channels")
               if k not in info]
    if missing:
        raise DataError(f"{path} lacks key(s) {missing}")
    return info


def check_prepared(data_dir) -> dict:
    """Validate a prepared dataset directory; return its info. DataError names the culprit.

    Checks: manifest/info present and readable; N rows == info n; shard column equals
    floor(position * shards / N) and max+1 == info shards; labels -1 for OOD and in
    0..num_classes-1 for ID; images.zarr complete with shape N×S×S×C for array sources.
    """
    data_dir = Path(data_dir)
    info = read_info(data_dir)
    df = read_manifest(data_dir)
    mpath = data_dir / MANIFEST
    n = len(df)
    if n != info["n"]:
        raise DataError(f"manifest {mpath} has {n} rows but {data_dir / INFO} says n={info['n']}")
    if n == 0:
        raise DataError(f"manifest {mpath} is empty")
    shard = df["shard"].to_numpy()
    if int(shard.max()) + 1 != info["shards"]:
        raise DataError(f"manifest {mpath}: shard column max+1 = {int(shard.max()) + 1} but "
                        f"{data_dir / INFO} says shards={info['shards']}")
    expected = shard_assignment(n, int(info["shards"]))
    bad = np.flatnonzero(shard != expected)
    if bad.size:
        raise DataError(f"manifest {mpath}: row {bad[0]} (id {df['id'].iat[bad[0]]}) has shard "
                        f"{shard[bad[0]]}, expected {expected[bad[0]]}")
    labels = df["label"].to_numpy()
    if info["role"] == "ood":
        ok = labels == -1
        rule = "-1 (OOD)"
    else:
        nc = info.get("num_classes")
        if not nc:
            raise DataError(f"{data_dir / INFO}: an ID dataset needs num_classes")
        ok = (labels >= 0) & (labels < nc)
        rule = f"in 0..{nc - 1}"
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise DataError(f"manifest {mpath}: row {i} (id {df['id'].iat[i]}) has label {labels[i]}, "
                        f"expected {rule}")
    if info["backend"] == "array":
        from ..errors import StoreError
        from ..store import open_store

        try:
            g = open_store(data_dir / IMAGES, require=["images"])
        except StoreError as exc:
            raise DataError(str(exc)) from exc
        s, c = int(info["image_size"]), int(info["channels"])
        if tuple(g["images"].shape) != (n, s, s, c) or g["images"].dtype != np.uint8:
            raise DataError(f"{data_dir / IMAGES}: images have shape {g['images'].shape} "
                            f"{g['images'].dtype}, expected ({n}, {s}, {s}, {c}) uint8")
    return info
