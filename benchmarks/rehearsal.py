#!/usr/bin/env python
"""Rehearse the ImageNet preset end to end on this machine, small, and measure every stage.

Runs ``config/presets/imagenet-resnet50.yaml`` *itself* through the real Snakemake workflow
(default target: metrics, model card, diagnostics, the HTML report), with an override
config that changes only data paths and sizes:

* a generated ImageFolder tree of real JPEG files (seeded, structured images: gradients,
  shapes and noise): ``imagenet/train/<wnid>/`` and ``imagenet/val/<wnid>/`` with the
  1,000 class folders of ImageNet-1k, and the four OOD sets as the preset names them
  (``ood/iNaturalist/images/``, ``ood/SUN/images/``, ``ood/Places/images/``,
  ``ood/dtd/images/<texture class>/``; each set's path is the folder above the class folders);
* torchvision ResNet-50 with random weights (``resnet50(weights=None)``, seeded), saved
  under the exact file name the preset's loader looks for in ``$TORCH_HOME``
  (``hub/checkpoints/resnet50-0676ba61.pth``); ``TORCH_HOME`` points into the work dir,
  nothing is downloaded;
* small sizes: ``train_subsample`` / source ``n``, shard counts, ``subspace.k`` and
  ``oversample``, ``subspace.iterations: 2`` (solver pinned to ``krylov``), detector sizes
  that cannot exceed N or k (knn ``k``, vim ``dim``, grad_knn ``k``, grad_react / grad_bats
  ``d``), the gradient diagnostics' sample count, ``compute.batch_size`` / ``num_workers``.
  The preset's parameter blocks (``max_params: 2000000``) and ``block_jobs: 4`` are kept.

One exception to "only sizes": ``subspace.types`` defaults to ``[pca]`` here
(``--subspace-types pca,ag`` restores the preset's both). The AG subspace of ResNet-50 on
1,000 classes has partials and a store of P x C float32 (102 GB, and 204 GB with the class
means) whatever N, more than this machine's free disk, and needs at least one ID-train
image of every class (N >= 1000). Its class sums run in ``subspace.ag.class_jobs``
class-range jobs (8 in the preset, 43 GB each by ``gradspace plan``).

While Snakemake runs, a sampler thread walks ``<workdir>/results`` every ``--interval``
seconds: total bytes in use (peak disk in use), the largest size seen of every file, and
per output (a Zarr store is a directory: the files under it are summed) so temporary and
in-job-released outputs are still counted. Files are mapped to rules (stages) through the
Snakemake log (``rule <name>:`` blocks with ``output:`` and ``benchmark:`` lines), read
while it is written. After the run, per rule: jobs, wall seconds (sum and max of the
``s`` column of the benchmark TSVs), per-sample cost (for jobs that read images: wall /
samples the job processed), peak RSS (max ``max_rss``), bytes written, peak disk in use.

Then ``gradspace plan --json`` is called with the same configs (if that command exists)
and the measured figures are printed next to the planned ones, plus the plan's
extrapolation to the preset's real sizes (no override; k = 200 and k = 1000) on one H100
and on eight. All figures go to ``<workdir>/rehearsal.json``; a Markdown table to stdout
(and ``--markdown FILE``).

    python benchmarks/rehearsal.py                      # ~20 min on 2 CPU cores
    python benchmarks/rehearsal.py --id-train 32 --keep --workdir ./rehearsal-work
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "config" / "presets" / "imagenet-resnet50.yaml"

# preset name -> (ImageFolder root under <data>/ood as the preset's path names it, class
# folders): the iNaturalist / SUN / Places subsets come as <set>/images/*.jpg, Textures (DTD)
# as dtd/images/<texture class>/*.jpg
OOD_LAYOUT = {
    "inaturalist": ("iNaturalist", ["images"]),
    "sun": ("SUN", ["images"]),
    "places": ("Places", ["images"]),
    "textures": ("dtd/images", ["banded", "dotted", "marbled", "striped"]),
}
MiB = 1 << 20


# ----------------------------------------------------------------------------------------
# data and model
# ----------------------------------------------------------------------------------------
def _image(rng, width: int, height: int, style: int):
    """A structured RGB image: a colour gradient, a few shapes, a little noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    arr = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    if style % 4 == 1:  # stripes (texture-like)
        period = rng.uniform(4, 16)
        arr += 60 * np.sin(2 * np.pi * (xx + yy * rng.uniform(-1, 1)) / period)[..., None]
    arr += rng.normal(0, 12, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(4, min(width, height) / 3)
        fill = tuple(int(v) for v in rng.uniform(0, 255, 3))
        box = [x0 - r, y0 - r, x0 + r, y0 + r]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return img


def make_data(root: Path, *, classes: int, per_class: int, ood_files: int, seed: int,
              size: tuple[int, int] = (96, 160)) -> dict:
    """Seeded ImageFolder trees of real JPEG files; returns {name: path} for the config."""
    import numpy as np

    rng = np.random.default_rng([seed, 2024])
    count = 0

    def write(path: Path, style: int):
        nonlocal count
        w, h = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
        _image(rng, w, h, style).save(path, "JPEG", quality=85)
        count += 1

    for split in ("train", "val"):
        for c in range(classes):
            d = root / "imagenet" / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                write(d / f"n{c:08d}_{split}_{i:05d}.JPEG", c)
    paths = {"imagenet": str(root / "imagenet")}
    for j, (name, (sub, classes_ood)) in enumerate(OOD_LAYOUT.items()):
        base = root / "ood" / sub
        folders = [base / c for c in classes_ood]
        for i in range(ood_files):
            d = folders[i % len(folders)]
            d.mkdir(parents=True, exist_ok=True)
            write(d / f"{name}_{i:05d}.jpg", j + 1)
        paths[name] = str(base)
    paths["jpeg_files"] = count
    return paths


def save_random_resnet50(seed: int) -> Path:
    """resnet50(weights=None), seeded, saved where the preset's loader looks for
    IMAGENET1K_V1 in $TORCH_HOME (the caller sets TORCH_HOME)."""
    import torch
    import torchvision

    from gradspace.models.load import torchvision_weights_path

    path = torchvision_weights_path("resnet50", "IMAGENET1K_V1")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = torchvision.models.resnet50(weights=None)
    torch.save(net.state_dict(), path)
    return path


def override_config(data: dict, a) -> dict:
    """Only data paths and sizes (and subspace.types, see the module docstring)."""
    ood = {}
    for name in OOD_LAYOUT:
        ood[name] = {"kind": "imagefolder", "path": data[name], "n": a.ood, "shards": a.ood_shards}
    types = [t for t in a.subspace_types.split(",") if t]
    return {
        "compute": {"batch_size": a.batch_size, "num_workers": a.num_workers},
        "data": {
            "shards": a.shards,
            "id": {
                "train": {"kind": "imagefolder", "path": data["imagenet"], "split": "train"},
                "test": {"kind": "imagefolder", "path": data["imagenet"], "split": "val",
                         "n": a.id_test, "shards": a.shards},
                "train_subsample": a.id_train,
            },
            "ood": ood,
        },
        "detectors": {
            "msp": {}, "maxlogit": {}, "energy": {"temperature": 1.0},
            "odin": {"temperature": 1000.0, "epsilon": 0.0014}, "react": {"percentile": 90},
            "bats": {"lam": 1.0}, "mahalanobis": {},
            "knn": {"k": max(1, min(1000, a.id_train // 4))},
            "vim": {"dim": max(1, min(1000, a.id_train // 3))},
        },
        "subspace": {
            "types": types,
            "k": a.k,
            "oversample": a.oversample,
            "solver": "krylov",
            "iterations": a.iterations,
            "blocks": {"max_params": 2000000},
            "block_jobs": 4,
            "diagnostics": {"n_samples": a.diag_samples},
            "detectors": {
                "msp": {"method": "grad_msp"}, "energy": {"method": "grad_energy"},
                "react": {"method": "grad_react", "d": min(50, a.k), "percentile": 70},
                "bats": {"method": "grad_bats", "d": min(50, a.k), "lam": 0.1},
                "mahalanobis": {"method": "grad_mahalanobis"},
                "knn": {"method": "grad_knn", "k": max(1, min(10, a.id_train // 4))},
            },
        },
    }


def dump_yaml(obj, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(obj, sort_keys=False))


# ----------------------------------------------------------------------------------------
# Snakemake log -> jobs, disk sampler
# ----------------------------------------------------------------------------------------
_RULE = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):\s*$")
_FIELD = re.compile(r"^\s+(\w+): (.*)$")
_TMP = re.compile(r"^\.(.+)\.tmp-.*$")


class LogParser:
    """Incremental parser of Snakemake's log: one dict per job with ``rule``, ``jobid``,
    ``output`` (list), ``benchmark``, ``wildcards`` and the ``shell`` command."""

    def __init__(self):
        self.jobs: list[dict] = []
        self._cur: dict | None = None
        self._buf = ""

    def feed(self, text: str) -> None:
        self._buf += text
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            self._line(line.rstrip("\r"))

    def close(self) -> None:
        if self._buf:
            self._line(self._buf)
            self._buf = ""

    def _line(self, line: str) -> None:
        m = _RULE.match(line)
        if m:
            self._cur = {"rule": m.group(1), "output": [], "benchmark": None, "shell": None, "log": []}
            self.jobs.append(self._cur)
            return
        if self._cur is None:
            return
        if line.startswith("Shell command: "):
            self._cur["shell"] = line[len("Shell command: "):]
            self._cur = None
            return
        if not line.startswith((" ", "\t")):
            self._cur = None  # the block ended (a job without a shell command)
            return
        f = _FIELD.match(line)
        if not f:
            return
        key, val = f.group(1), f.group(2).strip()
        if key == "output":
            self._cur["output"] = [v.strip() for v in val.split(", ") if v.strip()]
        elif key == "benchmark":
            self._cur["benchmark"] = val
        elif key == "log":
            self._cur["log"] = [v.strip() for v in val.split(", ") if v.strip()]
        elif key == "jobid":
            self._cur["jobid"] = int(val)
        elif key == "wildcards":
            self._cur["wildcards"] = dict(kv.split("=", 1) for kv in val.split(", ") if "=" in kv)

    def outputs(self) -> dict[str, str]:
        """output path (relative to the work dir) -> rule."""
        return {o: j["rule"] for j in self.jobs for o in j["output"]}


def owner(rel: str, outputs: dict[str, str]) -> str | None:
    """The output a file (relative path) belongs to: the output itself, the directory
    output it lies under, or the output whose atomic temp sibling (``.name.tmp-…``) it is
    or lies under."""
    parts = rel.split("/")
    for i in range(len(parts), 0, -1):
        head = parts[:i]
        cand = "/".join(head)
        if cand in outputs:
            return cand
        m = _TMP.match(head[-1])
        if m:
            cand = "/".join(head[:-1] + [m.group(1)])
            if cand in outputs:
                return cand
    return None


def walk_sizes(root: Path) -> dict[str, int]:
    """relative path -> st_size of every regular file under root (races ignored)."""
    out = {}
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif e.is_file(follow_symlinks=False):
                            out[os.path.relpath(e.path, root.parent)] = e.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        pass
        except (FileNotFoundError, NotADirectoryError):
            pass
    return out


class DiskSampler:
    """Walks ``workdir/<sub>`` every ``interval`` s (thread). Keeps the peak total bytes in
    use, the largest size seen of every file, the largest total seen of every output (log
    parsed as it grows) and each rule's peak bytes in use."""

    def __init__(self, workdir: Path, log_path: Path | None = None, interval: float = 0.5,
                 sub: str = "results"):
        self.workdir, self.root, self.log_path = Path(workdir), Path(workdir) / sub, log_path
        self.interval = interval
        self.parser = LogParser()
        self._log_pos = 0
        self.peak_total = 0
        self.peak_time = None
        self.file_max: dict[str, int] = {}
        self.output_max: dict[str, int] = {}
        self.rule_peak: dict[str, int] = {}
        self.unowned_max: dict[str, int] = {}
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.time()

    def start(self):
        self._t0 = time.time()
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.sample()  # a last look after the run
        self.read_log(final=True)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def read_log(self, final: bool = False) -> None:
        if self.log_path is None or not self.log_path.exists():
            return
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            fh.seek(self._log_pos)
            text = fh.read()
            self._log_pos = fh.tell()
        self.parser.feed(text)
        if final:
            self.parser.close()

    def sample(self) -> None:
        self.read_log()
        sizes = walk_sizes(self.root)
        outputs = self.parser.outputs()
        total = sum(sizes.values())
        if total > self.peak_total:
            self.peak_total, self.peak_time = total, round(time.time() - self._t0, 1)
        per_out: dict[str, int] = {}
        for rel, size in sizes.items():
            if size > self.file_max.get(rel, -1):
                self.file_max[rel] = size
            o = owner(rel, outputs)
            if o is None:
                self.unowned_max[rel] = max(size, self.unowned_max.get(rel, 0))
            else:
                per_out[o] = per_out.get(o, 0) + size
        per_rule: dict[str, int] = {}
        for o, size in per_out.items():
            if size > self.output_max.get(o, -1):
                self.output_max[o] = size
            per_rule[outputs[o]] = per_rule.get(outputs[o], 0) + size
        for r, size in per_rule.items():
            if size > self.rule_peak.get(r, -1):
                self.rule_peak[r] = size
        self.ticks += 1

    def bytes_by_rule(self) -> dict[str, int]:
        """Bytes written per rule: over its outputs, the largest total seen; files seen
        but not attributed while the log lagged are attributed now."""
        outputs = self.parser.outputs()
        out_max = dict(self.output_max)
        late: dict[str, int] = {}
        for rel, size in self.unowned_max.items():
            o = owner(rel, outputs)
            if o is not None:
                late[o] = late.get(o, 0) + size
        for o, size in late.items():
            out_max[o] = max(out_max.get(o, 0), size)
        res: dict[str, int] = {}
        for o, size in out_max.items():
            r = outputs.get(o)
            if r is not None:
                res[r] = res.get(r, 0) + size
        return res


# ----------------------------------------------------------------------------------------
# collection
# ----------------------------------------------------------------------------------------
def manifest_counts(results: Path) -> dict[str, dict[int, int]]:
    """dataset -> {shard: rows} from results/<exp>/data/<dataset>/manifest.csv."""
    out: dict[str, dict[int, int]] = {}
    for man in results.glob("data/*/manifest.csv"):
        counts: dict[int, int] = {}
        with open(man, newline="") as fh:
            for row in csv.DictReader(fh):
                k = int(row["shard"])
                counts[k] = counts.get(k, 0) + 1
        out[man.parent.name] = counts
    return out


def job_samples(job: dict, counts: dict, diag_samples: int) -> int | None:
    """Images a job ran the model on, from its shell command (--data-dir, --shard(s));
    None for jobs that read no images."""
    sh = job.get("shell") or ""
    if job["rule"] == "gradient_diagnostics":
        return sum(min(diag_samples, sum(c.values())) for c in counts.values()) or None
    dirs = re.findall(r"--data-dir\s+(\S+)", sh)
    if not dirs:
        return None
    m1 = re.search(r"--shard\s+(\d+)", sh)
    m2 = re.search(r"--shards\s+([\d,\s]+?)(?=\s--|\s*>|$)", sh)
    total = 0
    for d in dirs:
        c = counts.get(Path(d).name, {})
        if m1:
            total += c.get(int(m1.group(1)), 0)
        elif m2:
            total += sum(c.get(int(s), 0) for s in re.split(r"[,\s]+", m2.group(1).strip()) if s)
        else:
            total += sum(c.values())
    return total or None


def collect(workdir: Path, experiment: str, sampler: DiskSampler, diag_samples: int) -> dict:
    from gradspace.files import read_benchmark
    from gradspace.runtime import read_peak_memory

    results = workdir / "results" / experiment
    counts = manifest_counts(results)
    written = sampler.bytes_by_rule()
    stages: dict[str, dict] = {}
    last = {}
    for job in sampler.parser.jobs:  # a job retried after a resume counts once (its last run)
        last[(job["rule"], tuple(job["output"]), job.get("benchmark"))] = job
    for job in last.values():
        r = job["rule"]
        st = stages.setdefault(r, {"jobs": 0, "wall_s_sum": 0.0, "wall_s_max": 0.0, "cpu_s_sum": 0.0,
                                   "peak_rss_mib": 0.0, "peak_hwm_mib": 0.0, "samples": 0,
                                   "sample_s": 0.0, "benchmarks_missing": 0})
        st["jobs"] += 1
        for lp in job.get("log") or []:  # the job's own peak memory line (VmHWM)
            hwm = read_peak_memory(workdir / lp)
            if hwm:
                st["peak_hwm_mib"] = max(st["peak_hwm_mib"], hwm / MiB)
        bench = workdir / job["benchmark"] if job.get("benchmark") else None
        rows = read_benchmark(bench) if bench is not None and bench.is_file() else []
        b = rows[-1] if rows else None  # the last measurement (a job retried after a resume)
        if b is None:
            st["benchmarks_missing"] += 1
            continue
        st["wall_s_sum"] += b["s"]
        st["wall_s_max"] = max(st["wall_s_max"], b["s"])
        if b["cpu_time"] == b["cpu_time"]:
            st["cpu_s_sum"] += b["cpu_time"]
        if b["max_rss"] == b["max_rss"]:
            st["peak_rss_mib"] = max(st["peak_rss_mib"], b["max_rss"])
        n = job_samples(job, counts, diag_samples)
        if n:
            st["samples"] += n
            st["sample_s"] += b["s"]
    for r, st in stages.items():
        st["per_sample_s"] = st["sample_s"] / st["samples"] if st["samples"] else None
        st["bytes_written"] = written.get(r, 0)
        st["peak_disk_bytes"] = sampler.rule_peak.get(r, 0)
        for k in ("wall_s_sum", "wall_s_max", "cpu_s_sum", "peak_rss_mib", "peak_hwm_mib", "sample_s"):
            st[k] = round(st[k], 3)
    return {"stages": stages, "datasets": {d: sum(c.values()) for d, c in counts.items()},
            "peak_disk_bytes": sampler.peak_total, "peak_disk_at_s": sampler.peak_time,
            "sampler_ticks": sampler.ticks}


# ----------------------------------------------------------------------------------------
# plan
# ----------------------------------------------------------------------------------------
def plan_flags(env: dict) -> set[str]:
    try:
        p = subprocess.run(["gradspace", "plan", "--help"], capture_output=True, text=True, env=env,
                           timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    if p.returncode != 0:
        return set()
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", p.stdout))


def run_plan(configs: list[Path], extra: list[str], env: dict, cwd: Path) -> tuple[dict | None, str]:
    cmd = ["gradspace", "plan", "--json", "--configfile", *map(str, configs), *extra]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{' '.join(cmd)}: {exc}"
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return None, f"{' '.join(cmd)} exited {p.returncode}: {' | '.join(tail)}"
    try:
        return json.loads(p.stdout), " ".join(cmd)
    except json.JSONDecodeError as exc:
        return None, f"{' '.join(cmd)}: output is not JSON ({exc})"


def ratio(planned, measured):
    try:
        if planned is None or measured in (None, 0):
            return None
        return float(planned) / float(measured)
    except (TypeError, ValueError):
        return None


def fmt_bytes(n) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_s(s) -> str:
    if s is None:
        return "–"
    s = float(s)
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    return f"{s:.1f} s" if s >= 1 else f"{s * 1000:.0f} ms"


def fmt_r(r) -> str:
    return "–" if r is None else f"{r:.2f}"


def markdown(rep: dict) -> str:
    m = rep["measured"]
    plan = (rep.get("plan") or {}).get("rehearsal")
    pst = (plan or {}).get("stages") or {}
    order = list(m["stages"])
    order += [r for r in pst if r not in m["stages"]]
    lines = []
    if plan:
        lines += ["| stage | jobs (plan) | wall Σ / max | CPU Σ | per sample | peak RSS | plan host | ratio "
                  "| peak (VmHWM) | ratio | bytes written | plan bytes | ratio | peak disk in use | plan s "
                  "| ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    else:
        lines += ["| stage | jobs | wall Σ / max | CPU Σ | per sample | peak RSS | bytes written "
                  "| peak disk in use |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in order:
        st = m["stages"].get(r)
        p = pst.get(r) or {}
        if st is None:
            st = {"jobs": 0, "wall_s_sum": None, "wall_s_max": None, "per_sample_s": None, "cpu_s_sum": None,
                  "peak_rss_mib": None, "bytes_written": None, "peak_disk_bytes": None}
        rss = None if st["peak_rss_mib"] is None else st["peak_rss_mib"] * MiB
        wall = "–" if st["wall_s_sum"] is None else f"{fmt_s(st['wall_s_sum'])} / {fmt_s(st['wall_s_max'])}"
        ps = fmt_s(st["per_sample_s"]) if st.get("per_sample_s") else "–"
        wall += f" | {fmt_s(st.get('cpu_s_sum'))}"
        if plan:
            rb, rm, rs = (ratio(p.get("bytes_written"), st["bytes_written"]),
                          ratio(p.get("peak_job_host_bytes"), rss),
                          ratio(p.get("seconds"), st["wall_s_sum"]))
            fb = " ⚠" if (rb is not None and (st["bytes_written"] or 0) >= MiB and abs(rb - 1) > 0.2) else ""
            fm = " ⚠" if (rm is not None and abs(rm - 1) > 0.2) else ""
            hwm = (st.get("peak_hwm_mib") or 0) * MiB or None
            rh = ratio(p.get("peak_job_host_bytes"), hwm)
            fh = " ⚠" if (rh is not None and abs(rh - 1) > 0.2) else ""
            jobs = f"{st['jobs']} ({p.get('jobs', '–')})"
            lines.append(f"| {r} | {jobs} | {wall} | {ps} | {fmt_bytes(rss)} | "
                         f"{fmt_bytes(p.get('peak_job_host_bytes'))} | {fmt_r(rm)}{fm} | "
                         f"{fmt_bytes(hwm)} | {fmt_r(rh)}{fh} | "
                         f"{fmt_bytes(st['bytes_written'])} | {fmt_bytes(p.get('bytes_written'))} | "
                         f"{fmt_r(rb)}{fb} | {fmt_bytes(st['peak_disk_bytes'])} | "
                         f"{fmt_s(p.get('seconds'))} | {fmt_r(rs)} |")
        else:
            lines.append(f"| {r} | {st['jobs']} | {wall} | {ps} | {fmt_bytes(rss)} | "
                         f"{fmt_bytes(st['bytes_written'])} | {fmt_bytes(st['peak_disk_bytes'])} |")
    tot_wall = sum(st["wall_s_sum"] for st in m["stages"].values())
    lines.append("")
    lines.append(f"Total: {sum(st['jobs'] for st in m['stages'].values())} jobs, Snakemake wall time "
                 f"{fmt_s(rep['run']['wall_s'])}, job wall time Σ {fmt_s(tot_wall)}, peak disk in use "
                 f"{fmt_bytes(m['peak_disk_bytes'])} (results/) at {m['peak_disk_at_s']} s"
                 + (f"; plan ({plan.get('device', '?')}): peak disk "
                    f"{fmt_bytes(plan.get('peak_disk_bytes'))}, "
                    f"job time Σ {fmt_s(plan.get('seconds'))}, wall {fmt_s(plan.get('wall_seconds'))}"
                    if plan else "") + ".")
    if not plan:
        lines.append("")
        lines.append(f"Plan unavailable: {(rep.get('plan') or {}).get('error', 'not run')}")
    ext = (rep.get("plan") or {}).get("extrapolation") or {}
    if ext:
        sizes = next((e["plan"].get("sizes") for e in ext.values() if e.get("plan")), None)
        lines += ["", "Plan of the preset at its real sizes (no override"
                  + (": " + ", ".join(f"{d} {n:,}" for d, n in sizes.items()) if sizes else "")
                  + "), H100:", "",
                  "| k | GPUs | wall time | GPU hours | peak disk in use | bytes written "
                  "| largest job GPU memory | largest job host memory |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in ext.values():
            if e.get("plan") is None:
                lines.append(f"| {e['k']} | {e['gpus']} | unavailable: {e.get('error', '')} | | | | | |")
                continue
            pl, ps = e["plan"], e["plan"].get("stages") or {}

            def biggest(key, ps=ps):
                if not ps:
                    return "–"
                r = max(ps, key=lambda n: ps[n].get(key) or 0)
                return f"{fmt_bytes(ps[r].get(key))} ({r})"

            gh = pl.get("gpu_hours")
            lines.append(f"| {e['k']} | {e['gpus']} | {fmt_s(pl.get('wall_seconds'))} | "
                         f"{'–' if gh is None else f'{gh:.2f}'} | {fmt_bytes(pl.get('peak_disk_bytes'))} | "
                         f"{fmt_bytes(pl.get('bytes_written'))} | {biggest('peak_job_gpu_bytes')} | "
                         f"{biggest('peak_job_host_bytes')} |")
    return "\n".join(lines) + "\n"


def do_plans(rep: dict, override: Path, results: Path, env: dict) -> None:
    """The plan of the rehearsal itself (same configs; ``--device cpu``, ``--results`` for
    the exact sizes when the flags exist) and of the preset at its real sizes (no override)
    with k = 200 and k = 1000 on one and eight H100s."""
    flags = plan_flags(env)
    if "--json" not in flags:
        rep["plan"] = {"error": "`gradspace plan` is not available in this checkout "
                                "(`gradspace plan --help` failed or has no --json)"}
        return
    extra = ["--device", "cpu"] if "--device" in flags else []
    if "--probe-host" in flags:  # the job-process bases of this machine (gradspace.plan.probe_host)
        extra.append("--probe-host")
    if "--results" in flags and results.is_dir():
        extra += ["--results", str(results)]
    plan, how = run_plan([PRESET, override], extra, env, REPO)
    rep["plan"] = {"rehearsal": plan, "command": how} if plan else {"error": how}
    ext = {}
    for k in (200, 1000):
        configs, x = [PRESET], ["--device", "h100"] if "--device" in flags else []
        if "--set" in flags:
            x += ["--set", f"subspace.k={k}"]
        else:
            kfile = override.parent / f"plan-k{k}.yaml"
            dump_yaml({"subspace": {"k": k}}, kfile)
            configs.append(kfile)
        for gpus in (1, 8):
            if "--gpus" not in flags and gpus != 1:
                continue
            p, how = run_plan(configs, x + (["--gpus", str(gpus)] if "--gpus" in flags else []), env, REPO)
            ext[f"k{k}-gpus{gpus}"] = {"k": k, "gpus": gpus, "plan": p,
                                       **({"command": how} if p else {"error": how})}
    rep["plan"]["extrapolation"] = ext


# ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="work directory (default: a fresh directory under /tmp); must be empty or new")
    ap.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    ap.add_argument("--id-train", type=int, default=48, help="ID-train images (train_subsample)")
    ap.add_argument("--id-test", type=int, default=48, help="ID-test images (source n)")
    ap.add_argument("--ood", type=int, default=16, help="images per OOD set (source n)")
    ap.add_argument("--ood-files", type=int, default=24, help="JPEG files generated per OOD set")
    ap.add_argument("--per-class", type=int, default=1, help="JPEG files per ID class and split")
    ap.add_argument("--shards", type=int, default=2, help="shards of ID train / ID test")
    ap.add_argument("--ood-shards", type=int, default=1, help="shards of each OOD set")
    ap.add_argument("--k", type=int, default=8, help="subspace.k")
    ap.add_argument("--oversample", type=int, default=8, help="subspace.oversample")
    ap.add_argument("--iterations", type=int, default=2, help="subspace.iterations")
    ap.add_argument("--diag-samples", type=int, default=16,
                    help="subspace.diagnostics.n_samples (ID-train reference of n x 25.6M floats)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--subspace-types", default="pca",
                    help="subspace.types, comma separated (the preset's default is pca,ag; AG on "
                         "1000 classes needs N >= 1000 and ~200 GB, see the module docstring)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.5, help="disk sampler period (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    ap.add_argument("--no-plan", action="store_true", help="do not call `gradspace plan`")
    ap.add_argument("--resume", action="store_true",
                    help="run Snakemake again in the --workdir of an interrupted --keep run (the "
                         "setup is kept) and merge its figures with the earlier rehearsal.json")
    ap.add_argument("--replan", action="store_true",
                    help="only redo the plan comparison and the table from <workdir>/rehearsal.json "
                         "of an earlier --keep run")
    ap.add_argument("--dry-run", action="store_true",
                    help="set up, then only `snakemake -n` (job counts per rule); measures nothing")
    ap.add_argument("--snakemake-args", default="", help="extra arguments for snakemake (one string)")
    a = ap.parse_args(argv)

    if a.replan:
        if a.workdir is None:
            ap.error("--replan needs --workdir")
        return replan(a)
    if a.resume:
        if a.workdir is None:
            ap.error("--resume needs --workdir")
        return resume(a)
    fresh = a.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="gradspace-rehearsal-")) if fresh else a.workdir.resolve()
    if not fresh and workdir.exists() and any(workdir.iterdir()):
        ap.error(f"--workdir {workdir} is not empty")
    workdir.mkdir(parents=True, exist_ok=True)
    env = job_env(workdir)
    os.environ["TORCH_HOME"] = env["TORCH_HOME"]
    rep: dict = {"workdir": str(workdir), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(a).items()}}
    t0 = time.time()
    try:
        print(f"[rehearsal] work dir {workdir}", flush=True)
        t = time.time()
        data = make_data(workdir / "data", classes=1000, per_class=a.per_class, ood_files=a.ood_files,
                         seed=a.seed)
        weights = save_random_resnet50(a.seed)
        rep["setup"] = {"jpeg_files": data.pop("jpeg_files"), "weights_file": str(weights),
                        "seconds": round(time.time() - t, 1)}
        print(f"[rehearsal] {rep['setup']['jpeg_files']} JPEG files, weights {weights} "
              f"({rep['setup']['seconds']} s)", flush=True)
        cfg = override_config(data, a)
        override = workdir / "override.yaml"
        dump_yaml(cfg, override)
        import yaml

        experiment = yaml.safe_load(PRESET.read_text())["experiment"]
        log_path = workdir / "snakemake.log"
        cmd = ["snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
               "--workflow-profile", str(REPO / "profiles" / "default"),
               "--configfile", str(PRESET), str(override), "--cores", str(a.cores), "--printshellcmds",
               *a.snakemake_args.split()]
        rep["run"] = {"command": " ".join(cmd)}
        if a.dry_run:
            p = subprocess.run([*cmd, "-n", "--quiet", "rules"], env=env, cwd=REPO, text=True,
                               capture_output=True)
            print(p.stdout + p.stderr)
            return p.returncode
        print("[rehearsal] " + " ".join(cmd), flush=True)
        sampler = DiskSampler(workdir, log_path, a.interval).start()
        t = time.time()
        with open(log_path, "w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
        sampler.stop()
        rep["run"].update(rc=rc, wall_s=round(time.time() - t, 1))
        print(f"[rehearsal] snakemake exited {rc} after {rep['run']['wall_s']} s", flush=True)
        if rc != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-40:]
            print("\n".join(tail), file=sys.stderr)
        rep["measured"] = collect(workdir, experiment, sampler, a.diag_samples)
        rep["override"] = cfg
        if a.no_plan:
            rep["plan"] = {"error": "--no-plan"}
        else:
            do_plans(rep, override, workdir / "results" / experiment, env)
        rep["total_s"] = round(time.time() - t0, 1)
        (workdir / "rehearsal.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
        md = markdown(rep)
        print(md)
        if a.markdown:
            a.markdown.write_text(md)
        print(f"[rehearsal] figures in {workdir / 'rehearsal.json'}", flush=True)
        return rc
    finally:
        if not a.keep:
            keep = workdir.parent / (workdir.name + "-rehearsal.json")
            if (workdir / "rehearsal.json").exists():
                shutil.copy(workdir / "rehearsal.json", keep)
                print(f"[rehearsal] work dir removed; figures kept in {keep}", flush=True)
            shutil.rmtree(workdir, ignore_errors=True)


def job_env(workdir: Path) -> dict:
    """The environment of the rehearsal's Snakemake and gradspace calls: the work dir's
    $TORCH_HOME (the saved random weights) and this interpreter's bin directory first."""
    env = dict(os.environ)
    env["TORCH_HOME"] = str(workdir / "torch")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def resume(a) -> int:
    """Snakemake again in an earlier work dir; the job-to-rule map comes from both logs,
    the disk peaks are the larger of the earlier run's and this one's."""
    import yaml

    workdir = a.workdir.resolve()
    old = json.loads((workdir / "rehearsal.json").read_text())
    env = job_env(workdir)
    experiment = yaml.safe_load(PRESET.read_text())["experiment"]
    cmd = old["run"]["command"].split()
    log1, log2 = workdir / "snakemake.log", workdir / "snakemake-resume.log"
    sampler = DiskSampler(workdir, log2, a.interval)
    sampler.parser.feed(log1.read_text(errors="replace") + "\n")
    sampler.start()
    t = time.time()
    with open(log2, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    sampler.stop()
    print(f"[rehearsal] resumed snakemake exited {rc} after {time.time() - t:.1f} s", flush=True)
    first = old["measured"]
    for r, st in first["stages"].items():  # earlier disk figures of rules seen in the first run
        sampler.rule_peak[r] = max(sampler.rule_peak.get(r, 0), st.get("peak_disk_bytes") or 0)
    rep = dict(old)
    rep["run"] = {**old["run"], "first_rc": old["run"]["rc"], "first_wall_s": old["run"]["wall_s"],
                  "rc": rc, "resume_wall_s": round(time.time() - t, 1),
                  "wall_s": round(old["run"]["wall_s"] + time.time() - t, 1)}
    meas = collect(workdir, experiment, sampler, a.diag_samples)
    for r, st in meas["stages"].items():
        before = (first["stages"].get(r) or {}).get("bytes_written") or 0
        st["bytes_written"] = max(st["bytes_written"], before)
    if first["peak_disk_bytes"] >= meas["peak_disk_bytes"]:
        meas["peak_disk_bytes"], meas["peak_disk_at_s"] = first["peak_disk_bytes"], first["peak_disk_at_s"]
    else:
        meas["peak_disk_at_s"] = f"{meas['peak_disk_at_s']} (after the resume)"
    rep["measured"] = meas
    if a.no_plan:
        rep["plan"] = {"error": "--no-plan"}
    else:
        do_plans(rep, workdir / "override.yaml", workdir / "results" / experiment, env)
    (workdir / "rehearsal.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
    md = markdown(rep)
    print(md)
    if a.markdown:
        a.markdown.write_text(md)
    return rc


def replan(a) -> int:
    workdir = a.workdir.resolve()
    rep = json.loads((workdir / "rehearsal.json").read_text())
    env = job_env(workdir)
    import yaml

    experiment = yaml.safe_load(PRESET.read_text())["experiment"]
    do_plans(rep, workdir / "override.yaml", workdir / "results" / experiment, env)
    (workdir / "rehearsal.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
    md = markdown(rep)
    print(md)
    if a.markdown:
        a.markdown.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
