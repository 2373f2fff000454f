"""``gradspace`` commands of ``gradspace.findings``: argument parsing only; each command
calls the library function it names."""

from __future__ import annotations

from ..findings import (
    DEFAULT_TOLERANCE,
    cmd_findings,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "findings", help="test the papers' qualitative claims on a run's metrics",
        description="Write findings.csv: each claim of the papers this run can test, the paper's "
                    "figure, the run's figure (computed from metrics.csv and the subspace "
                    "diagnostics) and whether it holds.")
    p.add_argument("--metrics", required=True, help="metrics.csv written by `gradspace evaluate`")
    p.add_argument("--detectors", default=None,
                   help='JSON (inline or file): the feature detectors {"<name>": {"method"?, ...hparams}}')
    p.add_argument("--grad-scores", default=None,
                   help='JSON (inline or file): gradients.scores {"<key>": {"kind", ...}}')
    p.add_argument("--reconstruction", nargs="*", default=[], metavar="SPACE=CSV",
                   help="subspace diagnostics reconstruction.csv per space, e.g. pca=.../reconstruction.csv")
    p.add_argument("--groups", default=None,
                   help='JSON (inline or file): metrics.groups {"<group>": ["<OOD set>", ...]}')
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="AUROC margin (fraction) of 'matches or beats' (default 0.005)")
    p.add_argument("--selected", nargs="*", default=[], metavar="JSON",
                   help="selection records (`gradspace select`): their chosen hyperparameters replace "
                        "the configured ones of those detectors")
    p.add_argument("--out-csv", required=True, help="findings.csv")
    p.add_argument("--out-md", default=None, help="findings.md (Markdown table)")
    p.set_defaults(func=cmd_findings)
