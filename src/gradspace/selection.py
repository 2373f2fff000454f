"""Hyperparameter selection on validation data (issue 12).

A detector instance may declare a ``grid`` next to its hyperparameters::

    react: {percentile: 90, grid: {percentile: [80, 85, 90, 95]}}

Its candidates are the instance's hyperparameters updated with every combination of the
grid's values (keys in sorted order, values in the order listed). Each candidate is fitted
on ID train exactly as the instance would be, scored on the validation sets only — the ID
validation split ``id_val`` (held out of the ID-train pool, never trained on) and the
validation OOD sets of ``validation.ood``, which are never test sets — and the best by
``validation.criterion`` is chosen: an ordered list of metrics averaged over the
validation OOD sets (AUROC higher is better, FPR95 lower; later metrics break ties, then
the earlier candidate in grid order wins). Only the chosen candidate is scored on the test
sets: the selection job copies its fitted detector to the path the test scoring reads.

Validation OOD sets must not overlap the test sets: :func:`check_validation` refuses, when
the workflow is parsed, a validation set whose name or source could share samples with a
test OOD set (same kind, split and options, classes not disjoint); the selection jobs check
again on the prepared manifests' sample ids (:func:`check_disjoint`).
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError
from .files import atomic_path, read_json, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

GRID_KEY = "grid"
ID_VAL = "id_val"
#: metric -> +1 when higher is better, -1 when lower is better
CRITERIA = {"auroc": 1, "fpr95": -1, "aupr_in": 1, "aupr_out": 1}
FORMAT = "gradspace-selection/1"


# -- grids ---------------------------------------------------------------------------------------

def split_grid(cfg: Mapping | None, where: str) -> tuple[dict, dict]:
    """(hyperparameters, grid) of one configured detector instance (``method`` stays in the
    hyperparameters). ConfigError naming ``where`` for a malformed grid."""
    hp = dict(cfg or {})
    grid = hp.pop(GRID_KEY, None) or {}
    if not isinstance(grid, Mapping):
        raise ConfigError(f"{where}.grid must be a mapping {{hyperparameter: [values]}}, got {grid!r}")
    for key, values in grid.items():
        if key == "method":
            raise ConfigError(f"{where}.grid: 'method' cannot be searched; declare one instance per method")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.grid.{key} must be a non-empty list of values, got {values!r}")
    return hp, dict(grid)


def grid_candidates(hparams: Mapping, grid: Mapping) -> list[dict]:
    """Every candidate: ``hparams`` updated with one combination of the grid's values
    (keys sorted, values in listed order). No grid: the one candidate ``hparams``."""
    keys = sorted(grid)
    combos = itertools.product(*(grid[k] for k in keys))
    return [{**hparams, **dict(zip(keys, combo, strict=True))} for combo in combos]


# -- validation sets -----------------------------------------------------------------------------

def _classes(spec: Mapping):
    c = spec.get("classes")
    return None if c is None else {int(x) for x in c}


def _split(spec: Mapping, role: str = "ood"):
    s = spec.get("split")
    return s.get(role) if isinstance(s, Mapping) else s


def sources_overlap(a: Mapping, b: Mapping, role_a: str = "ood", role_b: str = "ood") -> bool:
    """Whether two dataset sources could share samples: the same kind, split and options
    (``n`` and ``shards`` aside: a subsample of a source overlaps the source) and classes
    that are not disjoint (no ``classes``: all of them)."""
    if a.get("kind") != b.get("kind") or _split(a, role_a) != _split(b, role_b):
        return False
    skip = {"n", "shards", "split", "classes"}
    if {k: v for k, v in a.items() if k not in skip} != {k: v for k, v in b.items() if k not in skip}:
        return False
    ca, cb = _classes(a), _classes(b)
    return ca is None or cb is None or bool(ca & cb)


def check_validation(config: Mapping) -> None:
    """Parse-time checks of ``validation`` against the test sets: ConfigError naming the
    validation set that is (or may share samples with) a test OOD set or an ID set."""
    val = config.get("validation") or {}
    data = config["data"]
    test_ood = data.get("ood") or {}
    for name, spec in (val.get("ood") or {}).items():
        where = f"validation.ood.{name}"
        if name in test_ood:
            raise ConfigError(f"{where}: '{name}' is also a test OOD set (data.ood.{name}); validation "
                              "OOD sets must never be test sets")
        if name in ("id_train", "id_test", ID_VAL):
            raise ConfigError(f"{where}: the name '{name}' is reserved for an ID set")
        for tname, tspec in test_ood.items():
            if sources_overlap(spec, tspec):
                raise ConfigError(
                    f"{where} may share samples with the test OOD set data.ood.{tname} (same source "
                    f"kind '{spec.get('kind')}', split and options, classes not disjoint): validation OOD "
                    "sets must never be test sets; pick another source, split or classes")
    crit = val.get("criterion") or []
    bad = [c for c in crit if c not in CRITERIA]
    if bad or not crit:
        raise ConfigError(f"validation.criterion must be a non-empty list of {sorted(CRITERIA)}, "
                          f"got {crit!r}")


def selection_sets(config: Mapping, any_grid: bool) -> list[str]:
    """The validation datasets to prepare: ``id_val`` and the validation OOD sets, when
    some detector declares a grid (ConfigError when it does and validation is not set up)."""
    if not any_grid:
        return []
    val = config.get("validation") or {}
    if not val.get("id_holdout") or not val.get("ood"):
        raise ConfigError("a detector declares a grid, but validation data is not configured: set "
                          "validation.id_holdout (ID-train samples held out as id_val) and "
                          "validation.ood (validation OOD sets, never test sets)")
    check_validation(config)
    return [ID_VAL, *val["ood"]]


def validation_sets(config: Mapping) -> list[str]:
    """:func:`selection_sets` of a whole config: the validation sets are prepared when a
    detector, a gradient detector (with a subspace) or the ensemble declares a grid. The
    workflow (workflow/rules/common.smk) and ``gradspace plan`` both ask this."""
    sub = config.get("subspace") or {}
    spaces = bool(sub.get("enabled") and sub.get("types"))
    grids = any((spec or {}).get(GRID_KEY) for spec in (config.get("detectors") or {}).values())
    grids |= spaces and any((spec or {}).get(GRID_KEY) for spec in (sub.get("detectors") or {}).values())
    grids |= bool(((sub.get("ensemble") or {}).get(GRID_KEY) or {}).get("alpha"))
    return selection_sets(config, grids)


def _manifest_ids(data_dir) -> np.ndarray:
    from .data.manifest import read_manifest

    return read_manifest(data_dir)["id"].astype(str).to_numpy()


def check_disjoint(validation: Mapping[str, str], test: Mapping[str, str]) -> None:
    """DataError naming the two sets and a shared sample when a validation set's prepared
    manifest shares a sample id with a test (or ID-train) set's."""
    seen = {name: set(_manifest_ids(d)) for name, d in test.items()}
    for vname, vdir in validation.items():
        ids = _manifest_ids(vdir)
        for tname, tids in seen.items():
            shared = [i for i in ids if i in tids]
            if shared:
                raise DataError(f"validation set '{vname}' ({vdir}) shares {len(shared)} sample(s) with "
                                f"'{tname}' ({test[tname]}), e.g. {shared[0]}: validation data must be "
                                "disjoint from training and test data")


# -- choosing ------------------------------------------------------------------------------------

def validation_rows(scores: Sequence[Mapping[str, np.ndarray]], ood_sets: Sequence[str],
                    positive: str = "id", id_set: str = ID_VAL) -> list[dict]:
    """Per candidate: the metrics of every validation OOD set against ``id_set`` and their
    average (keys ``<metric>`` and ``<metric>:<set>``)."""
    from .metrics import ood_metrics

    rows = []
    for i, by_set in enumerate(scores):
        row: dict = {"candidate": i}
        per = {o: ood_metrics(by_set[id_set], by_set[o], positive=positive) for o in ood_sets}
        for metric in CRITERIA:
            row[metric] = float(np.mean([per[o][metric] for o in ood_sets]))
            for o in ood_sets:
                row[f"{metric}:{o}"] = per[o][metric]
        rows.append(row)
    return rows


def choose(rows: Sequence[Mapping], criterion: Sequence[str]) -> int:
    """Index of the best row by the ordered ``criterion`` (ties: the earlier row)."""
    for c in criterion:
        if c not in CRITERIA:
            raise ConfigError(f"unknown selection criterion '{c}' (known: {sorted(CRITERIA)})")
    if not rows:
        raise DataError("no candidates to choose from")
    keys = [tuple(-CRITERIA[c] * float(r[c]) for c in criterion) for r in rows]
    return min(range(len(rows)), key=lambda i: (keys[i], i))


def select(candidates: Sequence[Mapping], scores: Sequence[Mapping[str, np.ndarray]],
           ood_sets: Sequence[str], criterion: Sequence[str], positive: str = "id") -> dict:
    """The selection record: every candidate's hyperparameters and validation metrics, the
    criterion and the chosen candidate."""
    if len(candidates) != len(scores):
        raise DataError(f"{len(candidates)} candidates but {len(scores)} sets of validation scores")
    rows = validation_rows(scores, ood_sets, positive)
    best = choose(rows, criterion)
    for r, hp in zip(rows, candidates, strict=True):
        r["hparams"] = dict(hp)
    return {"format": FORMAT, "criterion": list(criterion), "positive": positive,
            "validation": {"id": ID_VAL, "ood": list(ood_sets)}, "chosen": best,
            "chosen_hparams": dict(candidates[best]), "candidates": rows}


# -- jobs ----------------------------------------------------------------------------------------

def _load_set_scores(paths: Sequence[str], sets: Sequence[str]) -> dict[str, np.ndarray]:
    out = {}
    for s in sets:
        hits = [p for p in paths if Path(p).stem == s]
        if len(hits) != 1:
            raise DataError(f"expected one validation score file for '{s}' among {list(paths)}")
        out[s] = np.load(hits[0])
    return out


def cmd_select(a) -> None:
    """Score every candidate on validation, choose one, write the record and copy the chosen
    candidate's fitted detector to ``--out-fitted`` (what the test scoring reads)."""
    candidates = a.candidates
    if not isinstance(candidates, list) or not candidates:
        raise ConfigError("--candidates must be a non-empty JSON list of hyperparameter objects")
    if len(a.fitted) != len(candidates):
        raise ConfigError(f"{len(candidates)} candidates but {len(a.fitted)} fitted files")
    sets = [ID_VAL, *a.ood]
    per_cand: list[list[str]] = [[] for _ in candidates]
    for item in a.scores:
        idx, _, path = item.partition("=")
        per_cand[int(idx)].append(path)
    scores = [_load_set_scores(paths, sets) for paths in per_cand]
    rec = select(candidates, scores, a.ood, a.criterion, a.positive)
    rec["name"], rec["space"] = a.name, a.space
    best = rec["chosen"]
    log.info("%s (%s): chose candidate %d of %d %s by %s", a.name, a.space, best, len(candidates),
             json.dumps(rec["chosen_hparams"], sort_keys=True), "/".join(a.criterion))
    with atomic_path(a.out_fitted) as tmp:
        shutil.copyfile(a.fitted[best], tmp)
    write_json_atomic(a.out, rec, indent=2, sort_keys=True)


def select_alpha(grid: Sequence[float], feature: Mapping[str, np.ndarray], gradient: Mapping[str, np.ndarray],
                 ood_sets: Sequence[str], criterion: Sequence[str], positive: str = "id") -> dict:
    """Choose the ensemble's alpha (S_f + alpha * S_b) on validation scores."""
    from .detectors.gradient import ensemble_scores

    cands = [{"alpha": float(x)} for x in grid]
    scores = [{s: ensemble_scores(feature[s], gradient[s], c["alpha"]) for s in feature} for c in cands]
    return select(cands, scores, ood_sets, criterion, positive)


def cmd_select_alpha(a) -> None:
    sets = [ID_VAL, *a.ood]
    rec = select_alpha(a.grid, _load_set_scores(a.feature, sets), _load_set_scores(a.gradient, sets),
                       a.ood, a.criterion, a.positive)
    rec["name"], rec["space"] = a.name, a.space
    log.info("%s (%s): chose alpha = %s by %s", a.name, a.space, rec["chosen_hparams"]["alpha"],
             "/".join(a.criterion))
    write_json_atomic(a.out, rec, indent=2, sort_keys=True)


def read_selection(path) -> dict:
    rec = read_json(path, "selection record", dict)
    if rec.get("format") != FORMAT:
        raise DataError(f"{path}: not a selection record (format {rec.get('format')!r})")
    return rec


def selection_table(paths: Sequence[str]):
    """One row per (detector, candidate): hyperparameters, validation metrics, chosen."""
    import pandas as pd

    rows = []
    for p in paths:
        rec = read_selection(p)
        label = rec["name"] if rec["space"] == "feature" else f"{rec['space']}/{rec['name']}"
        for r in rec["candidates"]:
            rows.append({
                "detector": label,
                "candidate": r["candidate"],
                "hparams": json.dumps(r["hparams"], sort_keys=True),
                **{f"val_{m}": r[m] for m in CRITERIA},
                "criterion": "/".join(rec["criterion"]),
                "chosen": "yes" if r["candidate"] == rec["chosen"] else "",
            })
    cols = ["detector", "candidate", "hparams", *[f"val_{m}" for m in CRITERIA], "criterion", "chosen"]
    return pd.DataFrame(rows, columns=cols)


def cmd_selection_table(a) -> None:
    df = selection_table(a.records)
    text = df.to_csv(index=False, float_format="%.6f")
    write_text_atomic(a.out, text)
    log.info("selection table: %d candidates of %d detectors -> %s", len(df), len(a.records), a.out)


def chosen_hparams(paths: Sequence[str]) -> dict[str, dict]:
    """{instance name (as in the config): chosen hyperparameters} of feature-space records."""
    out = {}
    for p in paths:
        rec = read_selection(p)
        if rec["space"] == "feature":
            out[rec["name"]] = rec["chosen_hparams"]
    return out


def cmd_check_validation(a) -> None:
    """Check the prepared validation sets against the training and test sets (sample ids)
    and record what was checked."""
    val = dict(x.split("=", 1) for x in a.validation)
    test = dict(x.split("=", 1) for x in a.test)
    check_disjoint(val, test)
    rec = {"validation": {k: int(len(_manifest_ids(v))) for k, v in val.items()},
           "checked_against": sorted(test), "shared_samples": 0}
    write_json_atomic(a.out, rec, indent=2, sort_keys=True)
    log.info("validation sets %s share no sample with %s", sorted(val), sorted(test))
