"""benchmarks/gpu_check.sh on the CPU (``--device cpu --quick``): it exits 0 and its JSON
holds, for every model-running stage, a positive fp32 (and, where bf16 autocast works,
bf16) throughput, FLOPs per sample and finite bf16-vs-fp32 accuracy figures; the FAISS
section times the CPU index and says why there is no GPU one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

# outputs not in the whitened gradient space: bf16 stays within a few percent of fp32
# (the whitened-gradient stages amplify bf16's elementwise gradient noise, see
# benchmarks/README.md "GPU check", so they get a looser sanity bound)
PLAIN = ("extract", "grad_scores", "score_model_detector")


def test_gpu_check_cpu_quick(tmp_path):
    from gpu_check import STAGES

    out = tmp_path / "x.json"
    env = dict(os.environ, GRADSPACE_THREADS="2")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=420,
                          env=env)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "samples/s" in proc.stderr or "smp/s" in proc.stdout
    res = json.loads(out.read_text())
    meta = res["meta"]
    assert meta["device"] == "cpu" and meta["num_params"] > 0 and len(meta["block_groups"]) == 4
    assert res["errors"] == []
    bf16 = meta["bf16"]["supported"]
    for stage in STAGES:
        rec = res["stages"][stage]
        assert rec["flops_per_sample"] > 0, stage
        assert rec["fp32"]["samples_per_s"] > 0 and rec["fp32"]["tflops"] > 0, stage
        if not bf16:
            assert rec["bf16"]["skipped"], stage
            continue
        assert rec["bf16"]["samples_per_s"] > 0, stage
        acc = rec["accuracy_bf16_vs_fp32"]
        figures = [v for arr in acc.values() if isinstance(arr, dict) for v in arr.values()
                   if isinstance(v, float)]
        assert figures and all(math.isfinite(v) for v in figures), (stage, acc)
        assert math.isfinite(acc["summary_rel"]), stage
        assert acc["summary_rel"] < (0.1 if stage in PLAIN else 2.0), (stage, acc)
        if stage in ("pca_pass_block", "pca_lift"):
            sub = next(v for v in acc.values() if isinstance(v, dict) and "sin_max" in v)
            assert 0.0 <= sub["sin_max"] <= 1.0
    fz = res["faiss"]
    try:
        import faiss  # noqa: F401
    except ImportError:
        assert fz["available"] is False
    else:
        assert fz["cpu"]["queries_per_s"] > 0
        if fz["gpu"] is None:
            assert fz["note"]
