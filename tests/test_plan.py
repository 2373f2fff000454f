"""`gradspace plan`: its jobs are the workflow's jobs, its budgets fail with the key to
change, the ImageNet preset's subspace disk stays within a small constant of |V| + |AG|,
and its bytes and memory agree with what a real run measured."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import BIN, REPO, TINY, run_snakemake
from gradspace.errors import ConfigError
from gradspace.plan import (
    check_budget,
    load_config,
    make_plan,
    measure_run,
    parse_snakemake_log,
    probe_host,
)

PRESET = REPO / "config" / "presets" / "imagenet-resnet50.yaml"


def gradspace(*args, cwd=None):
    return subprocess.run([str(BIN / "gradspace"), *args], capture_output=True, text=True, cwd=cwd)


def _write(path, cfg):
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _dry_run_counts(workdir) -> dict:
    """Jobs per rule of a dry run of everything (Snakemake's "Job stats" table)."""
    out = run_snakemake(workdir, "--configfile", "config.yaml", "-n").stdout
    counts, table = {}, False
    for line in out.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            table = True
        elif table and len(parts) == 2 and parts[1].isdigit():
            if parts[0] == "total":
                break
            if parts[0] != "all":
                counts[parts[0]] = int(parts[1])
    assert counts, out[-3000:]
    return counts


VARIANTS = {
    "tiny": {},
    # block groups, data parts and more ID-train shards than parts
    "split": {"data": {"id": {"shards": 4}},
              "subspace": {"block_jobs": 2, "data_parts": 2, "iterations": 1, "ag": {"class_jobs": 3}}},
    # the in-memory exact PCA (one job) instead of the passes
    "exact": {"subspace": {"solver": "exact"}},
    # hyperparameter selection: validation sets, feature / model-pass / gradient grids
    # (dims included) and the ensemble's alpha grid
    "selection": {
        "validation": {"id_holdout": 100, "ood": {"photos_val": {"kind": "skimage_photos", "n": 60}}},
        "detectors": {"react": {"grid": {"percentile": [80, 90]}},
                      "odin": {"grid": {"temperature": [1.0, 1000.0]}}},
        "subspace": {"detectors": {"knn": {"method": "grad_knn", "k": 5,
                                           "grid": {"k": [3, 5], "dims": [4, 8]}}},
                     "ensemble": {"grid": {"alpha": [0.5, 1.0]}}},
    },
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_plan_jobs_are_the_dry_run_jobs(tmp_path, variant):
    cfg = yaml.safe_load(TINY.read_text())
    for section, values in VARIANTS[variant].items():
        for k, v in values.items():
            cfg.setdefault(section, {})
            cfg[section][k] = {**cfg[section].get(k, {}), **v} if isinstance(v, dict) else v
    _write(tmp_path / "config.yaml", cfg)
    dry = _dry_run_counts(tmp_path)
    plan = make_plan(load_config([tmp_path / "config.yaml"]), results=tmp_path / "results" / "tiny")
    planned = {name: st["jobs"] for name, st in plan["stages"].items()}
    assert planned == dict(dry)


def test_every_preset_plans_and_the_nearood_sizes(tmp_path):
    presets = sorted((REPO / "config" / "presets").glob("*.yaml"))
    assert len(presets) >= 4
    for path in [REPO / "config" / "config.yaml", *presets]:
        # places365 is an ImageFolder tree that is not on this machine: its size is given
        sizes = {"places365": 10_000} if "cifar10" in path.name else None
        plan = make_plan(load_config([path]), sizes=sizes, results=tmp_path / "none")
        assert plan["stages"]["report"]["jobs"] == 1, path
    # validation: id_val is held out of the ID-train pool before train_subsample, the
    # validation OOD set keeps its n, a class subset of Fashion-MNIST its share of a split
    from gradspace.plan import dataset_sizes

    sz = dataset_sizes(load_config([REPO / "config" / "presets" / "fashion-mnist-nearood.yaml"]),
                       tmp_path / "none")
    assert sz == {"id_train": 6000, "id_test": 6000, "fmnist_heldout": 2000, "mnist": 2000,
                  "digits8x8": 1797, "textures": 1000, "photos": 1000, "id_val": 1000,
                  "fmnist_heldout_train": 1000}


def test_plan_json_and_budgets(tmp_path):
    shutil.copy(TINY, tmp_path / "config.yaml")
    proc = gradspace("plan", "--configfile", "config.yaml", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert {"stages", "peak_disk_bytes", "gpu_hours"} <= set(plan)
    for st in plan["stages"].values():
        assert {"jobs", "bytes_written", "peak_job_gpu_bytes", "peak_job_host_bytes", "seconds"} <= set(st)
        assert st["jobs"] >= 1 and st["bytes_written"] > 0 and st["peak_job_host_bytes"] > 0
    assert plan["peak_disk_bytes"] > 0
    # a disk budget below the plan fails, naming a stage and the key to change
    proc = gradspace("plan", "--configfile", "config.yaml", "--max-disk", "1M", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--max-disk" in proc.stderr and "stage " in proc.stderr and "change " in proc.stderr
    # GPU memory: the tiny jobs fit an H100; a 100 MB budget does not
    assert (
        gradspace(
            "plan", "--configfile", "config.yaml", "--device", "h100", "--max-gpu-mem", "80G", cwd=tmp_path
        ).returncode
        == 0
    )
    proc = gradspace(
        "plan", "--configfile", "config.yaml", "--device", "h100", "--max-gpu-mem", "100M", cwd=tmp_path
    )
    assert proc.returncode == 2 and "stage " in proc.stderr and "chunk_size" in proc.stderr


def test_imagenet_preset_subspace_disk_within_a_constant_of_its_results(tmp_path):
    cfg = load_config([PRESET])
    plan = make_plan(cfg, device="h100", results=tmp_path)
    assert plan["sizes"]["id_train"] == 50_000 and plan["sizes"]["id_test"] == 50_000
    P = plan["model"]["subspace_params"]
    assert P == 25_557_032
    K = cfg["subspace"]["k"] + cfg["subspace"]["oversample"]
    V = 4.0 * P * K
    AG = 4.0 * P * (1000 + 999)  # class means and the C - 1 basis, float32
    sub = ("gradstats", "ag_", "pca_")
    kept = sum(st["kept_bytes"] for n, st in plan["stages"].items() if n.startswith(sub))
    transient = sum(plan["transient_bytes"].values())
    # peak disk of the subspace stages: what they keep + the largest transient set
    ratio = (kept + transient) / (V + AG)
    assert ratio < 2.0, ratio
    # budgets name the stage and the key
    with pytest.raises(ConfigError, match="subspace"):
        check_budget(plan, max_disk=1e11)
    with pytest.raises(ConfigError, match="stage "):
        check_budget(plan, max_gpu_mem=4e9)


def test_log_parser():
    log = (
        "rule extract:\n    input: a\n    output: results/x/e/shard-0.zarr\n    jobid: 3\n"
        "    benchmark: results/x/benchmarks/extract/shard-0.tsv\n\n"
        "checkpoint pca_diagnostics:\n    output: d/pass-000.json\n\nlocalrule all:\n    input: q\n"
    )
    jobs = parse_snakemake_log(log)
    assert [j["rule"] for j in jobs] == ["extract", "pca_diagnostics"]
    assert jobs[0]["benchmark"].endswith("shard-0.tsv") and jobs[1]["output"] == ["d/pass-000.json"]


def test_host_probe_measures_the_child_alone():
    """The probe's figure is the fresh process's own peak: this test process holds torch
    (~0.6 GB and more), a bare numpy/zarr interpreter takes a small fraction of it."""
    import torch  # noqa: F401  (the parent's memory must not leak into the child's figure)

    from gradspace.plan import HOST_PROBES, _probe_rss

    small = _probe_rss(HOST_PROBES["numpy"], sys.executable)
    assert 5e6 < small < 0.3e9
    touch = "b = bytearray(400 * 2**20)\nb[::4096] = b'x' * len(b[::4096])\n"
    big = _probe_rss(HOST_PROBES["numpy"] + touch, sys.executable)
    assert 0.35e9 < big - small < 0.5e9


@pytest.mark.slow
def test_plan_agrees_with_a_measured_run(tiny_workdir):
    """Bytes of every stage that keeps >= 1 MiB, and the peak memory of every stage (its
    jobs' VmHWM), within +-20% of the tiny run's stores and job logs."""
    logs = sorted((tiny_workdir / ".snakemake" / "log").glob("*.snakemake.log"))
    measured = {}
    for log in logs:
        for rule, st in measure_run(tiny_workdir, log.read_text()).items():
            measured.setdefault(rule, st)
    # the bases of job memory measured on this machine (the processes' code and library
    # pages are mapped differently from one machine to the next)
    host = probe_host()
    plan = make_plan(
        load_config([tiny_workdir / "config.yaml"]),
        calibration={"host": host},
        results=tiny_workdir / "results" / "tiny",
    )
    bad, table = [], []
    for name, st in plan["stages"].items():
        m = measured.get(name)
        if not m:
            continue
        table.append(
            f"{name}: kept {st['kept_bytes']:.3g}/{m['bytes_written']:.3g} B, "
            f"RSS {st['peak_job_host_bytes']:.3g}/{m['max_rss_bytes']:.3g} B "
            f"(VmHWM {m.get('peak_hwm_bytes', 0):.3g}), "
            f"{m['seconds'] / m['jobs']:.1f} s/job"
        )
        # a finished run holds what each stage keeps (temporary and released outputs are gone)
        if m["bytes_written"] >= 1 << 20:
            r = st["kept_bytes"] / m["bytes_written"]
            if abs(r - 1) > 0.2:
                bad.append(f"{name}: bytes kept planned/measured {r:.2f}")
        # each job's own peak (VmHWM, the last line of its log): Snakemake's max_rss samples
        # a job's RSS every 0.5 s for its first 15 s, then every 30 s, and misses short
        # peaks, late ones and whole sub-second jobs
        peak = m.get("peak_hwm_bytes") or 0
        assert peak > 0, f"{name}: no job logged its peak resident memory"
        r = st["peak_job_host_bytes"] / peak
        if abs(r - 1) > 0.2:
            bad.append(f"{name}: peak memory planned/measured (VmHWM) {r:.2f}")
    probes = ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in host["probe_rss"].items())
    print("planned/measured per stage\n" + "\n".join(table) + f"\nprobe RSS: {probes}")
    assert not bad, "\n".join(bad) + f"\n(probe RSS on this machine: {probes})"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))


def test_gpu_check_json_calibrates_the_plan(tmp_path):
    """The JSON of benchmarks/gpu_check.sh sets the efficiency of each kind of work."""
    from gradspace.plan import DEVICES, efficiency_from_gpu_check

    peak = DEVICES["h100"]["peak"]["fp32"]
    result = {"stages": {"extract": {"fp32": {"tflops": 0.5 * peak / 1e12}},
                         "pca_gv": {"fp32": {"tflops": 0.2 * peak / 1e12}},
                         "project": {"fp32": {"tflops": 0.3 * peak / 1e12}},
                         "grad_scores": {"fp32": {"tflops": 0.1 * peak / 1e12}}}}
    eff = efficiency_from_gpu_check(result, "h100")
    assert eff == pytest.approx({"forward": 0.5, "persample": 0.2})
    cfg = load_config([TINY])
    slow = make_plan(cfg, device="h100", results=tmp_path)
    (tmp_path / "gpu.json").write_text(json.dumps(result))
    fast = make_plan(cfg, device="h100", results=tmp_path, calibration=result)
    assert fast["calibrated"] and not slow["calibrated"]
    assert fast["stages"]["extract"]["seconds"] != slow["stages"]["extract"]["seconds"]
    with pytest.raises(ConfigError, match="no fp32 throughput"):
        efficiency_from_gpu_check({"stages": {}}, "h100")
