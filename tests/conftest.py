import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snakemake_cmd(*args):
    exe = shutil.which("snakemake", path=str(BIN)) or shutil.which("snakemake")
    return [exe, "-s", str(REPO / "Snakefile"), *args]


def run_snakemake(workdir, *args, check=True, timeout=900, env=None):
    """Run the real workflow in ``workdir`` (a tmp dir) and return the CompletedProcess."""
    full_env = dict(os.environ)
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env.get('PATH', '')}"
    full_env.setdefault("GRADSPACE_THREADS", "1")
    if env:
        full_env.update(env)
    proc = subprocess.run(snakemake_cmd("--directory", str(workdir), *args), cwd=workdir,
                          capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


TINY = REPO / "tests" / "tiny_config.yaml"


def planned_jobs(workdir, configfile="config.yaml", env=None):
    """The jobs a dry run plans: a list of (rule, {wildcard: value})."""
    proc = run_snakemake(workdir, "--configfile", configfile, "-n", env=env)
    jobs, rule = [], None
    for line in proc.stdout.splitlines():
        stripped = line.strip()
        if line.startswith(("rule ", "localrule ")) and stripped.endswith(":"):
            rule = stripped.split()[1].rstrip(":")
            jobs.append((rule, {}))
        elif rule and stripped.startswith("wildcards:"):
            for item in stripped[len("wildcards:"):].split(","):
                k, _, v = item.strip().partition("=")
                jobs[-1][1][k] = v
        elif not stripped:
            rule = None
    return jobs


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
    """A finished run of the whole workflow on the tiny config, shared by the tests that
    only read its outputs or plan dry runs on top of it."""
    work = tmp_path_factory.mktemp("tiny")
    shutil.copy(TINY, work / "config.yaml")
    run_snakemake(work, "--configfile", "config.yaml", "--cores", "2")
    return work


@pytest.fixture(autouse=True)
def _one_thread():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    yield


def incomplete_outputs(workdir, prefix: str) -> set[str]:
    """Outputs (relative to ``prefix``, e.g. "results/tiny/") that Snakemake's metadata
    marks incomplete: jobs that were running when Snakemake died, redone on the next run
    even when they had renamed a complete store into place just before the kill."""
    import base64

    out = set()
    for f in (Path(workdir) / ".snakemake" / "incomplete").glob("*"):
        try:
            path = base64.urlsafe_b64decode(f.name.encode()).decode()
        except ValueError:
            continue
        if path:
            out.add(path.removeprefix(prefix))
    return out
