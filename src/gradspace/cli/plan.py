"""``gradspace`` commands of ``gradspace.plan``: argument parsing only; each command
calls the library function it names."""

from __future__ import annotations

from ..plan import (
    DEVICES,
    cmd_plan,
)


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="jobs, memory, disk, FLOPs and time of a config, before anything runs",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--configfile",
        nargs="+",
        default=None,
        help="config files, merged in order like snakemake --configfile (default config/config.yaml)",
    )
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config values, e.g. subspace.k=1000"
    )
    p.add_argument("--device", default="cpu", choices=sorted(DEVICES), help="device to estimate run time on")
    p.add_argument("--gpus", type=int, default=1, help="devices working in parallel (wall time)")
    p.add_argument("--sizes", default="", help="samples per dataset, e.g. id_train=50000,id_test=50000")
    p.add_argument("--results", default=None, help="results/<experiment> of an earlier run (exact sizes)")
    p.add_argument(
        "--calibration", default=None, help="JSON from benchmarks/gpu_check.sh (measured efficiency)"
    )
    p.add_argument(
        "--host-gflops",
        type=float,
        default=None,
        help="float64 linear algebra rate of the CPU nodes that run the reduces (GFLOP/s; "
        "default: measured on this project's 2-core machine)",
    )
    p.add_argument(
        "--io-mbps",
        type=float,
        default=None,
        help="store read/write throughput (MB/s; default: measured here)",
    )
    p.add_argument(
        "--probe-host",
        action="store_true",
        help="measure the memory of a bare job process on this machine (two short probe "
        "processes, a few seconds) and base the host memory figures on it; run it on a "
        "machine like the compute nodes",
    )
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--max-disk", default=None, help="fail when the peak disk in use exceeds this (e.g. 2T)")
    p.add_argument("--max-gpu-mem", default=None, help="fail when a job needs more GPU memory (e.g. 80G)")
    p.set_defaults(func=cmd_plan)
