"""``gradspace plan``: what a config will cost before anything runs.

For a config (the demo, a preset, a user's file; merged and filled with the schema's
defaults exactly as Snakemake does) the plan lists, per stage (= Snakemake rule): the
number of jobs, per-job peak GPU and host memory, bytes written, FLOPs and the estimated
run time on a named device, and over the whole run the peak disk in use and the GPU-hours.

How each figure is formed
-------------------------
- **Sizes.** Samples per dataset come, in this order, from the prepared manifests of an
  earlier run (exact), ``--sizes`` (``id_train=50000,...``), ``n`` / ``train_subsample`` in
  the config, an ImageFolder tree on disk (files counted) or the table of known datasets
  below. Parameters per block and block group come from the model the config names, built
  with random weights (nothing is downloaded) and split by the same layout code the jobs
  use; FLOPs and activation bytes per sample from one traced forward pass
  (``torch.utils.flop_counter``, ``saved_tensors_hooks``).
- **Bytes written** follow the stores' formats (``gradspace.store`` layouts: features and
  logits float32, PCA partials and bases float32, Krylov records float64, ...), uncompressed:
  Zarr's zstd saves a few per cent on float data, more on post-ReLU features.
- **Memory** = the job process before its work (``CALIBRATION``: the interpreter with torch
  loaded, or for the jobs that never import torch the peak of a process importing just
  their import set, ``HOST_PROBES``; ``--probe-host`` measures these probes on the
  machine at hand) + the model +
  the job's working set: the loader batch, the per-sample gradient chunk (at most the
  engine's 1 GiB workspace, ``gradspace.grads.engine.MAX_CHUNK_BYTES``) with its
  activations, and the job's own arrays (V of its block group, the float64 accumulator of
  G^T U, the statistics). On a GPU the working set is on the device; on the CPU it is all
  host memory.
- **Time** = FLOPs / (device peak × efficiency). The efficiency of each kind of work
  (forward, per-sample gradient) is measured by this project's benchmarks
  (``benchmarks/rehearsal.py`` on the CPU, ``benchmarks/gpu_check.sh`` on a GPU, whose JSON
  ``--calibration`` reads); a device without a measurement uses the CPU-measured fraction
  of peak, and the plan says so.
- **Passes.** ``subspace.iterations: N`` gives N + 1 data passes and one lift pass; with
  ``auto`` the plan assumes the worst case, ``max_iterations`` + 1 passes.
- **Peak disk** = every kept output + the largest transient set: one PCA iteration's
  partials and two bases ((data_parts + 2) x |V|) and the AG partials (data_parts x |P x C|),
  which the design releases as soon as they are consumed (docs/architecture.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

GiB = 1 << 30
REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"

# Peak throughput (FLOP/s) of the named devices, from the vendors' data sheets (dense,
# no sparsity; H100/H200 SXM). "cpu" is this project's CI/dev machine: its peak is the
# fp32 GEMM throughput measured by torch.mm (benchmarks/rehearsal.py prints it).
DEVICES = {
    "cpu": {
        "label": "CPU, 2 cores (dev/CI machine)",
        "memory": 24e9,
        "peak": {"fp32": 9.0e10, "tf32": 9.0e10, "bf16": 9.0e10},
        "gpu": False,
    },
    "a100": {
        "label": "NVIDIA A100 80GB SXM",
        "memory": 80e9,
        "peak": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12},
        "gpu": True,
    },
    "h100": {
        "label": "NVIDIA H100 SXM",
        "memory": 80e9,
        "peak": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12},
        "gpu": True,
    },
    "h200": {
        "label": "NVIDIA H200 SXM",
        "memory": 141e9,
        "peak": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12},
        "gpu": True,
    },
}

# Measured constants (see benchmarks/README.md, "ResNet-50 rehearsal"):
# - host bytes of a job process before its work: the interpreter with torch (+torchvision,
#   zarr) imported, and one with numpy/zarr only (array jobs that never import torch);
# - efficiency = achieved FLOP/s / peak of each kind of work on this CPU;
# - workspace: bytes per per-sample-gradient element held at the peak of a chunk step
#   (gradient buffer + normalized copy).
CALIBRATION = {
    "host_base_torch": 0.68e9,
    # jobs that load a model but run no batches (load_model, model_card)
    "host_base_light": 0.51e9,
    # jobs that never import torch start from what their imports map, which is exactly
    # what the probe of their import set measures (HOST_PROBES; figures of this machine):
    # array jobs (numpy + zarr), the score-file jobs (numpy), the table jobs (numpy +
    # pandas), the nearest-neighbour detectors' scoring (numpy + zarr + faiss)
    "host_base_numpy": 0.0541e9,
    "host_base_bare": 0.0325e9,
    "host_base_tables": 0.0763e9,
    "host_base_search": 0.0778e9,
    # float64 copies of one parameter block a reduce holds at its peak (the float32 read,
    # its float64 sum, LAPACK's copy, Q, and Q @ Q2 with its float32 cast when written;
    # rehearsal: 2.0 GB for a 2.05M x 16 block)
    "reduce_copies": 7.0,
    "efficiency": {"forward": 0.45, "persample": 0.25, "matmul": 0.6},
    "workspace_factor": 2.0,
    # seconds from job start to work: interpreter, imports, model load (demo benchmarks)
    "job_start_seconds": {"torch": 4.0, "numpy": 1.0},
    # host-side work of the reduces (float64 QR, numpy) and store throughput (Zarr v3 with
    # zstd and crc32c, float32 data: 127 MB/s written, 94 MB/s read on this machine)
    "host_linalg_flops": 2.0e9,
    "io_bytes_per_s": 1.0e8,
}

# Host memory of a job process depends on the machine as well as on the work: how the
# shared libraries (libtorch alone is ~0.5 GB of code) are paged in and mapped differs
# between kernels and file systems. The bases above were measured together with the RSS of
# these probes (a fresh interpreter that imports what the jobs import; the torch one also
# runs one small forward and backward pass) on the same machine; ``probe_host`` measures the
# probes where it runs and moves the bases by the difference.
HOST_PROBES = {
    "torch": (
        "import numpy, torch, torchvision, zarr\n"
        "torch.manual_seed(0)\n"
        "m = torchvision.models.resnet18(num_classes=10)\n"
        "m(torch.randn(8, 3, 32, 32)).sum().backward()\n"
    ),
    "numpy": "import numpy, zarr\n",
    "bare": "import numpy\n",
    "tables": "import numpy, pandas\n",
    "search": "import numpy, zarr, faiss\n",
}
# the torch probe where host_base_torch / host_base_light were measured (the torch bases
# are moved by the difference; the numpy-only bases are their probes' figures themselves)
PROBE_REFERENCE = {"torch": 0.843e9}


_PEAK_RSS = """
import resource, sys
try:  # the peak of this process's own memory map (ru_maxrss would carry the parent's across exec)
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
except OSError:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = ru if sys.platform == "darwin" else ru * 1024
sys.stdout.write(str(peak))
"""


def _probe_rss(code: str, python: str) -> float:
    """Peak RSS in bytes of a fresh ``python`` running ``code``."""
    out = subprocess.run(
        [python, "-c", code + _PEAK_RSS], capture_output=True, text=True, check=False, timeout=300
    )
    if out.returncode != 0:
        raise RuntimeError(f"host probe failed under {python}: {out.stderr.strip()[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def probe_host(python: str | None = None) -> dict:
    """Host bases for this machine: ``CALIBRATION``'s, moved by how much more (or less) the
    probes' RSS is here than where the bases were measured. Returns the calibration's
    ``host`` entries plus the raw probe figures (``probe_rss``)."""
    python = python or sys.executable
    rss = {kind: _probe_rss(code, python) for kind, code in HOST_PROBES.items()}
    dt = rss["torch"] - PROBE_REFERENCE["torch"]
    return {
        "host_base_torch": CALIBRATION["host_base_torch"] + dt,
        "host_base_light": CALIBRATION["host_base_light"] + dt,
        **{f"host_base_{kind}": rss[kind] for kind in ("numpy", "bare", "tables", "search")},
        "probe_rss": rss,
    }


# Sizes of public datasets the presets name, for plans made before the data is on disk.
KNOWN_SIZES = {
    ("imagefolder", "imagenet1k", "train"): 1_281_167,
    ("imagefolder", "imagenet1k", "val"): 50_000,
    ("imagefolder", "inaturalist", None): 10_000,
    ("imagefolder", "sun", None): 10_000,
    ("imagefolder", "places", None): 10_000,
    ("imagefolder", "textures", None): 5_640,
    ("cifar10", None, "train"): 50_000,
    ("cifar10", None, "test"): 10_000,
    ("cifar100", None, "train"): 50_000,
    ("cifar100", None, "test"): 10_000,
    ("svhn", None, "train"): 73_257,
    ("svhn", None, "test"): 26_032,
    ("svhn", None, "extra"): 531_131,
    ("fashion_mnist", None, "train"): 60_000,
    ("fashion_mnist", None, "test"): 10_000,
    ("sklearn_digits", None, None): 1_797,
    ("opencv_digits", None, None): 5_000,
    ("mnist_demo", None, None): 5_000,
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}

# Stages whose jobs never import torch (they start faster and smaller).
NUMPY_STAGES = {
    "findings",
    "score_detector",
    "evaluate",
    "timing_tables",
    "report",
    "gradstats_reduce",
    "ag_reduce",
    "pca_init",
    "pca_reduce",
    "pca_diagnostics",
    "pca_settings",
    "pca_finalize",
    "project_merge",
    "score_grad_detector",
    "ensemble",
    "subspace_diagnostics",
    "score_candidate",
    "score_grad_candidate",
    "select_detector",
    "select_grad_detector",
    "select_ensemble_alpha",
    "selection_table",
    "check_validation",
}

# Which key to change when a stage is over a budget.
DISK_KEYS = {
    "pca": "subspace.data_parts (fewer partials at once), subspace.oversample or subspace.k",
    "ag": "subspace.data_parts (fewer P x C partials)",
    "extract": "data.shards or the datasets' n",
}
GPU_KEYS = {
    "persample": "subspace.chunk_size / gradients.chunk_size (smaller gradient chunks) or "
    "subspace.block_jobs (a smaller block group per job)",
    "forward": "compute.batch_size",
}


@dataclass
class Stage:
    name: str
    torch: bool = True
    jobs: int = 0
    bytes_written: float = 0.0
    kept_bytes: float = 0.0
    io_bytes: float = 0.0
    peak_job_gpu_bytes: float = 0.0
    peak_job_host_bytes: float = 0.0
    flops: float = 0.0
    seconds: float = 0.0
    kept: bool = True
    gpu: bool = False
    key: str = ""
    note: str = ""

    def add_job(
        self,
        written: float,
        host: float,
        gpu: float = 0.0,
        flops: float = 0.0,
        kept: float | None = None,
        read: float = 0.0,
    ) -> None:
        """One job: bytes it writes (``kept`` of them stay after the run; default all of
        them for a kept stage, none for a temporary one), its peak memory and FLOPs."""
        self.jobs += 1
        self.bytes_written += written
        self.kept_bytes += (written if self.kept else 0.0) if kept is None else kept
        self.peak_job_host_bytes = max(self.peak_job_host_bytes, host)
        self.peak_job_gpu_bytes = max(self.peak_job_gpu_bytes, gpu)
        self.flops += flops
        self.io_bytes += read + written


@dataclass
class ModelFacts:
    num_params: int
    feature_dim: int
    num_classes: int
    forward_flops: float  # per sample
    saved_bytes: float  # autograd-saved activation bytes per sample
    peak_activation_bytes: float  # largest module output per sample (no-grad forward)
    input_bytes: float  # one input sample, float32
    block_sizes: dict[str, int] = field(default_factory=dict)  # subspace blocks
    group_sizes: dict[str, int] = field(default_factory=dict)  # subspace block groups
    grad_params: int = 0  # gradients.params selection


# ---------------------------------------------------------------------------------------
# config


def load_config(files, overrides: Mapping | None = None) -> dict:
    """Merge YAML config files in order (later keys win, mappings merged deeply, like
    Snakemake's --configfile), then fill and check them with the workflow's schema."""
    import yaml
    from snakemake.utils import validate

    cfg: dict = {}
    for f in files or [REPO / "config" / "config.yaml"]:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        with open(path) as fh:
            _merge(cfg, yaml.safe_load(fh) or {})
    if overrides:
        _merge(cfg, dict(overrides))
    try:
        validate(cfg, str(SCHEMA), set_default=True)
    except Exception as exc:  # snakemake.exceptions.WorkflowError
        raise ConfigError(f"config does not match {SCHEMA.name}: {str(exc).splitlines()[0]}") from exc
    return cfg


def _merge(base: dict, new: Mapping) -> None:
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def _set_path(cfg: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    d = cfg
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def parse_overrides(items) -> dict:
    """``key.sub=value`` pairs (values parsed as YAML) into a nested mapping."""
    import yaml

    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        _set_path(out, k.strip(), yaml.safe_load(v))
    return out


# ---------------------------------------------------------------------------------------
# sizes


def n_shards(cfg: dict, dataset: str) -> int:
    """Shards of one dataset (its own ``shards``, else the ID block's, else data.shards);
    the workflow's rule files call this too, so plan and workflow never disagree."""
    data = cfg["data"]
    if dataset in ("id_train", "id_test", "id_val"):
        idc = data["id"]
        own = idc.get("test" if dataset == "id_test" else "train") or {}
        return int(own.get("shards", idc.get("shards", data["shards"])))
    if dataset not in data["ood"]:  # a validation OOD set (validation.ood)
        return int(((cfg.get("validation") or {}).get("ood") or {})[dataset].get("shards", data["shards"]))
    return int(data["ood"][dataset].get("shards", data["shards"]))


def _count_images(root: Path) -> int:
    n = 0
    for _dir, _subdirs, files in os.walk(root):
        n += sum(1 for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return n


# Sources whose classes all have the same number of samples in every split: a `classes`
# subset of them has len(classes) / classes of the split's samples.
BALANCED_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


def _class_share(src: Mapping, n: int | None) -> int | None:
    classes = src.get("classes")
    if n is None or not classes or src["kind"] not in BALANCED_CLASSES:
        return n
    return n * len(classes) // BALANCED_CLASSES[src["kind"]]


def _source_size(src: Mapping, name: str, split) -> int | None:
    kind = src["kind"]
    if kind in ("skimage_textures", "skimage_photos") and src.get("n"):
        return int(src["n"])
    if kind == "imagefolder" and src.get("path"):
        root = Path(src["path"]) / split if isinstance(split, str) and split else Path(src["path"])
        if root.is_dir():
            return _count_images(root)
    for key in ((kind, name, split), (kind, None, split), (kind, name, None), (kind, None, None)):
        if key in KNOWN_SIZES:
            return KNOWN_SIZES[key]
    return None


def dataset_sizes(cfg: dict, results: Path | None = None, given: Mapping | None = None) -> dict[str, int]:
    """Samples per dataset (see the module docstring for the order of the sources)."""
    from .selection import validation_sets

    given = dict(given or {})
    idc = cfg["data"]["id"]
    out: dict[str, int] = {}
    val = validation_sets(cfg)
    val_ood = ((cfg.get("validation") or {}).get("ood") or {}) if val else {}
    holdout = int(cfg["validation"]["id_holdout"]) if val else 0
    datasets = ["id_train", "id_test", *cfg["data"]["ood"], *val]
    for ds in datasets:
        manifest = results / "data" / ds / "manifest.csv" if results else None
        if manifest is not None and manifest.is_file():
            with open(manifest) as fh:
                out[ds] = max(0, sum(1 for _ in fh) - 1)
            continue
        if ds in given:
            out[ds] = int(given[ds])
            continue
        if ds == "id_val":  # held out of the ID-train pool, which keeps the rest
            out[ds] = holdout
            continue
        if ds in val_ood:
            src = val_ood[ds]
            n = _class_share(src, _source_size(src, ds, src.get("split")))
            if n is None:
                raise ConfigError(f"cannot tell how many samples validation set '{ds}' has before it "
                                  f"is prepared (source kind {src.get('kind')}); give it with --sizes {ds}=N")
            out[ds] = min(n, int(src["n"])) if src.get("n") else int(n)
            continue
        if ds in ("id_train", "id_test"):
            part = "train" if ds == "id_train" else "test"
            if idc.get(part):
                src = idc[part]
                split = src.get("split")
                if isinstance(split, Mapping):
                    split = split.get(ds)
                n = _source_size(src, idc["name"], split)
                if n is not None and src.get("n"):
                    n = min(n, int(src["n"]))
            elif isinstance(idc["source"].get("split"), Mapping):
                # one source, a split per role: each role reads its own split
                src = idc["source"]
                n = _class_share(src, _source_size(src, idc["name"], src["split"].get(ds)))
                if n is not None and src.get("n"):
                    n = min(n, int(src["n"]))
            else:
                src = idc["source"]
                total = _class_share(src, _source_size(src, idc["name"], src.get("split")))
                if src.get("n") and total is not None:
                    total = min(total, int(src["n"]))
                tf = float(idc["test_fraction"])
                n = (
                    None
                    if total is None
                    else (total - round(total * tf) if ds == "id_train" else round(total * tf))
                )
            if ds == "id_train" and n is not None and holdout:
                # id_val is drawn from the ID-train pool first; id_train subsamples the rest
                if holdout >= n:
                    raise ConfigError(f"validation.id_holdout = {holdout} leaves no ID-train samples "
                                      f"(the pool has {n})")
                n -= holdout
            if ds == "id_train" and n is not None and idc.get("train_subsample"):
                n = min(n, int(idc["train_subsample"]))
        else:
            src = cfg["data"]["ood"][ds]
            n = _class_share(src, _source_size(src, ds, src.get("split")))
            if n is not None and src.get("n"):
                n = min(n, int(src["n"]))
        if n is None:
            raise ConfigError(
                f"cannot tell how many samples dataset '{ds}' has before it is prepared "
                f"(source kind {cfg['data']['ood'][ds]['kind'] if ds in cfg['data']['ood'] else ''}"
                f"); give it with --sizes {ds}=N"
            )
        out[ds] = int(n)
    return out


# ---------------------------------------------------------------------------------------
# model facts


def model_facts(cfg: dict) -> ModelFacts:
    """Parameter counts, FLOPs and activation bytes of the config's model (random weights)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .models.architectures import build_model
    from .subspace.layout import build_layout, resolve_params

    m = cfg["model"]
    d = cfg["data"]
    src = m["source"]
    arch = src if src.startswith("torchvision:") else m["arch"]
    model = build_model(arch, int(d["id"]["num_classes"]), int(d["channels"])).eval()
    x = torch.zeros(1, int(d["channels"]), int(d["image_size"]), int(d["image_size"]))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    peak = [0]

    def _hook(_mod, _inp, out):
        if torch.is_tensor(out):
            peak[0] = max(peak[0], out.numel() * out.element_size())

    handles = [mod.register_forward_hook(_hook) for mod in model.modules() if not list(mod.children())]
    saved = [0]

    def _pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(_pack, lambda t: t):
        model(x).sum()
    for h in handles:
        h.remove()
    sub = cfg["subspace"]
    layout = build_layout(model, sub["params"], sub["blocks"])
    blocks = {b: layout.block_size(b) for b in layout.block_names}
    groups = layout.block_groups(sub["block_jobs"])
    grad_sel = resolve_params(model, cfg["gradients"]["params"])
    return ModelFacts(
        num_params=sum(p.numel() for p in model.parameters()),
        feature_dim=int(model.feature_dim),
        num_classes=int(model.num_classes),
        forward_flops=float(fc.get_total_flops()),
        saved_bytes=float(saved[0]),
        peak_activation_bytes=float(peak[0]),
        input_bytes=float(x.numel() * 4),
        block_sizes=blocks,
        group_sizes={g: sum(blocks[b] for b in bs) for g, bs in groups.items()},
        grad_params=int(sum(p.numel() for p in grad_sel.values())),
    )


# ---------------------------------------------------------------------------------------
# the plan


def _pca_passes(sub: Mapping) -> int:
    its = sub["iterations"]
    return (int(sub["max_iterations"]) if its == "auto" else int(its)) + 1


def data_parts(cfg: dict) -> list[list[int]]:
    """subspace.data_parts contiguous sets of ID-train shards (one job per set and pass;
    the workflow's rule files call this too)."""
    S = n_shards(cfg, "id_train")
    n = min(int(cfg["subspace"]["data_parts"]), S)
    return [list(range(i * S // n, (i + 1) * S // n)) for i in range(n)]


def _shard_rows(n: int, shards: int) -> list[int]:
    return [(i + 1) * n // shards - i * n // shards for i in range(shards)]


class Planner:
    """Builds the per-stage table for one config on one device."""

    def __init__(
        self,
        cfg: dict,
        sizes: Mapping[str, int],
        facts: ModelFacts,
        device: str = "cpu",
        gpus: int = 1,
        calibration: Mapping | None = None,
    ):
        if device not in DEVICES:
            raise ConfigError(f"unknown device {device!r}; known: {', '.join(DEVICES)}")
        self.cfg, self.sizes, self.f = cfg, dict(sizes), facts
        self.device, self.dev, self.gpus = device, DEVICES[device], max(1, int(gpus))
        self.cal = json.loads(json.dumps(CALIBRATION))
        self.calibrated = device == "cpu"
        if calibration and calibration.get("host"):
            self.cal.update({k: v for k, v in calibration["host"].items() if k != "probe_rss"})
        if calibration and (calibration.get("stages") or calibration.get("efficiency")):
            eff = (
                efficiency_from_gpu_check(calibration, device)
                if "stages" in calibration
                else calibration.get("efficiency", {}).get(device)
            )
            if eff:
                self.cal["efficiency"].update(eff)
                self.calibrated = True
        self.precision = cfg["compute"]["precision"]
        self.stages: dict[str, Stage] = {}
        self.transient: dict[str, float] = {}

    # ---- helpers
    def stage(self, name: str, gpu: bool = False, kept: bool = True, key: str = "") -> Stage:
        if name not in self.stages:
            self.stages[name] = Stage(
                name, torch=name not in NUMPY_STAGES, gpu=gpu and self.dev["gpu"], kept=kept, key=key
            )
        return self.stages[name]

    def _chunk(self, p: int, size: int) -> int:
        from .grads.engine import MAX_CHUNK_BYTES

        # a chunk never spans loader batches: at most compute.batch_size samples
        batch = int(self.cfg["compute"]["batch_size"])
        return max(1, min(int(size), batch, MAX_CHUNK_BYTES // max(1, 4 * p)))

    def _seconds(self, flops: float, kind: str) -> float:
        peak = self.dev["peak"].get(self.precision, self.dev["peak"]["fp32"])
        return flops / (peak * self.cal["efficiency"][kind])

    def _mem(self, work: float, host_extra: float = 0.0, torch: bool = True) -> tuple[float, float]:
        """(host, gpu) bytes of a job whose device working set is ``work``."""
        base = self.cal["host_base_torch" if torch else "host_base_numpy"]
        model = 2.0 * 4 * self.f.num_params if torch else 0.0
        if self.dev["gpu"]:
            return base + model + host_extra, work + 4.0 * self.f.num_params
        return base + model + host_extra + work, 0.0

    def _forward_work(self, batch: int) -> float:
        return batch * (self.f.input_bytes + 3.0 * self.f.peak_activation_bytes)

    def _persample_work(self, p: int, size: int, extra: float = 0.0) -> float:
        """Working set of a per-sample gradient job over ``p`` parameters."""
        c = self._chunk(p, size)
        batch = int(self.cfg["compute"]["batch_size"])
        ws = self.cal["workspace_factor"] * c * p * 4
        return ws + c * self.f.saved_bytes + batch * self.f.input_bytes + extra

    # ---- the stages
    def build(self) -> dict:
        cfg, f, sz = self.cfg, self.f, self.sizes
        datasets = list(sz)
        # validation sets (hyperparameter selection) are prepared and extracted like the
        # others, but only grid candidates (and, with an alpha grid, the ensemble's members)
        # are scored on them; the test sets are scored by every detector
        from .selection import validation_sets

        val = [d for d in validation_sets(cfg) if d in sz]
        scored = [d for d in datasets if d != "id_train" and d not in val]
        self.val = val
        F = f.forward_flops
        batch = int(cfg["compute"]["batch_size"])
        C, D = f.num_classes, f.feature_dim

        # data and model
        for ds in datasets:
            src = self._source(ds)
            st = self.stage("prepare")
            img = cfg["data"]["image_size"] ** 2 * cfg["data"]["channels"]
            files = src.get("kind") == "imagefolder"
            written = sz[ds] * (110 + (0 if files else img))
            # array sources: the uint8 images, uncompressed (an upper bound: zstd packs digits 4x)
            st.add_job(written, self.cal["host_base_torch"] + (0 if files else 2.0 * sz[ds] * img))
        training = cfg["model"]["source"] == "train"
        mst = self.stage("train" if training else "load_model")
        mst.add_job(
            4.0 * f.num_params,
            *(
                self._mem(self._forward_work(batch))
                if training
                # the loaded state dict, the model and the normalized checkpoint being saved
                # (rehearsal: 873 MiB VmHWM for ResNet-50, like model_card's 871 MiB)
                else (self.cal["host_base_light"] + 3 * 4.0 * f.num_params, 0.0)
            ),
            flops=3
            * F
            * sz["id_train"]
            * (cfg["model"]["train"]["epochs"] if cfg["model"]["source"] == "train" else 0),
        )
        self.stage("model_card").add_job(1.3e3, self.cal["host_base_light"] + 3 * 4.0 * f.num_params)

        # extraction and feature detectors
        row_emb = 4 * (D + C) + 3 * 8
        for ds in datasets:
            for rows in _shard_rows(sz[ds], n_shards(cfg, ds)):
                self.stage("extract", gpu=True, key="forward").add_job(
                    rows * row_emb, *self._mem(self._forward_work(batch)), flops=F * rows
                )
        dets = self._detectors(cfg["detectors"])
        grad_keys = {n for n, d in dets.items() if d["method"] == "stored_grad_score"}
        if grad_keys:
            n_scores = len(cfg["gradients"]["scores"])
            for ds in scored:
                for rows in _shard_rows(sz[ds], n_shards(cfg, ds)):
                    p = f.grad_params
                    self.stage("grad_scores", gpu=True, key="persample").add_job(
                        rows * (8 * n_scores + 16),
                        *self._mem(self._persample_work(p, cfg["gradients"]["chunk_size"])),
                        flops=rows * (3 * F + 4 * p),
                    )
        n_train = sz["id_train"]
        sub = cfg["subspace"]
        spaces = list(sub["types"]) if sub["enabled"] else []
        ens_grid = bool(spaces and (sub["ensemble"].get("grid") or {}).get("alpha"))
        ens_members = ({n for n in sub["ensemble"]["detectors"] if n in (sub["detectors"] or {})}
                       if ens_grid else set())
        for name, d in dets.items():
            for _ in range(d["fits"]):
                self.stage("fit_candidate" if d["grid"] else "fit_detector").add_job(
                    *self._fit_bytes(d["method"], n_train, D, C, d["hparams"])
                )
            if d["grid"]:  # every candidate on every validation set, then the choice
                for _ in range(d["fits"]):
                    for ds in val:
                        self._score_feature(d, ds, n_train, candidate=True)
                self.stage("select_detector").add_job(2e3 + 300.0 * d["fits"], self.cal["host_base_tables"])
            # the test sets; with an alpha grid the ensemble's members on validation too
            for ds in scored + (val if name in ens_members else []):
                self._score_feature(d, ds, n_train)

        if spaces:
            self._subspace(spaces, ["id_train", *scored, *(val if self._grad_val(ens_grid) else [])],
                           scored, val, ens_grid)
        if val:
            self.stage("check_validation").add_job(2e2, self.cal["host_base_tables"])
            self.stage("selection_table").add_job(2e4, self.cal["host_base_tables"])
        n_files = len(scored) * (
            len(dets)
            + (len(self._detectors(cfg["subspace"]["detectors"])) * 2 * len(spaces) if spaces else 0)
        )
        self.stage("evaluate").add_job(
            150.0 * n_files + 5e3,
            0.16e9 + 16.0 * sum(sz.values()),  # pandas + matplotlib
        )
        # reads metrics.csv (and the reconstruction tables), writes findings.csv / .md
        self.stage("findings").add_job(2e3, self.cal["host_base_tables"])
        if spaces:
            self.stage("timing_tables").add_job(2e3, self.cal["host_base_tables"])
        gdets = self._detectors(cfg["subspace"]["detectors"]) if spaces else {}
        ens = [n for n in cfg["subspace"]["ensemble"]["detectors"] if n in gdets and n in cfg["detectors"]]
        n_hist = len(dets) + len(spaces) * (len(gdets) + len(ens))  # one histogram per scored detector
        self.stage("report").add_job(self._report_bytes(len(scored) - 1, n_hist, spaces), 2e8)
        return self.summary()

    def _grad_val(self, ens_grid: bool) -> bool:
        """Whether the validation sets are projected: a gradient detector's grid or the
        ensemble's alpha grid scores reduced gradients on them."""
        if not self.val:
            return False
        gd = self.cfg["subspace"]["detectors"] or {}
        return ens_grid or any((spec or {}).get("grid") for spec in gd.values())

    def _score_feature(self, d: Mapping, ds: str, n_train: int, candidate: bool = False) -> None:
        """One feature-space scoring job of detector ``d`` on dataset ``ds``."""
        f, sz = self.f, self.sizes
        batch = int(self.cfg["compute"]["batch_size"])
        if d["needs_model"]:
            self.stage("score_model_candidate" if candidate else "score_model_detector",
                       gpu=True, key="forward").add_job(
                # the input gradient keeps about half the activations a weight gradient does
                8 * sz[ds] + 128,
                *self._mem(batch * (f.input_bytes + 0.5 * f.saved_bytes)),
                flops=4 * f.forward_flops * sz[ds],
            )
        else:
            self.stage("score_candidate" if candidate else "score_detector").add_job(
                8 * sz[ds] + 128,
                self._score_host(d["method"], sz[ds], n_train, f.feature_dim),
            )

    def _report_bytes(self, n_ood: int, n_dets: int, spaces) -> float:
        """report/: index.html embeds every PNG as base64 (4/3 of its bytes) and figures/
        keeps them too. PNG sizes fitted on the demo's and the ResNet-50 rehearsal's reports
        (matplotlib, default dpi): a score histogram 10 KB + 6 KB per OOD panel, the heatmap
        40 KB + 1.2 KB per cell, the ROC figure 42 KB per OOD panel, each extra diagnostics
        figure (the spectrum per subspace, the gradient diagnostics) ~32 KB; the HTML text
        ~150 B per table row (one per job in the run-time table, one per metric row)."""
        png = n_dets * (10e3 + 6e3 * n_ood) + 40e3 + 1.2e3 * n_dets * (n_ood + 1) + 42e3 * n_ood
        extras = 32e3 * (1 + len(spaces))
        jobs = sum(st.jobs for st in self.stages.values()) + 1
        text = 30e3 + 150.0 * (jobs + 2 * n_dets * (n_ood + 1))
        return png * (1 + 4 / 3) + extras * 4 / 3 + text

    def pca_solver(self, n: int, p: int, k: int) -> str:
        """The PCA path the workflow takes (``subspace.exact.choose_solver``, as the
        checkpoint pca_solver decides it from N and P)."""
        from .subspace.exact import choose_solver

        sub = self.cfg["subspace"]
        iterative = "power" if sub["solver"] == "power" else "krylov"
        return choose_solver(sub["solver"], n, p, k, float(sub["exact_max_gib"]) * GiB, iterative)

    def _source(self, ds: str) -> dict:
        idc = self.cfg["data"]["id"]
        if ds in ("id_train", "id_test", "id_val"):  # id_val: held out of ID train's source
            return idc.get("test" if ds == "id_test" else "train") or idc["source"]
        if ds in self.cfg["data"]["ood"]:
            return self.cfg["data"]["ood"][ds]
        return self.cfg["validation"]["ood"][ds]

    def _detectors(self, section) -> dict:
        from .detectors.base import get_detector

        out = {}
        from .selection import grid_candidates, split_grid

        for name, spec in (section or {}).items():
            hp, grid = split_grid(spec, name)
            method = hp.pop("method", name)
            cls = get_detector(method)
            # a grid's candidates are fitted as the instance is, each scored on validation
            out[name] = {"method": method, "hparams": hp, "needs_model": bool(cls.needs_model),
                         "fits": len(grid_candidates(hp, grid)), "grid": bool(grid)}
        return out

    def _fit_bytes(self, method: str, n: int, d: int, c: int, hp: Mapping) -> tuple[float, float]:
        from .detectors.base import get_detector

        cls = get_detector(method)
        # detectors that read the model (head weights, BN statistics, a model pass) load it:
        # its parameters and the checkpoint's state dict (rehearsal, ResNet-50: +185 MiB)
        model = 2 * 4.0 * self.f.num_params if (cls.needs_head or cls.needs_model) else 0.0
        base = self.cal["host_base_torch"] + model
        m = method.removeprefix("grad_")
        if m == "knn":
            return 4.0 * n * d, base + 8.0 * n * d
        if m in ("mahalanobis",):
            return 8.0 * (d * d + c * d), base + 8.0 * n * d
        if m == "vim":  # the D x D covariance, its eigendecomposition (LAPACK copies) and basis
            return 8.0 * d * d, base + 8.0 * n * d + 5 * 8.0 * d * d
        if m == "grood":  # class prototypes and the ID-train features
            return 4.0 * n * d + 8.0 * (c + 1) * d * 2, base + 8.0 * n * d
        return 4e3 + 8.0 * d, base + 8.0 * n * d

    def _score_host(self, method: str, n: int, n_train: int, d: int) -> float:
        """Peak host bytes of one array-detector scoring job (no torch): its import set's
        base, the scored rows in float64 and the fitted state it applies to them."""
        m = method.removeprefix("grad_")
        c = self.f.num_classes
        if m in ("knn", "grood"):  # faiss: the ID-train index and the queries
            return self.cal["host_base_search"] + 8.0 * (n + (n_train if m == "knn" else c + 1)) * d
        state = {
            "mahalanobis": d * d + c * d,  # the shared precision matrix and the class means
            "vim": d * d + c * d,  # the principal basis and the head
            "react": c * d,  # the head
        }.get(m, 0)
        return self.cal["host_base_numpy"] + 8.0 * (n * d + state)

    def _subspace(self, spaces, datasets, scored, val=(), ens_grid: bool = False) -> None:
        """The subspace stages; ``datasets`` are projected, ``scored`` (the test sets) are
        scored by every gradient detector, ``val`` by grid candidates (and, with the
        ensemble's alpha grid, by the ensemble's members)."""
        cfg, f, sz = self.cfg, self.f, self.sizes
        sub = cfg["subspace"]
        F = f.forward_flops
        P = sum(f.block_sizes.values())
        C = f.num_classes
        k = int(sub["k"])
        K = k + int(sub["oversample"])
        parts = data_parts(cfg)
        rows_train = _shard_rows(sz["id_train"], n_shards(cfg, "id_train"))
        part_rows = [sum(rows_train[s] for s in ps) for ps in parts]
        size = int(sub["chunk_size"])
        groups = f.group_sizes
        split = len(groups) > 1
        # Σg, Σg² in float64 and the float64 copy of the gradient chunk
        stats_extra = 2 * 8.0 * P + 8.0 * self._chunk(P, size) * P

        for n in part_rows:
            self.stage("gradstats_partial", gpu=True, key="persample").add_job(
                2 * 8.0 * P + 1e3,
                *self._mem(self._persample_work(P, size, stats_extra)),
                flops=n * (3 * F + 4 * P),
            )
        self.stage("gradstats_reduce").add_job(2 * 8.0 * P, self.cal["host_base_numpy"] + 8 * 8.0 * P)
        n_train = sz["id_train"]

        if "ag" in spaces:
            # one job per (class range, data part): gradients of the range's samples only,
            # a P x C' float64 accumulator, P x C' float32 written (P x C per data part)
            jobs = max(1, min(int(sub["ag"]["class_jobs"]), C))
            for j in range(jobs):
                cj = (j + 1) * C // jobs - j * C // jobs
                for n in part_rows:
                    self.stage("ag_partial", gpu=True, kept=False, key="persample").add_job(
                        4.0 * P * cj,
                        *self._mem(self._persample_work(P, size, 8.0 * P * cj + 4.0 * P * cj)),
                        flops=n * cj / C * (3 * F + 4 * P),
                    )
            self.transient["ag_partial"] = 4.0 * P * C * len(parts)
            self.stage("ag_reduce").add_job(
                4.0 * P * (2 * C - 1),
                self.cal["host_base_numpy"]
                + self.cal["reduce_copies"] * 8.0 * max(f.block_sizes.values()) * C,
                read=3 * 4.0 * P * C * len(parts),
                flops=2 * 2.0 * P * C * C,
            )

        reduced_k = {}
        if "pca" in spaces:
            solver = self.pca_solver(n_train, P, k)
            if sub["solver"] == "auto":  # the checkpoint that decides from N and P
                self.stage("pca_solver").add_job(300.0, self.cal["host_base_numpy"])
        if "pca" in spaces and solver == "exact":
            from .subspace.exact import exact_pca_bytes

            # one data pass: G (N x P float32) on the host, the Gram matrix, V = G^T U / sqrt(lambda)
            self.stage("pca_exact", gpu=True, kept=False, key="persample").add_job(
                4.0 * P * k + 8.0 * n_train * 2,
                *self._mem(self._persample_work(P, size), host_extra=float(exact_pca_bytes(n_train, P, k))),
                flops=n_train * (3 * F + 2 * P) + 2.0 * n_train * n_train * P + 2.0 * P * k * n_train,
            )
            self.stage("pca_settings").add_job(200.0, self.cal["host_base_numpy"])
            # finalize moves the exact store into place: nothing copied
            self.stage("pca_finalize").add_job(0.0, self.cal["host_base_numpy"], kept=4.0 * P * k)
            self.transient["pca"] = 4.0 * P * k
            reduced_k["pca"] = k
        elif "pca" in spaces:
            V = 4.0 * P * K
            # V-init is released by the reduce of pass 0
            Pb = max(f.block_sizes.values())  # the reduces hold one parameter block at a time
            self.stage("pca_init", kept=False).add_job(
                V,
                self.cal["host_base_numpy"] + self.cal["reduce_copies"] * 8.0 * Pb * K,
                flops=2 * 2.0 * P * K * K,
            )
            T = _pca_passes(sub)
            for t in range(T):
                for _w, n in enumerate(part_rows):
                    images = n * (8.0 * K + 8)
                    if not split:
                        self.stage("pca_pass", gpu=True, kept=False, key="persample").add_job(
                            V + images,
                            *self._mem(
                                self._persample_work(P, size, 4.0 * P * K + 8.0 * P * K),
                                host_extra=8.0 * P * K if self.dev["gpu"] else 0,
                            ),
                            flops=n * (3 * F + 4 * P * K + 2 * P),
                        )
                        continue
                    for _g, pg in groups.items():
                        self.stage("pca_gv", gpu=True, kept=False, key="persample").add_job(
                            images,
                            *self._mem(self._persample_work(pg, size, 4.0 * pg * K)),
                            flops=n * (3 * F + 2 * pg * K),
                        )
                    for _g, pg in groups.items():
                        self.stage("pca_pass_block", gpu=True, kept=False, key="persample").add_job(
                            4.0 * pg * K + images,
                            *self._mem(self._persample_work(pg, size, 8.0 * pg * K)),
                            flops=n * (3 * F + 2 * pg * K),
                        )
                krylov = n_train * (8.0 * K + 8) + 8.0 * K * K + (8.0 * n_train * k if t >= 1 else 0)
                # V_{t+1} is released by the next reduce; the basis after the last pass stays
                q = t + 1  # Krylov blocks in the Rayleigh-Ritz
                self.stage("pca_reduce").add_job(
                    V + krylov,
                    self.cal["host_base_numpy"]
                    + self.cal["reduce_copies"] * 8.0 * Pb * K
                    + 8.0 * n_train * K * (q + 1),
                    kept=krylov + (V if t == T - 1 else 0.0),
                    read=2
                    * (
                        len(parts) * (V if not split else V)
                        + n_train * 8.0 * K * (len(groups) if split else 1)
                    ),
                    flops=2 * 2.0 * P * K * K + 4.0 * n_train * (q * K) ** 2,
                )
                self.stage("pca_diagnostics").add_job(3e3, self.cal["host_base_numpy"])
            self.stage("pca_settings").add_job(200.0, self.cal["host_base_numpy"])
            lift_groups = groups if split else {"all": P}
            for _g, pg in lift_groups.items():
                for n in part_rows:
                    self.stage("pca_lift", gpu=True, kept=False, key="persample").add_job(
                        4.0 * pg * k,
                        *self._mem(self._persample_work(pg, size, 4.0 * pg * k + 8.0 * pg * k)),
                        flops=n * (3 * F + 2 * pg * k),
                    )
            self.stage("pca_finalize").add_job(
                4.0 * P * k,
                self.cal["host_base_numpy"] + 5.5 * 8.0 * Pb * k,  # no QR: the sum, its reads, the cast
                read=2 * 4.0 * P * k * len(parts),
                flops=2.0 * P * k * k,
            )
            # transient: one pass's partials, the basis it read and the one the reduce writes
            parts_bytes = len(parts) * (
                (len(groups) if split else 1) * V / max(1, len(groups) if split else 1)
                + (len(groups) if split else 1) * n_train * 8.0 * K
            )
            self.transient["pca"] = parts_bytes + 2 * V
            reduced_k["pca"] = k
        if "ag" in spaces:
            reduced_k["ag"] = C - 1

        row = lambda kk: 4.0 * kk + 24  # noqa: E731  reduced float32 + labels, index, gnorm2
        for _space, kk in reduced_k.items():
            for ds in datasets:
                for rows in _shard_rows(sz[ds], n_shards(cfg, ds)):
                    if not split:
                        self.stage("project", gpu=True, key="persample").add_job(
                            rows * row(kk),
                            *self._mem(self._persample_work(P, size, 4.0 * P * kk)),
                            flops=rows * (3 * F + 2 * P * kk),
                        )
                        continue
                    for _g, pg in groups.items():
                        self.stage("project_block", gpu=True, kept=False, key="persample").add_job(
                            rows * row(kk),
                            *self._mem(self._persample_work(pg, size, 4.0 * pg * kk)),
                            flops=rows * (3 * F + 2 * pg * kk),
                        )
                    self.stage("project_merge").add_job(
                        rows * row(kk), self.cal["host_base_numpy"] + 2 * rows * row(kk) * len(groups)
                    )
            gdets = self._detectors(sub["detectors"])
            ensembled = [n for n in sub["ensemble"]["detectors"] if n in gdets and n in self.cfg["detectors"]]
            for name, d in gdets.items():
                for _ in range(d["fits"]):
                    self.stage("fit_grad_candidate" if d["grid"] else "fit_grad_detector").add_job(
                        *self._fit_bytes(d["method"], n_train, kk, C, d["hparams"])
                    )
                if d["grid"]:
                    for _ in range(d["fits"]):
                        for ds in val:
                            self.stage("score_grad_candidate").add_job(
                                8 * sz[ds] + 128, self._score_host(d["method"], sz[ds], n_train, kk)
                            )
                    self.stage("select_grad_detector").add_job(
                        2e3 + 300.0 * d["fits"], self.cal["host_base_tables"]
                    )
                for ds in [*scored, *(val if ens_grid and name in ensembled else [])]:
                    self.stage("score_grad_detector").add_job(
                        8 * sz[ds] + 128,
                        self._score_host(d["method"], sz[ds], n_train, kk),
                    )
            for _name in ensembled:
                if ens_grid:
                    n_alpha = len(sub["ensemble"]["grid"]["alpha"])
                    self.stage("select_ensemble_alpha").add_job(
                        2e3 + 300.0 * n_alpha, self.cal["host_base_tables"]
                    )
                for ds in scored:
                    self.stage("ensemble").add_job(
                        8 * sz[ds] + 128, self.cal["host_base_bare"] + 3 * 8.0 * sz[ds]
                    )
            self.stage("subspace_diagnostics").add_job(5e4, 1e8)
        nd = int(sub["diagnostics"]["n_samples"])
        ref = min(nd, n_train) * 4.0 * P
        # per query chunk (at most a loader batch, at most WORK_BYTES of float64 rows): G on
        # the device; on the host its copy and unit rows (float32) and the float64 queries;
        # a float64 reference piece of at most 256 rows and WORK_BYTES (nearest-neighbour
        # distances); the reference rows themselves (at most subspace.diagnostics.max_gib)
        from .subspace.diagnostics import WORK_BYTES, work_rows

        q_rows = work_rows(P, WORK_BYTES, 8, int(cfg["compute"]["batch_size"]))
        r_rows = work_rows(P, WORK_BYTES, 8, min(256, nd, n_train))
        diag_device = q_rows * P * 4.0
        diag_host = (
            min(ref, float(sub["diagnostics"]["max_gib"]) * GiB)
            + 8.0 * r_rows * P
            + q_rows * P * (2 * 4.0 + 8.0)
        )
        n_ref = min(nd, n_train)
        n_query = sum(min(nd, sz[ds]) for ds in scored)  # the test sets
        piece_rows = max(1, int(float(sub["diagnostics"]["max_gib"]) * GiB // (4.0 * P)))
        pieces = -(-n_ref // piece_rows)
        self.stage("gradient_diagnostics", gpu=True, key="persample").add_job(
            1.2e3,
            # the engine differentiates at most q_rows samples at a time here
            *self._mem(self._persample_work(P, min(size, q_rows), diag_device), host_extra=diag_host),
            # the reference once; the queries once per reference piece; the distance products
            flops=(n_ref + pieces * n_query) * (3 * F + 2 * P) + 2.0 * P * n_ref * n_query,
        )

    # ---- totals
    def summary(self) -> dict:
        kinds = {"forward": "forward", "persample": "persample"}
        start = self.cal["job_start_seconds"]
        for st in self.stages.values():
            st.seconds = (
                st.jobs * start["torch" if st.torch else "numpy"] + st.io_bytes / self.cal["io_bytes_per_s"]
            )
            if st.flops and st.key in kinds:  # model-running work on the device
                st.seconds += self._seconds(st.flops, kinds[st.key])
            elif st.flops:  # host-side linear algebra of the reduces
                st.seconds += st.flops / self.cal["host_linalg_flops"]
        kept = sum(st.kept_bytes for st in self.stages.values())
        peak_disk = kept + sum(self.transient.values())
        gpu_seconds = sum(st.seconds for st in self.stages.values() if st.gpu)
        out = {
            "device": self.device,
            "device_label": self.dev["label"],
            "gpus": self.gpus,
            "precision": self.precision,
            "calibrated": self.calibrated,
            "sizes": dict(self.sizes),
            "model": {
                "num_params": self.f.num_params,
                "subspace_params": sum(self.f.block_sizes.values()),
                "block_groups": self.f.group_sizes,
                "forward_flops": self.f.forward_flops,
            },
            "pca_passes": _pca_passes(self.cfg["subspace"]) + 1
            if "pca" in self.cfg["subspace"]["types"]
            else 0,
            "stages": {
                name: {
                    "jobs": st.jobs,
                    "bytes_written": int(st.bytes_written),
                    "kept_bytes": int(st.kept_bytes),
                    "peak_job_gpu_bytes": int(st.peak_job_gpu_bytes),
                    "peak_job_host_bytes": int(st.peak_job_host_bytes),
                    "flops": float(st.flops),
                    "seconds": float(st.seconds),
                    "gpu": st.gpu,
                    "kept": st.kept,
                }
                for name, st in self.stages.items()
            },
            "bytes_written": int(sum(st.bytes_written for st in self.stages.values())),
            "peak_disk_bytes": int(peak_disk),
            "transient_bytes": {k: int(v) for k, v in self.transient.items()},
            "gpu_hours": gpu_seconds / 3600.0 if self.dev["gpu"] else 0.0,
            "seconds": sum(st.seconds for st in self.stages.values()),
            "wall_seconds": self._wall(),
        }
        return out

    def _wall(self) -> float:
        """Critical-path estimate: each stage's jobs spread over the GPUs (CPU: one at a time)."""
        lanes = self.gpus if self.dev["gpu"] else 1
        total = 0.0
        for st in self.stages.values():
            if st.jobs:
                per_job = st.seconds / st.jobs
                total += per_job * math.ceil(st.jobs / lanes)
        return total


# gpu_check.sh stages whose achieved throughput calibrates each kind of work
CALIBRATION_STAGES = {
    "forward": ("extract",),
    "persample": ("grad_scores", "gradstats_partial", "pca_gv", "pca_pass_block", "project"),
}


def efficiency_from_gpu_check(result: Mapping, device: str) -> dict:
    """Efficiency factors (achieved / peak FLOP/s) per kind of work from the JSON that
    ``benchmarks/gpu_check.sh`` writes on a device: ``stages.<stage>.fp32.tflops`` over
    the device's fp32 peak (its GPU "fp32" convolutions run as TF32 by PyTorch's default,
    which the measured figure includes). The median over the kind's stages."""
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; known: {', '.join(DEVICES)}")
    peak = DEVICES[device]["peak"]["fp32"]
    out = {}
    for kind, stages in CALIBRATION_STAGES.items():
        vals = sorted(
            float(result["stages"][s]["fp32"]["tflops"]) * 1e12 / peak
            for s in stages
            if "tflops" in (result.get("stages", {}).get(s, {}).get("fp32") or {})
        )
        if vals:
            out[kind] = vals[len(vals) // 2]
    if not out:
        raise ConfigError(
            "the calibration JSON has no fp32 throughput of extract / grad_scores / PCA "
            "stages (run benchmarks/gpu_check.sh to the end)"
        )
    return out


def make_plan(
    cfg: dict,
    device: str = "cpu",
    gpus: int = 1,
    sizes: Mapping | None = None,
    calibration: Mapping | None = None,
    results: Path | None = None,
) -> dict:
    results = results if results is not None else Path("results") / cfg["experiment"]
    sz = dataset_sizes(cfg, results, sizes)
    facts = model_facts(cfg)
    return Planner(cfg, sz, facts, device, gpus, calibration).build()


def check_budget(plan: dict, max_disk: float | None = None, max_gpu_mem: float | None = None) -> None:
    """ConfigError naming the stage and the key to change when the plan exceeds a budget."""
    if max_disk is not None and plan["peak_disk_bytes"] > max_disk:
        worst = max(plan["stages"].items(), key=lambda kv: kv[1]["bytes_written"])[0]
        trans = max(plan["transient_bytes"].items(), key=lambda kv: kv[1], default=(None, 0))
        stage = trans[0] if trans[1] > plan["stages"][worst]["bytes_written"] else worst
        key = DISK_KEYS.get(
            "pca" if str(stage).startswith("pca") else "ag" if str(stage).startswith("ag") else "extract", ""
        )
        raise ConfigError(
            f"plan exceeds --max-disk: peak disk in use {fmt_bytes(plan['peak_disk_bytes'])} > "
            f"{fmt_bytes(max_disk)}; largest contributor: stage {stage}; change {key}"
        )
    if max_gpu_mem is not None:
        for name, st in plan["stages"].items():
            mem = st["peak_job_gpu_bytes"] if plan["stages"][name]["gpu"] else 0
            if mem > max_gpu_mem:
                key = GPU_KEYS[
                    "persample"
                    if name not in ("extract", "score_model_detector", "train", "load_model")
                    else "forward"
                ]
                raise ConfigError(
                    f"plan exceeds --max-gpu-mem: stage {name} needs {fmt_bytes(mem)} per job "
                    f"> {fmt_bytes(max_gpu_mem)}; change {key}"
                )


def fmt_bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> float:
    """'500G', '2T', '80GB', '1.5e12' -> bytes (decimal units)."""
    s = str(text).strip().upper().removesuffix("B")
    mult = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
    try:
        if s and s[-1] in mult:
            return float(s[:-1]) * mult[s[-1]]
        return float(s)
    except ValueError as exc:
        raise ConfigError(f"cannot read {text!r} as a size (e.g. 500G, 2T)") from exc


def fmt_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def render(plan: dict) -> str:
    lines = [
        f"gradspace plan on {plan['device_label']} x {plan['gpus']} ({plan['precision']})"
        + (
            "" if plan["calibrated"] else "  [efficiency: CPU-measured stand-in; run benchmarks/gpu_check.sh]"
        ),
        "samples: " + ", ".join(f"{k}={v}" for k, v in plan["sizes"].items()),
        f"model: {plan['model']['num_params']:,} parameters ({plan['model']['subspace_params']:,} in the "
        f"subspace), {plan['model']['forward_flops'] / 1e9:.2f} GFLOP per forward; PCA data passes "
        f"(incl. lift, worst case): {plan['pca_passes']}",
        "",
    ]
    hdr = (
        f"{'stage':24s} {'jobs':>6s} {'written':>10s} {'GPU mem/job':>12s} {'host mem/job':>13s} "
        f"{'PFLOP':>9s} {'time':>10s}"
    )
    lines += [hdr, "-" * len(hdr)]
    for name, st in plan["stages"].items():
        lines.append(
            f"{name:24s} {st['jobs']:6d} {fmt_bytes(st['bytes_written']):>10s} "
            f"{fmt_bytes(st['peak_job_gpu_bytes']) if st['gpu'] else '-':>12s} "
            f"{fmt_bytes(st['peak_job_host_bytes']):>13s} {st['flops'] / 1e15:9.3g} "
            f"{fmt_seconds(st['seconds']):>10s}"
        )
    lines += [
        "",
        f"bytes written in all: {fmt_bytes(plan['bytes_written'])}",
        f"peak disk in use: {fmt_bytes(plan['peak_disk_bytes'])} (transient: "
        + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in plan["transient_bytes"].items())
        + ")",
        f"GPU-hours: {plan['gpu_hours']:.2f}; wall time with {plan['gpus']} device(s): "
        f"{fmt_seconds(plan['wall_seconds'])}",
    ]
    return "\n".join(lines)


def cmd_plan(a) -> int:
    cfg = load_config(a.configfile, parse_overrides(a.set))
    sizes = {}
    for item in (a.sizes or "").split(","):
        if item.strip():
            k, _, v = item.partition("=")
            sizes[k.strip()] = int(v)
    calib = None
    if a.calibration:
        with open(a.calibration) as fh:
            calib = json.load(fh)
    if a.host_gflops or a.io_mbps or a.probe_host:
        calib = dict(calib or {})
        calib["host"] = dict(calib.get("host") or {})
        if a.probe_host:
            calib["host"].update(probe_host())
        calib["host"] |= {
            k: v
            for k, v in (
                ("host_linalg_flops", a.host_gflops and a.host_gflops * 1e9),
                ("io_bytes_per_s", a.io_mbps and a.io_mbps * 1e6),
            )
            if v
        }
    plan = make_plan(cfg, a.device, a.gpus, sizes, calib, Path(a.results) if a.results else None)
    if a.json:
        print(json.dumps(plan, indent=1, sort_keys=True))
    else:
        print(render(plan))
    check_budget(
        plan,
        parse_bytes(a.max_disk) if a.max_disk else None,
        parse_bytes(a.max_gpu_mem) if a.max_gpu_mem else None,
    )
    return 0

__all__ = [
    "CALIBRATION",
    "DEVICES",
    "Planner",
    "check_budget",
    "dataset_sizes",
    "load_config",
    "make_plan",
    "model_facts",
    "probe_host",
    "render",
]


# ---------------------------------------------------------------------------------------
# what a finished run measured, for the plan's checks (tests, benchmarks/rehearsal.py)


def _path_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def parse_snakemake_log(text: str) -> list[dict]:
    """The jobs a Snakemake log announces: [{rule, output: [...], benchmark}] (one per
    ``rule X:`` / ``checkpoint X:`` block; ``localrule`` targets without work are skipped)."""
    jobs, cur = [], None
    for line in text.splitlines():
        s = line.strip()
        head = s.split()
        if (
            len(head) == 2
            and head[0] in ("rule", "checkpoint", "localrule", "localcheckpoint")
            and s.endswith(":")
        ):
            cur = {"rule": head[1].rstrip(":"), "output": [], "benchmark": None, "log": []}
            jobs.append(cur)
        elif cur is not None and s.startswith("output:"):
            cur["output"] = [p.strip() for p in s[len("output:") :].split(",") if p.strip()]
        elif cur is not None and s.startswith("benchmark:"):
            cur["benchmark"] = s[len("benchmark:") :].strip()
        elif cur is not None and s.startswith("log:"):
            cur["log"] = [p.strip() for p in s[len("log:") :].split(",") if p.strip()]
        elif not s:
            cur = None
    return [j for j in jobs if j["output"]]


def measure_run(workdir: str | os.PathLike, log_text: str) -> dict:
    """Per rule of a finished run: jobs, bytes of its outputs (run it with --notemp and
    GRADSPACE_KEEP_CONSUMED=1 to keep temporary ones), peak RSS and seconds of its jobs
    (the rules' ``benchmark:`` files)."""
    from .files import read_benchmark
    from .runtime import read_peak_memory

    workdir = Path(workdir)
    out: dict[str, dict] = {}
    seen = set()
    for job in parse_snakemake_log(log_text):
        key = tuple(job["output"])
        if key in seen:
            continue
        seen.add(key)
        st = out.setdefault(
            job["rule"], {"jobs": 0, "bytes_written": 0, "max_rss_bytes": 0.0, "seconds": 0.0,
                          "peak_hwm_bytes": 0.0}
        )
        for lp in job.get("log") or []:  # the job's own peak (gradspace.runtime.PEAK_MEMORY_LINE)
            st["peak_hwm_bytes"] = max(st["peak_hwm_bytes"], float(read_peak_memory(workdir / lp) or 0))
        st["jobs"] += 1
        st["bytes_written"] += sum(_path_bytes(workdir / p) for p in job["output"])
        bench = workdir / job["benchmark"] if job["benchmark"] else None
        if bench is not None and bench.is_file():
            for r in read_benchmark(bench):
                if math.isfinite(r.get("max_rss", math.nan)):
                    st["max_rss_bytes"] = max(st["max_rss_bytes"], r["max_rss"] * (1 << 20))
                if math.isfinite(r["s"]):
                    st["seconds"] += r["s"]
    return out
