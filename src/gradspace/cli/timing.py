"""``gradspace`` commands of ``gradspace.timing``: argument parsing only; each command
calls the library function it names."""

from __future__ import annotations

from ..timing import (
    cmd_timing_tables,
)
from . import json_arg


def register(subparsers) -> None:
    p = subparsers.add_parser("timing-tables", help="the paper's Tables 11 and 12 from this run")
    p.add_argument("--bench-dir", required=True, help="the run's Snakemake benchmark directory")
    p.add_argument("--card", default=None, help="model card JSON")
    p.add_argument("--subspace", action="append", default=[], metavar="SPACE=STORE")
    p.add_argument("--reduced", action="append", default=[], metavar="SPACE:DATASET=STORE[,STORE]")
    p.add_argument("--fitted", nargs="*", default=[], help="fitted gradient-space detectors "
                   "(detectors/<space>/<name>.npz)")
    p.add_argument("--stage-rules", type=json_arg, required=True,
                   help='JSON {"stats"|"pca"|"ag": {"rules": [...], "parallel": [...]}}: the rules of '
                        "each subspace stage (the workflow passes them)")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_timing_tables)
