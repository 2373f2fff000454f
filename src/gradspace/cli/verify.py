"""``gradspace`` commands of ``gradspace.verify``: argument parsing only; each command
calls the library function it names."""

from __future__ import annotations

from ..verify import (
    verify_command,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify-stores", help="check every Zarr store of an experiment; remove broken ones",
        description=__doc__.splitlines()[0])
    p.add_argument("root", help="results/<experiment> (or any directory holding stores)")
    p.add_argument("--quick", action="store_true",
                   help="only check file presence and sizes against the completion records")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--remove", action="store_true", help="delete broken stores")
    g.add_argument("--quarantine", metavar="DIR", help="move broken stores under DIR instead")

    def run(a):
        rc = verify_command(a.root, full=not a.quick, remove=a.remove, quarantine=a.quarantine)
        if rc:
            raise SystemExit(rc)

    p.set_defaults(func=run)
