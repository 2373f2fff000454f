"""Checks profiles/slurm and its test overlay without a cluster (Snakemake dry runs).

A dry run prints each job's evaluated resources, which is exactly what the SLURM
plugin turns into sbatch options (slurm_partition -> -p, slurm_account -> -A,
gpu -> --gpus, mem_mb -> --mem, runtime -> -t).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yte

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
OVERLAY = REPO / "tests" / "slurm" / "profile"
DEFAULT_PROFILE = REPO / "profiles" / "default"

SNAKEFILE = """\
rule all:
    input: "report.txt"

rule train:
    output: "model.txt"
    shell: "touch {output}"

rule extract:
    input: "model.txt"
    output: "shard-{k}.txt"
    resources: gpu=1
    shell: "touch {output}"

rule report:
    input: expand("shard-{k}.txt", k=[0, 1])
    output: "report.txt"
    shell: "touch {output}"
"""

ENV_KEYS = ("GRADSPACE_SLURM_ACCOUNT", "GRADSPACE_SLURM_PARTITION", "GRADSPACE_SLURM_GPU_PARTITION")


def _dry_run_resources(workdir: Path, *args: str, **env_vars: str) -> dict[str, dict[str, str]]:
    """Dry-run the test Snakefile; return {rule: {resource: value}} as Snakemake printed it."""
    (workdir / "Snakefile").write_text(SNAKEFILE)
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(env_vars)
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--dry-run", "--profile", str(PROFILE), *args],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    jobs: dict[str, dict[str, str]] = {}
    rule = None
    for line in out.splitlines():
        stripped = line.strip()
        if stripped.startswith(("rule ", "localrule ")) and stripped.endswith(":"):
            rule = stripped.split()[1].rstrip(":")
        elif stripped.startswith("resources:") and rule is not None:
            items = stripped[len("resources:") :].split(", ")
            jobs[rule] = dict(item.strip().split("=", 1) for item in items)
            rule = None
    assert {"train", "extract", "report"} <= set(jobs), out[-4000:]
    return jobs


def test_slurm_profile_reads_environment_and_requests_gpus(tmp_path: Path) -> None:
    jobs = _dry_run_resources(
        tmp_path, "--workflow-profile", "none",
        GRADSPACE_SLURM_ACCOUNT="proj42", GRADSPACE_SLURM_PARTITION="cpuq",
        GRADSPACE_SLURM_GPU_PARTITION="gpuq",
    )  # fmt: skip
    for rule in ("train", "extract"):
        assert jobs[rule]["gpu"] == "1"
        assert jobs[rule]["slurm_partition"] == "gpuq"
    assert "gpu" not in jobs["report"]
    assert jobs["report"]["slurm_partition"] == "cpuq"
    assert all(r["slurm_account"] == "proj42" for r in jobs.values())
    assert jobs["train"]["runtime"] == "720" and jobs["train"]["mem_mb"] == "32000"
    assert jobs["report"]["runtime"] == "30" and jobs["report"]["mem_mb"] == "4000"


def test_slurm_profile_scales_resources_with_attempt_and_falls_back(tmp_path: Path) -> None:
    # Third attempt (after two retries): memory and time triple.  Without a GPU
    # partition the GPU rules use the general one; unset variables give empty values,
    # which the plugin treats as absent (cluster default partition, guessed account).
    jobs = _dry_run_resources(
        tmp_path, "--workflow-profile", "none", "--attempt", "3", GRADSPACE_SLURM_PARTITION="cpuq"
    )
    assert jobs["train"]["mem_mb"] == str(3 * 32000) and jobs["train"]["runtime"] == str(3 * 720)
    assert jobs["report"]["mem_mb"] == str(3 * 4000)
    assert jobs["train"]["slurm_partition"] == "cpuq"
    assert jobs["report"]["slurm_account"] == ""


def test_overlay_overrides_partition_gpus_and_sizes(tmp_path: Path) -> None:
    jobs = _dry_run_resources(
        tmp_path, "--workflow-profile", str(OVERLAY), GRADSPACE_SLURM_PARTITION="cpuq",
        GRADSPACE_SLURM_GPU_PARTITION="gpuq",
    )  # fmt: skip
    for rule in ("train", "extract", "report"):
        assert jobs[rule]["slurm_partition"] == "debug"
        assert jobs[rule]["mem_mb"] == "500" and jobs[rule]["runtime"] == "10"
        assert jobs[rule].get("gpu", "0") == "0", f"{rule} still requests a GPU"
        assert "slurm_account" not in jobs[rule]


def _load_profile(path: Path) -> dict:
    with open(path / "config.yaml") as fh:
        return yte.process_yaml(fh, require_use_yte=True)


def test_overlay_clears_every_gpu_request_of_the_profile() -> None:
    profile = _load_profile(PROFILE)
    overlay = _load_profile(OVERLAY)
    gpu_rules = {rule for rule, res in profile["set-resources"].items() if res.get("gpu")}
    assert gpu_rules, "profiles/slurm should request GPUs for the model rules"
    assert gpu_rules <= set(overlay["set-resources"]), gpu_rules - set(overlay["set-resources"])
    assert all(overlay["set-resources"][rule]["gpu"] == 0 for rule in gpu_rules)
    array_rules = {r.strip() for r in profile["slurm-array-jobs"].split(",")}
    assert array_rules <= set(profile["set-resources"]), array_rules - set(profile["set-resources"])
    # The overlay must query squeue: the test cluster has no accounting for sacct.
    assert overlay["slurm-status-command"] == "squeue"
    assert profile["executor"] == "slurm" and profile["rerun-incomplete"] is True


def test_default_profile_is_minimal_and_executor_neutral() -> None:
    with open(DEFAULT_PROFILE / "config.yaml") as fh:
        default = yte.process_yaml(fh)
    assert default == {
        "cores": "all", "printshellcmds": True, "rerun-incomplete": True, "keep-incomplete": False,
    }  # fmt: skip


def _workflow_rules() -> dict[str, str]:
    """{rule name: its text} for every rule in workflow/rules/*.smk (also conditional ones)."""
    import re

    rules, derived = {}, {}
    pattern = r"^\s*(?:(?:rule|checkpoint) (\w+)|use rule (\w+) as (\w+) with):"
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        starts = [(m.start(), m.groups()) for m in re.finditer(pattern, text, re.M)]
        ends = [s for s, _ in starts[1:]] + [len(text)] * bool(starts)
        for (start, (name, base, alias)), end in zip(starts, ends, strict=True):
            if name:
                rules[name] = text[start:end]
            else:  # `use rule base as alias with:` keeps the base rule's shell unless it overrides it
                derived[alias] = (base, text[start:end])
    while derived:
        ready = {a: (b, t) for a, (b, t) in derived.items() if b in rules}
        assert ready, f"use rule of an unknown rule: {derived}"
        for alias, (base, text) in ready.items():
            rules[alias] = rules[base] + "\n" + text
            del derived[alias]
    return rules


def test_set_resources_name_real_rules_and_gpus_go_to_model_rules() -> None:
    rules = _workflow_rules()
    assert {"prepare", "extract", "ag_partial", "ag_reduce", "report"} <= set(rules)
    for path in (PROFILE, OVERLAY):
        unknown = set(_load_profile(path)["set-resources"]) - set(rules)
        assert not unknown, f"{path}/config.yaml set-resources names no rule: {sorted(unknown)}"
    profile = _load_profile(PROFILE)
    res = profile["set-resources"]
    # the rules that run the model (their shell sets GRADSPACE_THREADS) ask for a GPU, no other does
    model_rules = {n for n, text in rules.items() if "GRADSPACE_THREADS=" in text}
    gpu_rules = {n for n, r in res.items() if r.get("gpu")}
    assert gpu_rules == model_rules, (sorted(model_rules - gpu_rules), sorted(gpu_rules - model_rules))
    # every rule has memory and time that grow with the attempt
    for name in set(rules) - {"all"}:
        assert name in res, f"profiles/slurm sets no resources for rule {name}"
        for key in ("mem_mb", "runtime"):
            assert "attempt" in str(res[name][key]), (name, key)
    arrays = {r.strip() for r in profile["slurm-array-jobs"].split(",")}
    assert arrays <= set(rules), arrays - set(rules)
