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


@pytest.fixture(autouse=True)
def _one_thread():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    yield
