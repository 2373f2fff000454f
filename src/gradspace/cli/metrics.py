"""``gradspace`` commands of ``gradspace.metrics``: argument parsing only; each command
calls the library function it names."""

from __future__ import annotations

from ..metrics import (
    CONVENTIONS,
    DEFAULT_EXCLUDE,
    cmd_evaluate,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="FPR95 / AUROC / AUPR metrics from score files",
        description="Compute FPR@95%TPR, AUROC, AUPR-In and AUPR-Out for every detector and "
                    "OOD set from score files .../scores/<space>/<detector>/<dataset>.npy.")
    p.add_argument("--scores", nargs="+", required=True, metavar="NPY",
                   help="score files .../scores/<space>/<detector>/<dataset>.npy")
    p.add_argument("--id-dataset", default="id_test", help="dataset holding ID scores (default id_test)")
    p.add_argument("--ood-datasets", nargs="*", default=None, metavar="NAME",
                   help="OOD sets in table order (default: every other dataset in --scores, "
                        "in order of appearance)")
    p.add_argument("--exclude", nargs="*", default=list(DEFAULT_EXCLUDE), metavar="NAME",
                   help="datasets never treated as OOD (default: id_train)")
    p.add_argument("--detectors", default=None,
                   help='JSON object (inline or a file path): {"<name>" or "<space>/<name>": '
                        '{"method": ..., "embedding": ...}}')
    p.add_argument("--card", default=None, help="model card JSON (ID accuracy for the Markdown)")
    p.add_argument("--groups", default=None,
                   help='JSON object (inline or a file path): {"<group>": ["<OOD set>", ...]}, '
                        'e.g. {"near": [...], "far": [...]}: one "average:<group>" row each')
    p.add_argument("--positive", choices=CONVENTIONS, default="id",
                   help="id: ID positive (papers, default); ood: OOD positive (OpenOOD)")
    p.add_argument("--title", default="OOD detection metrics", help="Markdown title")
    p.add_argument("--out-csv", required=True, help="metrics.csv (fractions in [0, 1])")
    p.add_argument("--out-md", default=None, help="metrics.md (paper-style tables, percent)")
    p.set_defaults(func=cmd_evaluate)
