"""The papers' qualitative claims, tested on a finished run: ``gradspace findings``.

    gradspace findings --metrics metrics.csv [--detectors JSON] [--grad-scores JSON]
        [--reconstruction pca=diagnostics/pca/reconstruction.csv ...] [--groups JSON]
        [--tolerance 0.005] --out-csv findings.csv [--out-md findings.md]

Each row of ``findings.csv`` is one claim on one *scope*: ``all`` (the average over every
OOD set, metrics.csv's "average" rows) and, when the run has OOD groups
(``metrics.groups``), one scope per group ("near", "far": the "average:<group>" rows).
Everything in ``run_figure``, ``margin`` and ``holds`` is computed here from the run's
metrics (and the subspace diagnostics for the reconstruction claims); only
``paper_figure`` is quoted from the papers, naming the table or figure it comes from.

Columns:

    claim         short id (e.g. ``wu_grad_msp_pca``)
    paper         Wu et al. (low-dimensional gradients), Huang et al. 2021 (GradNorm),
                  Igoe et al. 2022 (how useful are gradients)
    statement     the claim, as tested here
    paper_figure  the paper's numbers for it, with their table/figure
    scope         all | <group name>
    run_figure    this run's numbers (AUROC in percent, reconstruction errors as fractions)
    margin        in favour of the claim: AUROC points (or reconstruction-error difference)
                  by which the claimed winner leads; negative = it trails; empty when not
                  testable
    holds         yes | no | not testable (the detectors or files it needs are absent)
    detail        what was compared, or why it is not testable

Claims (the detectors are found by method and hyperparameters, not by name):

* ``wu_grad_<method>_<space>`` (Wu et al. Tables 1, 3, 4, 5): the method on reduced
  gradients (subspace ``pca``/``ag``) has a higher average AUROC than on features, for
  MSP and Energy (the issue's claim (a)) and ReAct, BATS, KNN.
* ``huang_l1_best`` (Huang et al. Fig. 4): among the configured last-layer GradNorm
  instances (uniform target, same temperature) with different ``p``, p = 1 has the highest
  AUROC. Needs p = 1 and at least one other p. The reference GradNorm is the p = 1,
  uniform-target instance with the paper's T = 1 or, where none has it, the first other
  (e.g. a temperature chosen on validation data).
* ``huang_uniform_target`` (Huang et al. Fig. 3): GradNorm with the uniform target beats
  the one-hot target (both p = 1).
* ``huang_gradnorm_vs_output`` (Huang et al. Table 1): GradNorm beats MSP and Energy.
* ``huang_last_layer`` (Huang et al. Table 2; Igoe et al. Table 1): last-layer GradNorm
  beats the all-parameter GradNorm of the gradient pass (``stored_grad_score`` of a
  ``gradnorm`` score with p = 1, given by --grad-scores).
* ``igoe_hnorm_energy`` (Igoe et al. Table 2): ‖h‖₁·Energy matches or beats GradNorm:
  AUROC(‖h‖₁·Energy) >= AUROC(GradNorm) - tolerance.
* ``igoe_v_only`` (Igoe et al. Table 2, small-scale): the best output-only V term (a
  ``hnorm_v`` instance with p = null: VarSum or TV) beats GradNorm.
* ``wu_recon_pca_vs_ag`` (Wu et al. Table 2): the PCA subspace reconstructs ID test
  gradients better (lower mean ‖G − GVVᵀ‖/‖G‖) than the AG subspace. Scope ``all`` only.
* ``wu_recon_id_vs_ood_<space>`` (Wu et al. Table 8): ID test gradients are reconstructed
  better than those of every OOD set of the scope.
* ``wu_ensemble_<space>_<detector>`` (Wu et al. Table 6): the forward + backward ensemble
  beats both of its members (the feature detector and the same detector on gradients).

A claim whose detectors are all absent gives one row with scope ``all`` and ``holds`` =
"not testable". Ties count against strict claims ("beats"); AUROCs are compared at full
precision.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import ConfigError, DataError
from .files import write_text_atomic
from .metrics import (
    AVERAGE,
    GROUP_PREFIX,
    display_name,
    group_averages,
    load_json_arg,
    markdown_table,
    read_metrics,
)

log = logging.getLogger(__name__)

COLUMNS = ("claim", "paper", "statement", "paper_figure", "scope", "run_figure", "margin", "holds",
           "detail")
YES, NO, NOT_TESTABLE = "yes", "no", "not testable"
WU = "Wu et al. (low-dimensional gradients)"
HUANG = "Huang et al. 2021 (GradNorm)"
IGOE = "Igoe et al. 2022 (how useful are gradients)"
DEFAULT_TOLERANCE = 0.005

#: Wu et al. Table 3 (ResNet50, ImageNet, AG subspace): average AUROC feature -> gradient,
#: and Table 4/5 (CIFAR10, ResNet18, PCA K=200) where the paper gives the gradient method.
WU_TABLE3 = {
    "msp": "Table 3 (ImageNet, ResNet50, AG): avg AUROC 82.82 feature -> 91.87 gradient "
           "(MobileNet-v2 80.67 -> 85.15, DenseNet121 82.71 -> 84.45)",
    "energy": "Table 3 (ImageNet, ResNet50, AG): avg AUROC 87.05 feature -> 93.09 gradient "
              "(MobileNet-v2 86.59 -> 87.48; DenseNet121 87.66 -> 86.36, the one exception)",
    "react": "Table 3 (ImageNet, ResNet50, AG): avg AUROC 93.30 feature -> 95.45 gradient",
    "bats": "Table 3 (ImageNet, ResNet50, AG): avg AUROC 87.04 feature -> 95.40 gradient",
    "knn": "Table 3 (ImageNet, ResNet50, AG): avg AUROC 85.26 -> 87.59; Table 4 (CIFAR10, "
           "ResNet18, PCA 200): 95.84 -> 96.33; Table 5 near-OOD CIFAR100: 90.45 -> 91.54",
}
WU_METHODS = ("msp", "energy", "react", "bats", "knn")
SPACE_NAMES = ("pca", "ag")


# --------------------------------------------------------------------------- helpers
def _pct(x: float) -> str:
    return f"{100.0 * x:.2f}"


def _num(value, default=None):
    """A float from a hyperparameter value (None -> default; 'inf' -> inf)."""
    if value is None:
        return default
    if isinstance(value, str) and value.lower() in ("inf", "infinity"):
        return math.inf
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _p_label(p) -> str:
    if p is None:
        return "none"
    if math.isinf(p):
        return "inf"
    return f"{p:g}"


def resolved_hparams(detectors: Mapping | None) -> dict[str, dict]:
    """{name: {"method": m, **hparams with the method's defaults}} for the feature-space
    detector instances given as {name: {"method"?: m, **hparams}} (the config's
    ``detectors`` section); unknown methods keep only what was given."""
    out = {}
    if not detectors:
        return out
    from .detectors.base import get_detector

    for name, cfg in detectors.items():
        cfg = dict(cfg or {})
        method = str(cfg.pop("method", name))
        cfg.pop("embedding", None)
        try:
            defaults = dict(get_detector(method).defaults)
        except Exception:  # noqa: BLE001 - an unknown method just has no defaults here
            defaults = {}
        out[name] = {"method": method, **defaults, **cfg}
    return out


class Run:
    """Lookup of a run's metrics: AUROC/FPR95 of (space, detector) on an average row."""

    def __init__(self, df):
        self.df = df
        self.rows = {(r.space, r.detector, r.ood_dataset): r for r in df.itertuples(index=False)}
        self.scopes = [("all", AVERAGE)] + [(g[len(GROUP_PREFIX):], g) for g in group_averages(df)]
        self.meta = {(r.space, r.detector): (r.method, r.embedding) for r in df.itertuples(index=False)}

    def auroc(self, space: str, detector: str, column: str) -> float | None:
        r = self.rows.get((space, detector, column))
        return None if r is None else float(r.auroc)

    def fpr(self, space: str, detector: str, column: str) -> float | None:
        r = self.rows.get((space, detector, column))
        return None if r is None else float(r.fpr95)

    def by_method(self, method: str, space: str) -> list[str]:
        """Detector names of ``space`` with this method, the one named like it first."""
        names = [d for (s, d), (m, _) in self.meta.items() if s == space and m == method]
        return sorted(names, key=lambda d: d != method)


def _row(claim, paper, statement, paper_figure, scope="all", run_figure="", margin=None,
         holds=NOT_TESTABLE, detail="") -> dict:
    return {"claim": claim, "paper": paper, "statement": statement, "paper_figure": paper_figure,
            "scope": scope, "run_figure": run_figure,
            "margin": "" if margin is None else round(float(margin), 4),
            "holds": holds, "detail": detail}


def _beats(run: Run, claim, paper, statement, paper_figure, winner, losers, *,
           tolerance: float = 0.0, strict: bool = True) -> list[dict]:
    """Rows (one per scope) for "``winner`` has a higher AUROC than every one of ``losers``".

    ``winner``/``losers``: (space, detector, label). ``strict``: winner > best loser;
    otherwise winner >= best loser - tolerance ("matches or beats").
    """
    out = []
    for scope, col in run.scopes:
        w = run.auroc(winner[0], winner[1], col)
        ls = [(lab, run.auroc(s, d, col)) for s, d, lab in losers]
        if w is None or any(v is None for _, v in ls):
            continue
        best_label, best = max(ls, key=lambda t: t[1])
        margin = w - best
        ok = margin > 0 if strict else margin >= -tolerance
        fig = "; ".join([f"{winner[2]} {_pct(w)}"] + [f"{lab} {_pct(v)}" for lab, v in ls])
        detail = (f"AUROC of {display_name(winner[1], winner[0])} vs "
                  + ", ".join(display_name(d, s) for s, d, _ in losers)
                  + ("" if strict else f"; holds within {100 * tolerance:.2f} points"))
        out.append(_row(claim, paper, statement, paper_figure, scope, fig + " (AUROC %)",
                        100 * margin, YES if ok else NO, detail))
    return out


def _untestable(claim, paper, statement, paper_figure, why: str) -> list[dict]:
    return [_row(claim, paper, statement, paper_figure, detail=why)]


# --------------------------------------------------------------------------- claims
def claims_gradient_vs_feature(run: Run) -> list[dict]:
    """Wu et al.: reduced-gradient versions of MSP, Energy, ReAct, BATS, KNN beat features."""
    out = []
    spaces = [s for s in SPACE_NAMES if any(sp == s for sp, _ in run.meta)] or ["pca", "ag"]
    for method in WU_METHODS:
        feat = run.by_method(method, "feature")
        for space in spaces:
            claim = f"wu_grad_{method}_{space}"
            statement = (f"{method} on {space.upper()}-reduced gradients has a higher average AUROC "
                         f"than {method} on features")
            grad = run.by_method(method, space)
            if not feat or not grad:
                why = (f"needs a feature-space '{method}' detector and '{method}' in "
                       f"subspace.detectors with subspace type '{space}'")
                out += _untestable(claim, WU, statement, WU_TABLE3[method], why)
                continue
            out += _beats(run, claim, WU, statement, WU_TABLE3[method],
                          (space, grad[0], f"gradient ({space.upper()})"),
                          [("feature", feat[0], "feature")])
    return out


def _gradnorms(hp: Mapping[str, dict], run: Run) -> list[tuple[str, dict]]:
    """Feature-space GradNorm instances present in the metrics: (name, hparams)."""
    return [(n, h) for n, h in hp.items()
            if h.get("method") == "gradnorm" and ("feature", n) in run.meta]


def _gradnorm_l1(hp, run) -> str | None:
    """The last-layer GradNorm of the paper: p = 1, uniform target; T = 1 (the paper's) if
    configured, else the first found (a temperature chosen on validation data, whose chosen
    hyperparameters ``hp`` then holds)."""
    l1 = [(n, h) for n, h in _gradnorms(hp, run)
          if _num(h.get("p"), 1.0) == 1.0 and h.get("target", "uniform") == "uniform"]
    for n, h in l1:
        if _num(h.get("temperature"), 1.0) == 1.0:
            return n
    return l1[0][0] if l1 else None


def claim_l1_best(run: Run, hp) -> list[dict]:
    claim, statement = "huang_l1_best", ("GradNorm with the L1 norm (p = 1) has the highest AUROC "
                                         "of the configured norms")
    fig = ("Fig. 4 (ImageNet, ResNetv2-101): L1 best of p in {0.3, 1, 2, 3, 4, inf} on all four "
           "OOD sets; L1 beats L2 by up to 22.31 FPR95 points (Sec. 5); L1 avg 54.70 FPR95 / "
           "86.31 AUROC (Table 1)")
    ref = _gradnorm_l1(hp, run)
    if ref is None:
        return _untestable(claim, HUANG, statement, fig, "needs a feature-space gradnorm detector "
                           "with p = 1, target uniform")
    base = hp[ref]
    same = [(n, h) for n, h in _gradnorms(hp, run)
            if h.get("target", "uniform") == "uniform"
            and _num(h.get("temperature"), 1.0) == _num(base.get("temperature"), 1.0)
            and bool(h.get("bias", False)) == bool(base.get("bias", False))]
    others, seen = [], {1.0}
    for n, h in same:
        p = _num(h.get("p"), 1.0)
        if p not in seen:
            seen.add(p)
            others.append(("feature", n, f"p={_p_label(p)}"))
    if not others:
        return _untestable(claim, HUANG, statement, fig, "needs gradnorm detectors with at least "
                           "two different p (e.g. p: 1, 2, inf)")
    return _beats(run, claim, HUANG, statement, fig, ("feature", ref, "p=1"), others)


def claim_uniform_target(run: Run, hp) -> list[dict]:
    claim = "huang_uniform_target"
    statement = "GradNorm with the uniform target beats GradNorm with the one-hot target (L1)"
    fig = ("Fig. 3 (ImageNet): uniform beats one-hot on all four OOD sets, e.g. 48.35 FPR95 "
           "points lower on SUN")
    ref = _gradnorm_l1(hp, run)
    onehot = [n for n, h in _gradnorms(hp, run)
              if h.get("target") == "onehot" and _num(h.get("p"), 1.0) == 1.0]
    if ref is None or not onehot:
        return _untestable(claim, HUANG, statement, fig, "needs gradnorm detectors with target "
                           "uniform and target onehot, both p = 1")
    return _beats(run, claim, HUANG, statement, fig, ("feature", ref, "uniform"),
                  [("feature", onehot[0], "one-hot")])


def claim_gradnorm_vs_output(run: Run, hp) -> list[dict]:
    claim = "huang_gradnorm_vs_output"
    statement = "GradNorm (L1, last layer) beats the output-based MSP and Energy"
    fig = ("Table 1 (ImageNet, ResNetv2-101): avg AUROC GradNorm 86.31 vs MSP 79.29, Energy 82.74; "
           "Table 3 (DenseNet-121): 88.07 vs Energy's 10.29-points-worse FPR95")
    ref = _gradnorm_l1(hp, run)
    msp, energy = run.by_method("msp", "feature"), run.by_method("energy", "feature")
    if ref is None or not (msp and energy):
        return _untestable(claim, HUANG, statement, fig, "needs gradnorm (p = 1) and feature-space "
                           "msp and energy detectors")
    return _beats(run, claim, HUANG, statement, fig, ("feature", ref, "GradNorm"),
                  [("feature", msp[0], "MSP"), ("feature", energy[0], "Energy")])


def claim_last_layer(run: Run, hp, grad_scores: Mapping | None) -> list[dict]:
    claim = "huang_last_layer"
    statement = "last-layer GradNorm beats GradNorm over all parameters"
    fig = ("Huang Table 2 (ImageNet): last layer 86.31 vs all params 81.14 AUROC; Igoe Table 1 "
           "(small-scale): shallow 0.906 vs deep 0.892")
    ref = _gradnorm_l1(hp, run)
    deep = None
    for n, h in hp.items():
        if h.get("method") != "stored_grad_score" or ("feature", n) not in run.meta:
            continue
        spec = (grad_scores or {}).get(h.get("key") or n) or {}
        if (spec.get("kind") == "gradnorm" and _num(spec.get("p"), 1.0) == 1.0
                and spec.get("target", "uniform") == "uniform"):
            deep = n
            break
    if ref is None or deep is None:
        return _untestable(claim, HUANG, statement, fig, "needs gradnorm (p = 1) and a "
                           "stored_grad_score detector of a gradients.scores entry "
                           "{kind: gradnorm, p: 1}")
    return _beats(run, claim, HUANG, statement, fig, ("feature", ref, "last layer"),
                  [("feature", deep, "all parameters")])


def claim_hnorm_energy(run: Run, hp, tolerance: float) -> list[dict]:
    claim = "igoe_hnorm_energy"
    statement = "||h||_1 x Energy matches or beats GradNorm (no gradients needed)"
    fig = ("Table 2: ImageNet avg AUROC 0.879 (||h||_1 x Energy) vs 0.864 (GradNorm); small-scale "
           "(MNIST/CIFAR10/SVHN) avg 0.896 vs 0.906, where it does not hold")
    ref = _gradnorm_l1(hp, run)
    hen = [n for n, h in hp.items()
           if h.get("method") == "hnorm_v" and h.get("v_term") == "energy"
           and _num(h.get("p"), 1.0) == 1.0 and ("feature", n) in run.meta]
    if ref is None or not hen:
        return _untestable(claim, IGOE, statement, fig, "needs gradnorm (p = 1) and a hnorm_v "
                           "detector with p = 1, v_term energy")
    return _beats(run, claim, IGOE, statement, fig, ("feature", hen[0], "||h||_1 x Energy"),
                  [("feature", ref, "GradNorm")], tolerance=tolerance, strict=False)


def claim_v_only(run: Run, hp) -> list[dict]:
    claim = "igoe_v_only"
    statement = ("the best output-only V term (VarSum or TV, no encoding, no gradients) beats "
                 "GradNorm on a small-scale benchmark")
    fig = "Table 2 small-scale avg AUROC: TV 0.935, VarSum 0.933 vs GradNorm 0.906"
    ref = _gradnorm_l1(hp, run)
    vs = [n for n, h in hp.items()
          if h.get("method") == "hnorm_v" and h.get("p", 1.0) is None
          and h.get("v_term") in ("tv", "varsum") and ("feature", n) in run.meta]
    if ref is None or not vs:
        return _untestable(claim, IGOE, statement, fig, "needs gradnorm (p = 1) and a hnorm_v "
                           "detector with p = null, v_term varsum or tv")
    out = []
    for scope, col in run.scopes:
        best = max(vs, key=lambda n: run.auroc("feature", n, col) or -1.0)
        out += [r for r in _beats(run, claim, IGOE, statement, fig,
                                  ("feature", best, f"{best} (V only)"), [("feature", ref, "GradNorm")])
                if r["scope"] == scope]
    return out


def claim_ensemble(run: Run) -> list[dict]:
    out = []
    fig = ("Table 6: ImageNet ReAct AUROC 93.30 feature, 95.45 gradient, 96.12 ensemble; "
           "CIFAR10 KNN 95.84, 96.33, 96.79")
    ens = [(s, d) for s, d in run.meta if s.startswith("ensemble_")]
    if not ens:
        return _untestable("wu_ensemble", WU, "the forward + backward ensemble beats both members",
                           fig, "needs subspace.ensemble.detectors present in both detectors and "
                           "subspace.detectors")
    for s, d in ens:
        space = s[len("ensemble_"):]
        claim = f"wu_ensemble_{space}_{d}"
        statement = f"the ensemble of {d} (feature + {space.upper()} gradient) beats both members"
        pairs = (("feature", "feature"), (space, f"gradient ({space.upper()})"))
        members = [(ms, d, lab) for ms, lab in pairs if (ms, d) in run.meta]
        if len(members) < 2:
            out += _untestable(claim, WU, statement, fig, f"a member of {s}/{d} has no metrics")
            continue
        out += _beats(run, claim, WU, statement, fig, (s, d, "ensemble"), members)
    return out


def read_reconstruction(path) -> dict[str, tuple[float, int | None]]:
    """diagnostics/<space>/reconstruction.csv -> {dataset: (mean error, k)}."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except FileNotFoundError as exc:
        raise DataError(f"reconstruction file '{path}' does not exist") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"reconstruction file '{path}' is not a readable CSV: {exc}") from exc
    for col in ("dataset", "mean"):
        if col not in df.columns:
            raise DataError(f"reconstruction file '{path}': missing column '{col}'")
    k = df["k"] if "k" in df.columns else [None] * len(df)
    return {str(ds): (float(m), None if kk is None else int(kk))
            for ds, m, kk in zip(df["dataset"], df["mean"], k, strict=True)}


def claims_reconstruction(run: Run, recon: Mapping[str, Mapping], groups: Mapping) -> list[dict]:
    out = []
    fig2 = ("Table 2 (CIFAR10, ResNet18): ID test error PCA 0.6165 vs AG 0.6791 at dim 10 "
            "(PCA 200: 0.0841)")
    fig8 = "Table 8 (CIFAR10 vs SVHN, PCA 200): ID test 0.08 vs OOD 0.87"
    claim, statement = "wu_recon_pca_vs_ag", ("the PCA subspace reconstructs ID test gradients "
                                              "better than the AG subspace")
    pca, ag = recon.get("pca", {}), recon.get("ag", {})
    if "id_test" in pca and "id_test" in ag:
        (ep, kp), (ea, ka) = pca["id_test"], ag["id_test"]
        out.append(_row(claim, WU, statement, fig2, "all",
                        f"PCA (k={kp}) {ep:.4f} vs AG (k={ka}) {ea:.4f} (mean ||G - GVV^T||/||G||)",
                        ea - ep, YES if ep < ea else NO,
                        "mean reconstruction error of id_test; the dimensions differ unless "
                        "subspace.k equals the number of classes"))
    else:
        out += _untestable(claim, WU, statement, fig2, "needs diagnostics/pca and diagnostics/ag "
                           "reconstruction.csv (subspace.types: [pca, ag])")
    all_oods = [d for d in dict.fromkeys(run.df["ood_dataset"]) if not str(d).startswith(AVERAGE)]
    scopes = [("all", all_oods)] + [(g, list(m)) for g, m in (groups or {}).items()]
    for space in SPACE_NAMES:
        claim = f"wu_recon_id_vs_ood_{space}"
        statement = (f"ID test gradients are reconstructed better by the {space.upper()} subspace "
                     "than the gradients of every OOD set")
        table = recon.get(space, {})
        if "id_test" not in table:
            out += _untestable(claim, WU, statement, fig8, f"needs diagnostics/{space}/"
                               "reconstruction.csv")
            continue
        e_id = table["id_test"][0]
        for scope, sets in scopes:
            have = [(s, table[s][0]) for s in sets if s in table]
            if not have:
                continue
            lo_name, lo = min(have, key=lambda t: t[1])
            fig = (f"ID test {e_id:.4f}; OOD " + ", ".join(f"{s} {e:.4f}" for s, e in have))
            out.append(_row(claim, WU, statement, fig8, scope, fig, lo - e_id,
                            YES if e_id < lo else NO,
                            f"margin: lowest OOD error ({lo_name}) minus the ID test error"))
    return out


# --------------------------------------------------------------------------- driver
def compute_findings(df, detectors: Mapping | None = None, grad_scores: Mapping | None = None,
                     reconstruction: Mapping[str, str | os.PathLike] | None = None,
                     groups: Mapping | None = None, tolerance: float = DEFAULT_TOLERANCE):
    """All findings of a run as a pandas DataFrame with ``COLUMNS``.

    ``df``: metrics.csv as read by :func:`gradspace.metrics.read_metrics`; ``detectors``:
    the config's feature detectors {name: {method?, **hparams}}; ``grad_scores``: the
    config's gradients.scores; ``reconstruction``: {space: reconstruction.csv path};
    ``groups``: metrics.groups {group: [OOD set, ...]}.
    """
    import pandas as pd

    if not (isinstance(tolerance, int | float) and tolerance >= 0):
        raise ConfigError(f"--tolerance must be a number >= 0, got {tolerance!r}")
    run = Run(df)
    hp = resolved_hparams(detectors)
    recon = {space: read_reconstruction(path) for space, path in (reconstruction or {}).items()}
    rows = []
    rows += claims_gradient_vs_feature(run)
    rows += claim_l1_best(run, hp)
    rows += claim_uniform_target(run, hp)
    rows += claim_gradnorm_vs_output(run, hp)
    rows += claim_last_layer(run, hp, grad_scores)
    rows += claim_hnorm_energy(run, hp, float(tolerance))
    rows += claim_v_only(run, hp)
    rows += claims_reconstruction(run, recon, groups or {})
    rows += claim_ensemble(run)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def summary_counts(findings) -> dict[str, dict[str, int]]:
    """{scope: {yes, no, not testable}} counts."""
    out: dict[str, dict[str, int]] = {}
    for r in findings.itertuples(index=False):
        out.setdefault(r.scope, {YES: 0, NO: 0, NOT_TESTABLE: 0})[r.holds] += 1
    return out


def _fmt_margin(claim: str, margin) -> str:
    if margin == "" or margin is None:
        return ""
    return f"{float(margin):+.4f}" if claim.startswith("wu_recon") else f"{float(margin):+.2f}"


def render_markdown(findings) -> str:
    """findings.md: one table (claim, paper, paper's figure, scope, run's figure, holds)."""
    tested = findings[findings["holds"] != NOT_TESTABLE]
    untested = findings[findings["holds"] == NOT_TESTABLE]
    out = ["# Findings: the papers' claims on this run", ""]
    for scope, c in summary_counts(findings).items():
        if scope == "all" or c[YES] + c[NO]:
            out.append(f"- scope `{scope}`: {c[YES]} hold, {c[NO]} do not"
                       + (f", {c[NOT_TESTABLE]} not testable" if c[NOT_TESTABLE] else ""))
    out += ["", "Scope `all`: average over every OOD set; other scopes: the OOD group's average. "
            "Margin: AUROC points (reconstruction: error difference) in favour of the claim.", ""]
    header = ["Claim", "Paper", "Statement", "Paper's figure", "Scope", "This run", "Margin", "Holds"]
    rows = [[r.claim, r.paper, r.statement, r.paper_figure, r.scope, r.run_figure,
             _fmt_margin(r.claim, r.margin), r.holds] for r in tested.itertuples(index=False)]
    out += [markdown_table(header, rows), ""]
    if len(untested):
        out += ["## Not testable in this run", ""]
        out += [f"- `{r.claim}` ({r.paper}): {r.detail}" for r in untested.itertuples(index=False)]
        out.append("")
    return "\n".join(out)


def findings_csv_text(findings) -> str:
    return findings.to_csv(index=False, lineterminator="\n")


def _parse_reconstruction(values: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for v in values or []:
        space, sep, path = str(v).partition("=")
        if not sep or not space or not path:
            raise ConfigError(f"--reconstruction {v!r}: expected SPACE=PATH")
        if not Path(path).is_file():
            log.warning("reconstruction file %s does not exist: its claims are not testable", path)
            continue
        out[space] = path
    return out


def cmd_findings(args) -> None:
    df = read_metrics(args.metrics)
    if len(df) == 0:
        raise DataError(f"metrics file '{args.metrics}' has no rows")
    detectors = load_json_arg(args.detectors, "--detectors") or {}
    grad_scores = load_json_arg(args.grad_scores, "--grad-scores") or {}
    groups = load_json_arg(args.groups, "--groups") or {}
    for what, value in (("--detectors", detectors), ("--grad-scores", grad_scores),
                        ("--groups", groups)):
        if not isinstance(value, dict):
            raise ConfigError(f"{what}: expected a JSON object")
    if getattr(args, "selected", None):
        # hyperparameters chosen on validation data replace the configured ones (and the grid)
        from .selection import GRID_KEY, chosen_hparams

        for name, hp in chosen_hparams(args.selected).items():
            base = {k: v for k, v in (detectors.get(name) or {}).items() if k != GRID_KEY}
            detectors[name] = {**base, **hp}
    findings = compute_findings(df, detectors, grad_scores, _parse_reconstruction(args.reconstruction),
                                groups, args.tolerance)
    write_text_atomic(args.out_csv, findings_csv_text(findings))
    if args.out_md:
        write_text_atomic(args.out_md, render_markdown(findings))
    for scope, c in summary_counts(findings).items():
        log.info("findings, scope %s: %d hold, %d do not, %d not testable", scope, c[YES], c[NO],
                 c[NOT_TESTABLE])
