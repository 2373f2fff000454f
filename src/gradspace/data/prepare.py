"""``gradspace prepare``: turn one configured dataset into a prepared directory.

    gradspace prepare --dataset NAME --params JSON --seed S --out DIR

writes DIR atomically (built in a temporary sibling, renamed at the end):
``manifest.csv`` (index,id,label,shard), ``info.json`` and, for array-backed sources,
``images.zarr`` (uint8 N×S×S×C, chunked by rows, rows in manifest order).

Selection, all deterministic given the seed:
1. the source's candidates (its ``split`` if any; see :mod:`gradspace.data.sources`),
   restricted to its ``classes`` if given (ID roles: labels remapped to 0..len-1);
2. ID roles without a per-role source split: a stratified split
   (sklearn ``train_test_split(stratify=labels, test_size=test_fraction,
   random_state=seed)``); id_train takes one part, id_test the complement;
3. with ``holdout`` (validation.id_holdout: the ID validation split id_val), a random
   subset of that many samples of the ID-train pool, drawn with ``default_rng([seed, 303])``,
   is id_val; id_train draws from the rest only (the two never overlap);
4. a random subset without replacement of ``train_subsample`` (id_train) or ``n``
   (id_test, ood) samples, drawn with ``default_rng([seed, 202])``;
5. kept in source order; shard(p) = floor(p * shards / N).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..files import atomic_path
from ..params import Schema, merge_params
from .imageops import convert_channels, resize_batch
from .manifest import FORMAT_VERSION, IMAGES, INFO, MANIFEST, shard_assignment, write_manifest
from .sources import ID_ROLES, ROLES, SourceContext, get_source, subset_classes

log = logging.getLogger(__name__)

SEED_TAG_SUBSAMPLE = 202
SEED_TAG_HOLDOUT = 303

PARAM_DEFAULTS = {
    "role": None,
    "source": None,
    "num_classes": None,
    "test_fraction": Schema("data.id.test_fraction"),
    "train_subsample": None,
    "n": None,
    "holdout": None,
    "shards": Schema("data.shards"),
    "image_size": None,
    "channels": None,
}


def _positive_int(name: str, key: str, value, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"dataset '{name}': params '{key}' must be a positive integer, got {value!r}")
    return value


def validate_params(name: str, params: dict) -> dict:
    """Fill defaults and check types; ConfigError names the offending key."""
    p = merge_params(params, PARAM_DEFAULTS, f"dataset '{name}'", noun="params key")
    if p["role"] not in ROLES:
        raise ConfigError(f"dataset '{name}': params 'role' must be one of {list(ROLES)}, got {p['role']!r}")
    src = p["source"]
    if not isinstance(src, dict) or not isinstance(src.get("kind"), str):
        raise ConfigError(f"dataset '{name}': params 'source' must be an object with a 'kind', got {src!r}")
    for key in ("image_size", "shards"):
        _positive_int(name, key, p[key], allow_none=False)
    for key in ("num_classes", "train_subsample", "n", "holdout"):
        _positive_int(name, key, p[key])
    if p["channels"] not in (1, 3):
        raise ConfigError(f"dataset '{name}': params 'channels' must be 1 or 3, got {p['channels']!r}")
    tf = p["test_fraction"]
    # test_fraction None: this ID role has a source of its own (data.id.train / data.id.test),
    # taken whole, without a random train/test split.
    if tf is not None and (isinstance(tf, bool) or not isinstance(tf, int | float) or not 0.0 < tf < 1.0):
        raise ConfigError(f"dataset '{name}': params 'test_fraction' must be in (0, 1), got {tf!r}")
    n_src = src.get("n")
    if n_src is not None:
        _positive_int(name, "source.n", n_src)
        if p["n"] is not None and p["n"] != n_src:
            raise ConfigError(f"dataset '{name}': params 'n' ({p['n']}) and source option 'n' "
                              f"({n_src}) disagree")
        p["n"] = n_src
    if p["role"] == "id_val" and p["holdout"] is None:
        raise ConfigError(f"dataset '{name}': role id_val needs params 'holdout' (validation.id_holdout)")
    if p["holdout"] is not None and p["role"] not in ("id_train", "id_val"):
        raise ConfigError(f"dataset '{name}': params 'holdout' applies to id_train and id_val only")
    return p


def select(name: str, role: str, labels: np.ndarray, *, random_split: bool, test_fraction: float,
           subsample: int | None, seed: int, holdout: int | None = None) -> np.ndarray:
    """Positions (into the candidate list) of the selected samples, ascending.

    For ID roles with ``random_split``, id_train and id_test get complementary, disjoint
    stratified parts of the candidates for the same seed; with ``holdout``, id_val is a
    random ``holdout``-subset of id_train's pool and id_train keeps the rest.
    """
    pos = np.arange(labels.shape[0], dtype=np.int64)
    if random_split and role in ID_ROLES:
        from sklearn.model_selection import train_test_split

        try:
            train, test = train_test_split(pos, test_size=test_fraction, stratify=labels,
                                           random_state=seed % (2**32), shuffle=True)
        except ValueError as exc:
            raise DataError(f"dataset '{name}': cannot make a stratified split with "
                            f"test_fraction={test_fraction}: {exc}") from exc
        pos = np.sort(test if role == "id_test" else train)
    if holdout is not None and role in ("id_train", "id_val"):
        if holdout >= pos.shape[0]:
            raise DataError(f"dataset '{name}': validation.id_holdout = {holdout} leaves no ID-train "
                            f"samples (the pool has {pos.shape[0]})")
        rng = np.random.default_rng([seed % (2**32), SEED_TAG_HOLDOUT])
        held = np.sort(rng.choice(pos, size=holdout, replace=False))
        pos = held if role == "id_val" else np.setdiff1d(pos, held)
    if subsample is not None:
        if subsample < pos.shape[0]:
            rng = np.random.default_rng([seed % (2**32), SEED_TAG_SUBSAMPLE])
            pos = np.sort(rng.choice(pos, size=subsample, replace=False))
        elif subsample > pos.shape[0]:
            log.warning("dataset '%s': asked for %d samples but only %d are available; using all",
                        name, subsample, pos.shape[0])
    return pos


def _chunk_rows(image_size: int, channels: int) -> int:
    """Rows per images.zarr chunk: about 8 MiB, at most 1024 rows."""
    return int(max(1, min(1024, (8 << 20) // (image_size * image_size * channels))))


def prepare_dataset(name: str, params: dict, seed: int, out) -> dict:
    """Prepare one dataset into ``out`` atomically; return its info dict."""
    p = validate_params(name, params)
    role, size, channels = p["role"], int(p["image_size"]), int(p["channels"])
    ctx = SourceContext(name=name, role=role, seed=int(seed), image_size=size, channels=channels)
    source = get_source(p["source"]["kind"])(p["source"], ctx)
    if source.generates_n:
        source.n = p["n"]
    cat = subset_classes(name, source.catalog(), source.classes, remap=role in ID_ROLES)
    if role in ID_ROLES and p["num_classes"] and cat.num_classes is not None \
            and cat.num_classes != p["num_classes"]:
        raise DataError(f"dataset '{name}': {cat.description} has {cat.num_classes} classes but "
                        f"num_classes is {p['num_classes']}")

    random_split = role in ID_ROLES and not source.natural_split and p["test_fraction"] is not None
    subsample = p["train_subsample"] if role == "id_train" else (None if source.generates_n else p["n"])
    pos = select(name, role, cat.labels, random_split=random_split,
                 test_fraction=float(p["test_fraction"] or 0.0), subsample=subsample, seed=int(seed),
                 holdout=p["holdout"])
    n = int(pos.shape[0])
    if n == 0:
        raise DataError(f"dataset '{name}': no samples selected from {cat.description}")

    index, ids = cat.index[pos], cat.ids[pos]
    if role in ID_ROLES:
        num_classes = p["num_classes"] or cat.num_classes
        labels = cat.labels[pos]
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            raise DataError(f"dataset '{name}': sample {ids[bad[0]]} has label {labels[bad[0]]}, "
                            f"outside 0..{num_classes - 1} (num_classes={num_classes})")
    else:
        num_classes = None
        labels = np.full(n, -1, dtype=np.int64)
    try:
        shards = shard_assignment(n, int(p["shards"]))
    except DataError as exc:
        raise DataError(f"dataset '{name}': {exc}") from exc

    info = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "role": role,
        "kind": source.kind,
        "backend": source.backend,
        "n": n,
        "num_classes": num_classes,
        "shards": int(p["shards"]),
        "image_size": size,
        "channels": channels,
        "seed": int(seed),
        "source": source.resolved_spec(),
        "description": cat.description,
        "split": source.split,
        "selection": {
            "candidates": len(cat),
            "random_split": random_split,
            "test_fraction": float(p["test_fraction"]) if random_split else None,
            "subsample": subsample,
            **({"holdout": p["holdout"]} if p["holdout"] is not None else {}),
        },
        "source_classes": cat.num_classes,
        "class_names": cat.class_names,
        "params": params,
    }

    out = Path(out)
    with atomic_path(out, directory=True) as tmp:
        write_manifest(tmp / MANIFEST, index, ids, labels, shards)
        if source.backend == "array":
            _write_images(tmp / IMAGES, source, index, size, channels, info)
        from ..runtime import pause_point

        pause_point("prepare")  # fault injection (tests): before the output is renamed into place
        with open(tmp / INFO, "w") as f:
            json.dump(info, f, indent=2, sort_keys=False)
    log.info("prepared %s (%s, %s): %d samples in %d shards -> %s", name, role, source.kind, n,
             info["shards"], out)
    return info


def _write_images(path: Path, source, index: np.ndarray, size: int, channels: int, info: dict) -> None:
    """Read, convert and write the selected images chunk by chunk (memory ~ one chunk)."""
    from ..store import ShardWriter

    n = index.shape[0]
    rows = _chunk_rows(size, channels)
    attrs = {"dataset": info["name"], "role": info["role"], "kind": info["kind"]}
    with ShardWriter(path, n, attrs=attrs, chunk_rows=rows) as w:
        w.create("images", (n, size, size, channels), "uint8", chunks=(rows, size, size, channels))
        for start in range(0, n, rows):
            raw = source.read(index[start:start + rows])
            w.write("images", start, resize_batch(convert_channels(raw, channels), size))


def cmd_prepare(args) -> None:
    from ..runtime import set_threads

    set_threads()
    prepare_dataset(args.dataset, args.params, args.seed, args.out)
