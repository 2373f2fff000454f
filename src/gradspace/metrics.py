"""OOD detection metrics (FPR@95%TPR, AUROC, AUPR-In, AUPR-Out) and the ``evaluate`` command.

Scores follow the package convention: **higher score = more in-distribution (ID)**.
Every metric is computed with scikit-learn (``roc_curve``, ``roc_auc_score``,
``average_precision_score``); this module only fixes the labels, the sign of the scores
and how FPR@95%TPR is read off the ROC curve.

Two conventions for which class is "positive" (``positive`` option):

``positive="id"`` (default; the papers' convention: GradNorm, Huang et al. 2021; the
low-dimensional gradient paper, Wu et al.; ODIN/Energy/ReAct tables)
    ID samples are the positive class, ranked by ``score``. A threshold ``t`` accepts a
    sample as ID when ``score >= t``.
    FPR95 = fraction of OOD samples with ``score >= t95`` where ``t95`` is the *largest*
    threshold at which at least 95% of ID samples are accepted (TPR_ID >= 0.95).

``positive="ood"`` (OpenOOD's convention, ``openood/evaluators/metrics.py``)
    OOD samples are the positive class, ranked by ``-score``. A threshold ``t`` flags a
    sample as OOD when ``-score >= t``.
    FPR95 = fraction of ID samples flagged OOD at the largest threshold that flags at
    least 95% of OOD samples (TPR_OOD >= 0.95).

The other three metrics do not depend on the convention:

* AUROC = P(s_ID > s_OOD) + 0.5 P(s_ID = s_OOD)  (Mann-Whitney; symmetric under
  swapping the classes and negating the score, so both conventions give the same value);
* AUPR-In = average precision with ID positive and ``score`` as the ranking;
* AUPR-Out = average precision with OOD positive and ``-score`` as the ranking.
  Average precision is ``sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds
  (scikit-learn's step-wise definition, no trapezoidal interpolation).

FPR@95%TPR reading of the ROC curve: ``roc_curve(..., drop_intermediate=False)`` gives
one point per distinct score value in decreasing order (tied scores share one threshold,
so ties are handled deterministically: a threshold accepts every sample whose score
equals it). FPR95 is the FPR at the *first* point whose TPR >= 0.95 — no interpolation
between points. This equals OpenOOD's ``fpr[np.argmax(tpr >= 0.95)]``.

CSV output (``metrics.csv``): one row per (space, detector, OOD set) plus one row with
``ood_dataset == "average"`` per (space, detector) holding the unweighted mean over the
OOD sets (``n_ood`` = the total number of OOD samples). With OOD set groups (``--groups``,
config ``metrics.groups``, e.g. OpenOOD's near-OOD and far-OOD) each (space, detector) also
gets one row per group, ``ood_dataset == "average:<group>"``, the unweighted mean over the
group's sets (written after the "average" row; without groups there are none). Columns:

    detector      detector instance name (score path component)
    method        detector method (registry key), from --detectors (default: the name)
    embedding     "feature", "gradient", ... from --detectors (default: "feature" for
                  space "feature", else the space name)
    space         score space (path component: feature, pca, ag, ...)
    ood_dataset   OOD set name, "average", or "average:<group>"
    fpr95, auroc, aupr_in, aupr_out   fractions in [0, 1] (NOT percent)
    n_id, n_ood   number of ID / OOD samples
    id_dataset    the ID dataset used as the in-distribution test set
    positive      the convention ("id" or "ood") used for fpr95

Markdown and HTML tables show the same metrics in percent with two decimals, like the
papers' tables.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError, NumericalError
from .files import read_json, write_text_atomic

log = logging.getLogger(__name__)

TPR_LEVEL = 0.95
METRIC_NAMES = ("fpr95", "auroc", "aupr_in", "aupr_out")
CSV_COLUMNS = ("detector", "method", "embedding", "space", "ood_dataset", "fpr95", "auroc",
               "aupr_in", "aupr_out", "n_id", "n_ood", "id_dataset", "positive")
AVERAGE = "average"
#: prefix of a group average's ood_dataset value: "average:near"
GROUP_PREFIX = AVERAGE + ":"
CONVENTIONS = ("id", "ood")
#: datasets never treated as OOD sets by default
DEFAULT_EXCLUDE = ("id_train",)
#: model-card keys that may hold the ID test accuracy (first found wins)
CARD_ACCURACY_KEYS = ("id_accuracy", "id_test_accuracy", "test_accuracy", "accuracy")


# --------------------------------------------------------------------------- metrics
def fpr_at_tpr(labels: np.ndarray, ranking: np.ndarray, tpr_level: float = TPR_LEVEL) -> float:
    """FPR at the first ROC point (thresholds in decreasing order) with TPR >= tpr_level.

    ``labels`` are 1 for the positive class; ``ranking`` is higher for "more positive".
    No interpolation: the returned value is the FPR of an actual threshold of the data.
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, ranking, drop_intermediate=False)
    # tpr is non-decreasing and ends at 1.0, so a point with tpr >= level always exists
    idx = int(np.argmax(tpr >= tpr_level - 1e-12))
    return float(fpr[idx])


def ood_metrics(id_scores, ood_scores, positive: str = "id", tpr_level: float = TPR_LEVEL) -> dict:
    """FPR95, AUROC, AUPR-In, AUPR-Out (fractions) for one ID/OOD pair of score arrays.

    Scores: higher = more ID. See the module docstring for the two ``positive``
    conventions; only ``fpr95`` depends on it.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    if positive not in CONVENTIONS:
        raise ConfigError(f"metrics.positive must be one of {list(CONVENTIONS)}, got {positive!r}")
    s_id = np.asarray(id_scores, dtype=np.float64).ravel()
    s_ood = np.asarray(ood_scores, dtype=np.float64).ravel()
    if s_id.size == 0 or s_ood.size == 0:
        raise DataError(f"need at least one ID and one OOD score (got {s_id.size} ID, "
                        f"{s_ood.size} OOD)")
    for name, arr in (("ID", s_id), ("OOD", s_ood)):
        if not np.all(np.isfinite(arr)):
            raise NumericalError(f"{name} scores contain NaN or inf")
    scores = np.concatenate([s_id, s_ood])
    is_id = np.concatenate([np.ones(s_id.size, np.int8), np.zeros(s_ood.size, np.int8)])
    is_ood = 1 - is_id
    if positive == "id":
        fpr95 = fpr_at_tpr(is_id, scores, tpr_level)
    else:
        fpr95 = fpr_at_tpr(is_ood, -scores, tpr_level)
    return {
        "fpr95": fpr95,
        "auroc": float(roc_auc_score(is_id, scores)),
        "aupr_in": float(average_precision_score(is_id, scores)),
        "aupr_out": float(average_precision_score(is_ood, -scores)),
    }


# --------------------------------------------------------------------------- inputs
def parse_score_path(path: str | os.PathLike) -> tuple[str, str, str]:
    """``.../scores/<space>/<detector>/<dataset>.npy`` -> (space, detector, dataset)."""
    p = Path(path)
    if p.suffix != ".npy" or len(p.parts) < 3:
        raise DataError(f"score file '{path}': expected a path .../<space>/<detector>/<dataset>.npy")
    return p.parent.parent.name, p.parent.name, p.stem


def load_scores(path: str | os.PathLike) -> np.ndarray:
    """Load a 1-D score file as float64; NaN/inf -> NumericalError naming the file."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DataError(f"score file '{path}' does not exist") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"score file '{path}' is not a readable .npy array: {exc}") from exc
    if arr.ndim != 1:
        raise DataError(f"score file '{path}': expected a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise DataError(f"score file '{path}' is empty")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise DataError(f"score file '{path}': expected real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise NumericalError(f"score file '{path}': {int(bad.sum())} non-finite score(s) "
                             f"(NaN/inf), first at sample {first}")
    return arr


def load_json_arg(value, what: str):
    """A JSON value given inline (``{...}`` / ``[...]``) or as a path to a JSON file."""
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        return value
    text = str(value).strip()
    if not text:
        return None
    if text[0] in "{[":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{what}: not valid JSON: {exc}") from exc
    try:
        with open(text, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{what}: '{text}' is neither inline JSON nor an existing file") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what}: file '{text}' is not valid JSON: {exc}") from exc


def read_card(path: str | os.PathLike | None) -> dict:
    """The model card (JSON object) or {} when no path is given."""
    return read_json(path, "model card", dict) if path else {}


def card_id_accuracy(card: Mapping) -> float | None:
    """ID test accuracy in percent from a model card, or None.

    Reads the first of ``CARD_ACCURACY_KEYS`` present; a value <= 1 is a fraction and is
    converted to percent, a value in (1, 100] is taken as percent already.
    """
    for key in CARD_ACCURACY_KEYS:
        value = card.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value) * 100.0 if value <= 1.0 else float(value)
    return None


def _detector_info(detectors: Mapping, space: str, detector: str) -> tuple[str, str]:
    info = detectors.get(f"{space}/{detector}", detectors.get(detector, {})) or {}
    if not isinstance(info, Mapping):
        raise ConfigError(f"--detectors: entry for '{detector}' must be an object "
                          f"{{\"method\": ..., \"embedding\": ...}}, got {info!r}")
    method = str(info.get("method") or detector)
    embedding = info.get("embedding") or ("feature" if space == "feature" else space)
    return method, str(embedding)


def check_groups(groups: Mapping | None, oods: Sequence[str]) -> dict[str, list[str]]:
    """Validate OOD set groups {group: [set, ...]} against the OOD sets of a run."""
    if not groups:
        return {}
    if not isinstance(groups, Mapping):
        raise ConfigError(f"--groups: expected a JSON object {{group: [OOD set, ...]}}, got {groups!r}")
    out = {}
    for name, members in groups.items():
        if not isinstance(name, str) or not name or ":" in name:
            raise ConfigError(f"--groups: group name {name!r} must be a non-empty string without ':'")
        if (isinstance(members, str) or not isinstance(members, Sequence) or not members
                or not all(isinstance(m, str) for m in members)):
            raise ConfigError(f"--groups: group '{name}' must list OOD set names, got {members!r}")
        unknown = [m for m in members if m not in oods]
        if unknown:
            raise ConfigError(f"metrics.groups: group '{name}' lists {unknown}, which are not OOD "
                              f"sets of this run (OOD sets: {list(oods)})")
        out[name] = list(dict.fromkeys(members))
    return out


def evaluate(score_paths: Sequence[str | os.PathLike], id_dataset: str = "id_test",
             detectors: Mapping | None = None, positive: str = "id",
             ood_datasets: Sequence[str] | None = None,
             exclude: Sequence[str] = DEFAULT_EXCLUDE, groups: Mapping | None = None):
    """Metrics for every (space, detector) over every OOD set -> pandas DataFrame.

    ``score_paths`` are ``.../scores/<space>/<detector>/<dataset>.npy``. For each
    (space, detector) the file of ``id_dataset`` holds the ID scores; every other dataset
    (except ``exclude``) is an OOD set, or exactly ``ood_datasets`` when given (in that
    order). Every detector must have a score file for every OOD set. Rows come in the
    order of ``detectors`` (when given) and then of first appearance in ``score_paths``.
    ``groups`` {name: [OOD set, ...]} adds one "average:<name>" row per detector and group.
    """
    import pandas as pd

    if positive not in CONVENTIONS:
        raise ConfigError(f"--positive must be one of {list(CONVENTIONS)}, got {positive!r}")
    detectors = dict(detectors or {})
    files: dict[tuple[str, str], dict[str, str]] = {}
    seen_datasets: list[str] = []
    for path in score_paths:
        space, det, ds = parse_score_path(path)
        per_det = files.setdefault((space, det), {})
        if ds in per_det and os.path.abspath(per_det[ds]) != os.path.abspath(path):
            raise DataError(f"two score files for {space}/{det}/{ds}: '{per_det[ds]}' and '{path}'")
        per_det[ds] = str(path)
        if ds not in seen_datasets:
            seen_datasets.append(ds)
    if not files:
        raise DataError("no score files given")
    if ood_datasets:
        oods = list(dict.fromkeys(ood_datasets))
        if id_dataset in oods:
            raise ConfigError(f"ID dataset '{id_dataset}' is also listed as an OOD set")
    else:
        oods = [d for d in seen_datasets if d != id_dataset and d not in set(exclude)]
    if not oods:
        raise DataError(f"no OOD score files among the inputs (ID dataset '{id_dataset}', "
                        f"datasets seen: {seen_datasets})")
    groups = check_groups(groups, oods)

    order = {name: i for i, name in enumerate(detectors)}
    keys = sorted(files, key=lambda k: (order.get(f"{k[0]}/{k[1]}", order.get(k[1], len(order))),))

    rows = []
    for space, det in keys:
        per_det = files[(space, det)]
        where = f"scores/{space}/{det}"
        if id_dataset not in per_det:
            raise DataError(f"{where}: no score file for the ID dataset '{id_dataset}'")
        missing = [d for d in oods if d not in per_det]
        if missing:
            raise DataError(f"{where}: no score file for OOD set(s) {missing}")
        method, embedding = _detector_info(detectors, space, det)
        s_id = load_scores(per_det[id_dataset])
        base = {"detector": det, "method": method, "embedding": embedding, "space": space}
        det_rows = []
        for ood in oods:
            s_ood = load_scores(per_det[ood])
            m = ood_metrics(s_id, s_ood, positive=positive)
            det_rows.append({**base, "ood_dataset": ood, **m, "n_id": int(s_id.size),
                             "n_ood": int(s_ood.size), "id_dataset": id_dataset,
                             "positive": positive})
        avg = {k: float(np.mean([r[k] for r in det_rows])) for k in METRIC_NAMES}
        rows.extend(det_rows)
        rows.append({**base, "ood_dataset": AVERAGE, **avg, "n_id": int(s_id.size),
                     "n_ood": int(sum(r["n_ood"] for r in det_rows)), "id_dataset": id_dataset,
                     "positive": positive})
        for gname, members in groups.items():
            g_rows = [r for r in det_rows if r["ood_dataset"] in members]
            g_avg = {k: float(np.mean([r[k] for r in g_rows])) for k in METRIC_NAMES}
            rows.append({**base, "ood_dataset": GROUP_PREFIX + gname, **g_avg,
                         "n_id": int(s_id.size), "n_ood": int(sum(r["n_ood"] for r in g_rows)),
                         "id_dataset": id_dataset, "positive": positive})
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


def read_metrics(path: str | os.PathLike):
    """Read and validate a metrics.csv written by ``evaluate``."""
    import pandas as pd

    try:
        df = pd.read_csv(path, keep_default_na=False,
                         dtype={"detector": str, "method": str, "embedding": str, "space": str,
                                "ood_dataset": str, "id_dataset": str, "positive": str})
    except FileNotFoundError as exc:
        raise DataError(f"metrics file '{path}' does not exist") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise DataError(f"metrics file '{path}' is not a readable CSV: {exc}") from exc
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"metrics file '{path}': missing column(s) {missing}")
    for c in METRIC_NAMES:
        vals = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(vals)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise NumericalError(f"metrics file '{path}': column '{c}' has a non-numeric or "
                                 f"non-finite value in data row {row + 1}")
        df[c] = vals
    return df


# --------------------------------------------------------------------------- tables
def pct(x: float) -> str:
    """A fraction as percent with two decimals, like the papers' tables."""
    return f"{100.0 * float(x):.2f}"


def display_name(detector: str, space: str) -> str:
    """Row label of a detector instance: the name, prefixed by the space unless 'feature'."""
    return detector if space == "feature" else f"{space}/{detector}"


def _ordered_unique(values) -> list:
    return list(dict.fromkeys(values))


def is_average(name: str) -> bool:
    """True for the overall average row and the group averages ("average:<group>")."""
    return name == AVERAGE or str(name).startswith(GROUP_PREFIX)


def ood_sets(df) -> list[str]:
    """OOD set names in file order, without the averages."""
    return [d for d in _ordered_unique(df["ood_dataset"]) if not is_average(d)]


def group_averages(df) -> list[str]:
    """The group average names ("average:<group>") in file order; [] without groups."""
    return [d for d in _ordered_unique(df["ood_dataset"]) if str(d).startswith(GROUP_PREFIX)]


def average_label(name: str) -> str:
    """Column label of an average: "Average" or "<group> avg" (OpenOOD: "Near-OOD avg")."""
    if name == AVERAGE:
        return "Average"
    if str(name).startswith(GROUP_PREFIX):
        return f"{name[len(GROUP_PREFIX):]} avg"
    return str(name)


def table_columns(df) -> list[str]:
    """ood_dataset values of the paper table's columns: sets, group averages, average."""
    return ood_sets(df) + group_averages(df) + [AVERAGE]


def group_table(df):
    """OpenOOD-style summary: per detector the FPR95 / AUROC of each group average and of
    the overall average, as (header, rows, bold); None when metrics.csv has no groups."""
    if not group_averages(df):
        return None
    return paper_table(df[df["ood_dataset"].map(is_average)], "detector")


def auroc_spread(df, column: str = AVERAGE) -> tuple[float, float, str, str] | None:
    """(min, max, argmin label, argmax label) of AUROC across detectors for one
    ood_dataset value (an OOD set or an average), or None when absent."""
    sub = df[df["ood_dataset"] == column]
    if len(sub) == 0:
        return None
    lo, hi = sub["auroc"].idxmin(), sub["auroc"].idxmax()
    return (float(sub.loc[lo, "auroc"]), float(sub.loc[hi, "auroc"]),
            display_name(sub.loc[lo, "detector"], sub.loc[lo, "space"]),
            display_name(sub.loc[hi, "detector"], sub.loc[hi, "space"]))


def spread_lines(df) -> list[str]:
    """One Markdown bullet per group average and the overall average: the AUROC range
    across detectors (how well the benchmark separates methods)."""
    out = []
    for col in group_averages(df) + [AVERAGE]:
        sp = auroc_spread(df, col)
        if sp is None:
            continue
        lo, hi, lo_name, hi_name = sp
        out.append(f"- AUROC spread across detectors, {average_label(col)}: {pct(lo)} "
                   f"(`{lo_name}`) to {pct(hi)} (`{hi_name}`): {100 * (hi - lo):.2f} points")
    return out


def paper_table(df, layout: str = "detector"):
    """The papers' table as (header, rows, bold) with percent strings.

    Columns: one per OOD set and an "Average" column, each cell "FPR95 / AUROC" in
    percent. ``layout="detector"``: one row per (space, detector) with columns
    Detector, Method, Embedding. ``layout="method"`` (the low-dimensional gradient
    paper's Table 3): rows grouped by method, one row per embedding ("feature" first),
    only methods that have more than one embedding; returns None when there is none.
    ``bold[i][j]`` marks the best FPR95 (lowest) and/or AUROC (highest) of a column
    as (fpr_best, auroc_best).
    """
    sets = table_columns(df)
    lookup = {(r.space, r.detector, r.ood_dataset): r for r in df.itertuples(index=False)}
    dets = _ordered_unique(zip(df["space"], df["detector"], strict=True))
    meta = {(r.space, r.detector): (r.method, r.embedding) for r in df.itertuples(index=False)}

    if layout == "detector":
        header = ["Detector", "Method", "Embedding"]
        row_keys = dets
        labels = [[display_name(d, s), meta[(s, d)][0], meta[(s, d)][1]] for s, d in dets]
    elif layout == "method":
        header = ["Method", "Embedding"]
        by_method: dict[str, list] = {}
        for key in dets:
            by_method.setdefault(meta[key][0], []).append(key)
        row_keys, labels = [], []
        for method, keys in by_method.items():
            if len(_ordered_unique(meta[k][1] for k in keys)) < 2:
                continue
            keys = sorted(keys, key=lambda k: meta[k][1] != "feature")  # stable: feature first
            emb_count: dict[str, int] = {}
            for k in keys:
                emb_count[meta[k][1]] = emb_count.get(meta[k][1], 0) + 1
            for i, k in enumerate(keys):
                emb = meta[k][1].capitalize()
                if emb_count[meta[k][1]] > 1:
                    emb = f"{emb} ({display_name(k[1], k[0])})"
                row_keys.append(k)
                labels.append([method if i == 0 else "", emb])
        if not row_keys:
            return None
    else:
        raise ValueError(f"unknown layout {layout!r}")

    header = header + [average_label(s) + " FPR95↓ / AUROC↑" for s in sets]
    fpr = np.array([[lookup[(s, d, o)].fpr95 if (s, d, o) in lookup else np.nan for o in sets]
                    for s, d in row_keys])
    auc = np.array([[lookup[(s, d, o)].auroc if (s, d, o) in lookup else np.nan for o in sets]
                    for s, d in row_keys])
    # compare at the displayed precision so that visibly equal values are both bold
    fpr_r, auc_r = np.round(fpr * 100, 2), np.round(auc * 100, 2)
    best_fpr = np.nanmin(fpr_r, axis=0) if len(row_keys) else []
    best_auc = np.nanmax(auc_r, axis=0) if len(row_keys) else []
    rows, bold = [], []
    for i, lab in enumerate(labels):
        cells, marks = list(lab), [(False, False)] * len(lab)
        for j in range(len(sets)):
            if np.isnan(fpr[i, j]):
                cells.append("–")
                marks.append((False, False))
                continue
            cells.append(f"{pct(fpr[i, j])} / {pct(auc[i, j])}")
            marks.append((bool(fpr_r[i, j] == best_fpr[j]), bool(auc_r[i, j] == best_auc[j])))
        rows.append(cells)
        bold.append(marks)
    return header, rows, bold


def full_table(df):
    """All four metrics per (detector, OOD set) as (header, rows) with percent strings."""
    header = ["Detector", "Embedding", "OOD set", "FPR95↓", "AUROC↑", "AUPR-In↑", "AUPR-Out↑",
              "n ID", "n OOD"]
    rows = [[display_name(r.detector, r.space), r.embedding, r.ood_dataset, pct(r.fpr95),
             pct(r.auroc), pct(r.aupr_in), pct(r.aupr_out), str(r.n_id), str(r.n_ood)]
            for r in df.itertuples(index=False)]
    return header, rows


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], bold=None) -> str:
    """A GitHub-flavoured pipe table; ``bold[i][j] = (a, b)`` bolds the two halves of an
    "a / b" cell (or the whole cell when it has no " / ")."""
    def cell(text, mark):
        text = _md_escape(text)
        if not mark or not any(mark):
            return text
        parts = text.split(" / ")
        if len(parts) == 2:
            return " / ".join(f"**{p}**" if m else p for p, m in zip(parts, mark, strict=True))
        return f"**{text}**"

    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    for i, row in enumerate(rows):
        marks = bold[i] if bold else [None] * len(row)
        lines.append("| " + " | ".join(cell(c, m) for c, m in zip(row, marks, strict=True)) + " |")
    return "\n".join(lines)


def convention_text(positive: str) -> str:
    if positive == "ood":
        return ("Convention: OOD is the positive class (OpenOOD); FPR95 = fraction of ID samples "
                "flagged OOD at the threshold that catches 95% of OOD samples.")
    return ("Convention: ID is the positive class (the papers'); FPR95 = fraction of OOD samples "
            "accepted as ID at the threshold that accepts 95% of ID samples.")


def card_summary(card: Mapping) -> str:
    """'<arch>, ID Acc xx.xx%' like the row headers of the papers' tables."""
    acc = card_id_accuracy(card)
    arch = card.get("arch") or card.get("architecture") or "model"
    return f"{arch}, ID Acc {acc:.2f}%" if acc is not None else f"{arch}, ID Acc n/a"


def render_markdown(df, card: Mapping | None = None, title: str = "OOD detection metrics") -> str:
    """metrics.md: ID accuracy, the paper-style tables and all metrics per OOD set."""
    card = card or {}
    positive = str(df["positive"].iloc[0]) if len(df) else "id"
    id_ds = str(df["id_dataset"].iloc[0]) if len(df) else "?"
    acc = card_id_accuracy(card)
    out = [f"# {title}", ""]
    out.append(f"- ID dataset: `{id_ds}`; OOD sets: {', '.join(f'`{s}`' for s in ood_sets(df))}")
    groups = group_averages(df)
    if groups:
        out.append("- OOD groups, averaged separately (OpenOOD style): "
                   + ", ".join(f"`{g[len(GROUP_PREFIX):]}`" for g in groups))
    out.append(f"- ID accuracy: {acc:.2f}%" if acc is not None else "- ID accuracy: n/a")
    if card:
        out.append(f"- Model: {card_summary(card)}")
    out.append(f"- {convention_text(positive)}")
    out.append("- All values in percent; best per column in bold. metrics.csv holds fractions.")
    gt = group_table(df)
    if gt is not None:
        out += ["", "## Averages per OOD group", "", f"*{card_summary(card)}*", ""]
        out += [markdown_table(*gt), ""]
        out += spread_lines(df)
    out += ["", "## FPR95 / AUROC per OOD set", "", f"*{card_summary(card)}*", ""]
    header, rows, bold = paper_table(df, "detector")
    out += [markdown_table(header, rows, bold), ""]
    t3 = paper_table(df, "method")
    if t3 is not None:
        out += ["## Feature vs gradient embeddings per method", "", f"*{card_summary(card)}*", ""]
        out += [markdown_table(*t3), ""]
    out += ["## All metrics", ""]
    out += [markdown_table(*full_table(df)), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- output
def metrics_csv_text(df) -> str:
    return df.to_csv(index=False, float_format="%.10g", lineterminator="\n")


def cmd_evaluate(args) -> None:
    detectors = load_json_arg(args.detectors, "--detectors") or {}
    if not isinstance(detectors, dict):
        raise ConfigError("--detectors: expected a JSON object {name: {method, embedding}}")
    card = read_card(args.card)
    groups = load_json_arg(args.groups, "--groups") or {}
    df = evaluate(args.scores, id_dataset=args.id_dataset, detectors=detectors,
                  positive=args.positive, ood_datasets=args.ood_datasets,
                  exclude=args.exclude, groups=groups)
    md = render_markdown(df, card, title=args.title)
    write_text_atomic(args.out_csv, metrics_csv_text(df))
    if args.out_md:
        write_text_atomic(args.out_md, md)
    log.info("wrote %d metric rows for %d detectors to %s", len(df),
             df[["space", "detector"]].drop_duplicates().shape[0], args.out_csv)
