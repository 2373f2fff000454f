"""The low-dimensional gradient paper's timing tables, computed from one workflow run.

Table 11 (subspace extraction time): for each subspace, the model, the number of
parameters whose gradients span it, the subspace type and K, and the time of every job
that built it (normalization statistics, AG class means or the PCA power iterations),
taken from the rules' Snakemake benchmark files. ``total_s`` is the sum over jobs (the
time on one device); ``critical_path_s`` is what it takes with one device per shard.

Table 12 (per-image detection time): for each subspace, the per-image time of the
gradient (backward) pass and of the projection, from the CUDA-synchronized in-job timers
that the ``project`` jobs store in the reduced stores, and of the prediction by each
gradient-space detector, timed here on the ID test reduced gradients.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import defaultdict
from pathlib import Path

from .errors import DataError
from .files import atomic_path, read_benchmark

log = logging.getLogger(__name__)

# The rules of each subspace stage (keys "stats", "pca", "ag") come from the workflow, which
# knows them by the rule file that defines them (common.smk: stage_rules): {"rules": [...],
# "parallel": [...]}; the parallel ones run one job per data part (or shard) and block group
# per step, the others are sequential steps.


def read_benchmarks(bench_dir: str | os.PathLike) -> dict[str, list[tuple[str, float]]]:
    """rule -> [(job path, seconds)] from Snakemake benchmark TSV files under bench_dir."""
    out: dict[str, list[tuple[str, float]]] = defaultdict(list)
    root = Path(bench_dir)
    for f in sorted(root.rglob("*.tsv")):
        rel = f.relative_to(root).with_suffix("")
        rows = read_benchmark(f)
        if rows:
            out[rel.parts[0]].append((str(rel), sum(r["s"] for r in rows) / len(rows)))
    return out


def _critical_path(jobs_by_rule: dict[str, list[tuple[str, float]]], rules, parallel) -> float:
    """Time with one device per shard: parallel rules cost their slowest job per step."""
    total = 0.0
    for rule in rules:
        jobs = jobs_by_rule.get(rule, [])
        if rule in parallel:
            steps: dict[str, float] = defaultdict(float)
            for name, s in jobs:  # group by pass (pca_pass/pass-003/part-1,
                # pca_gv/pass-003/group-0/part-1: block groups run in parallel too)
                step = re.sub(r"(/group-[^/]+)?/(shard|part)-\d+$", "", name)
                steps[step] = max(steps[step], s)
            total += sum(steps.values())
        else:
            total += sum(s for _, s in jobs)
    return total


def table11(bench_dir, subspaces: dict[str, str], card: dict | None, stage_rules: dict) -> list[dict]:
    """One row per subspace: the jobs of its stage and the statistics' (``stage_rules``)."""
    from .store import open_store

    for stage in ("stats", *subspaces):
        if stage not in stage_rules:
            raise DataError(f"--stage-rules has no rules of stage '{stage}' (known: {sorted(stage_rules)})")

    bench = read_benchmarks(bench_dir)
    rows = []
    for space, path in subspaces.items():
        attrs = dict(open_store(path).attrs)
        layout = attrs.get("layout") or {}
        n_params = None
        if layout.get("shapes") is not None:
            import numpy as np

            n_params = int(sum(int(np.prod(s)) for s in layout["shapes"]))
        rules = [*stage_rules["stats"]["rules"], *stage_rules[space]["rules"]]
        parallel = {*stage_rules["stats"]["parallel"], *stage_rules[space]["parallel"]}
        jobs = [(r, n, s) for r in rules for n, s in bench.get(r, [])]
        rows.append({
            "model": (card or {}).get("arch", "?"),
            "parameters": n_params or (card or {}).get("num_parameters"),
            "subspace": space.upper(),
            "k": attrs.get("k"),
            "jobs": len(jobs),
            "total_s": round(sum(s for _, _, s in jobs), 3),
            "critical_path_s": round(_critical_path(bench, rules, parallel), 3),
            "hardware": (card or {}).get("hardware", ""),
        })
    return rows


def table12(reduced: dict[str, dict[str, list[str]]], fitted: dict[str, list[str]],
            id_dataset: str = "id_test") -> list[dict]:
    """reduced: space -> dataset -> stores; fitted: space -> fitted detector files."""
    from .detectors.jobs import load_fitted, score_arrays
    from .runtime import Timer, hardware_description
    from .store import open_store

    rows = []
    for space, by_ds in reduced.items():
        seconds: dict[str, float] = defaultdict(float)
        n = 0
        hardware = ""
        for stores in by_ds.values():
            for p in stores:
                attrs = dict(open_store(p).attrs)
                timing = attrs.get("timing") or {}
                for k, v in (timing.get("seconds") or {}).items():
                    seconds[k] += float(v)
                n += int(attrs.get("gradspace", {}).get("n", 0))
                hardware = timing.get("hardware", hardware)
        if n == 0:
            raise DataError(f"no reduced samples for space '{space}'")
        id_stores = by_ds.get(id_dataset) or next(iter(by_ds.values()))
        n_id = sum(int(open_store(p).attrs["gradspace"]["n"]) for p in id_stores)
        for f in fitted.get(space, []):
            det, meta = load_fitted(f)
            timer = Timer()
            with timer("predict"):
                score_arrays(det, id_stores, meta.get("arrays", {}))
            grad_ms = 1e3 * seconds.get("gradient", 0.0) / n
            proj_ms = 1e3 * seconds.get("projection", 0.0) / n
            pred_ms = 1e3 * timer.totals["predict"] / n_id
            rows.append({
                "subspace": space.upper(), "detector": meta.get("name"),
                "gradient_ms": round(grad_ms, 4), "projection_ms": round(proj_ms, 4),
                "prediction_ms": round(pred_ms, 4), "total_ms": round(grad_ms + proj_ms + pred_ms, 4),
                "images": n, "hardware": hardware or hardware_description(),
            })
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:  # inside the job's temporary directory
        if rows:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def _parse_map(items, what) -> dict:
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise DataError(f"{what}: expected KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def cmd_timing_tables(args) -> None:
    card = json.loads(Path(args.card).read_text()) if args.card else None
    subspaces = _parse_map(args.subspace, "--subspace")
    reduced: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for key, stores in _parse_map(args.reduced, "--reduced").items():
        space, _, ds = key.partition(":")
        reduced[space][ds] = stores.split(",")
    fitted: dict[str, list[str]] = defaultdict(list)
    for f in args.fitted:
        fitted[Path(f).parent.name].append(f)
    out = Path(args.out_dir)
    with atomic_path(out, directory=True) as tmp:
        _write_csv(tmp / "table11_subspace_time.csv",
                   table11(args.bench_dir, subspaces, card, args.stage_rules))
        _write_csv(tmp / "table12_detection_time.csv", table12(reduced, fitted))
    log.info("timing tables -> %s", out)
