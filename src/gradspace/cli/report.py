"""``gradspace`` commands of ``gradspace.report``: argument parsing only; each command
calls the library function it names."""

from __future__ import annotations

from ..report import (
    cmd_report,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="self-contained HTML report (tables, figures, run times)",
        description="Write OUT_DIR/index.html (figures embedded) and OUT_DIR/figures/*.png.")
    p.add_argument("--metrics", required=True, help="metrics.csv written by `gradspace evaluate`")
    p.add_argument("--card", default=None, help="model card JSON")
    p.add_argument("--scores", nargs="*", default=[], metavar="NPY",
                   help="score files .../scores/<space>/<detector>/<dataset>.npy for histograms and ROC")
    p.add_argument("--benchmarks", nargs="*", default=[], metavar="TSV",
                   help="Snakemake benchmark TSV files for the run-time table")
    p.add_argument("--timing", nargs="*", default=[], metavar="JSON",
                   help="timing JSON files, one table each")
    p.add_argument("--sections", nargs="*", default=[], metavar="JSON",
                   help='extra sections: inline JSON or JSON files, each a list of '
                        '{"title", "caption"?, "csv"? | "markdown"? | "image"?}')
    p.add_argument("--title", default="gradspace report", help="report title")
    p.add_argument("--out-dir", required=True, help="output directory (replaced atomically)")
    p.set_defaults(func=cmd_report)
