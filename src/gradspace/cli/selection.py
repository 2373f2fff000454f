"""``gradspace`` commands of ``gradspace.selection`` (hyperparameter selection on validation
data): argument parsing only; each command calls the library function it names."""

from __future__ import annotations

import json

from ..selection import (
    CRITERIA,
    cmd_check_validation,
    cmd_select,
    cmd_select_alpha,
    cmd_selection_table,
)


def _common(p) -> None:
    p.add_argument("--name", required=True, help="detector instance name")
    p.add_argument("--space", required=True, help="feature | pca | ag | ensemble_<space>")
    p.add_argument("--ood", nargs="+", required=True, help="validation OOD set names")
    p.add_argument("--criterion", nargs="+", required=True, choices=sorted(CRITERIA),
                   help="ordered selection criterion (averaged over the validation OOD sets)")
    p.add_argument("--positive", required=True, choices=["id", "ood"], help="metrics.positive")
    p.add_argument("--out", required=True, help="selection record (JSON)")


def register(subparsers) -> None:
    p = subparsers.add_parser("select", help="choose a detector's hyperparameters on validation data")
    _common(p)
    p.add_argument("--candidates", type=json.loads, required=True,
                   help="JSON list: the candidates' hyperparameters, in grid order")
    p.add_argument("--fitted", nargs="+", required=True, help="the candidates' fitted .npz, in order")
    p.add_argument("--scores", nargs="+", required=True, metavar="I=NPY",
                   help="validation scores of candidate I (one file per validation set, named <set>.npy)")
    p.add_argument("--out-fitted", required=True, help="where the chosen candidate's fitted .npz goes")
    p.set_defaults(func=cmd_select)

    p = subparsers.add_parser("select-alpha", help="choose the ensemble's alpha on validation data")
    _common(p)
    p.add_argument("--grid", nargs="+", type=float, required=True, help="alpha values")
    p.add_argument("--feature", nargs="+", required=True, help="feature scores of the validation sets")
    p.add_argument("--gradient", nargs="+", required=True, help="gradient scores of the validation sets")
    p.set_defaults(func=cmd_select_alpha)

    p = subparsers.add_parser("check-validation",
                              help="refuse validation sets that share samples with training or test sets")
    p.add_argument("--validation", nargs="+", required=True, metavar="NAME=DIR")
    p.add_argument("--test", nargs="+", required=True, metavar="NAME=DIR")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_check_validation)

    p = subparsers.add_parser("selection-table", help="one CSV of every selection record")
    p.add_argument("--records", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_selection_table)
