"""``gradspace`` commands of ``gradspace.data.prepare``: argument parsing only; each command
calls the library function it names."""

from __future__ import annotations

from ..data.prepare import (
    cmd_prepare,
)
from . import json_arg


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="prepare one dataset: manifest.csv, info.json, images.zarr",
        description="Prepare one dataset: manifest.csv, info.json and (array sources) images.zarr, "
                    "written atomically to --out.")
    p.add_argument("--dataset", required=True, help="dataset name (id_train, id_test or an OOD name)")
    p.add_argument("--params", type=json_arg, required=True,
                   help='JSON object: {"role", "source": {"kind", ...}, "num_classes", "test_fraction", '
                        '"train_subsample", "n", "shards", "image_size", "channels"}')
    p.add_argument("--seed", type=int, default=0, help="seed for splits, subsets and crops")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.set_defaults(func=cmd_prepare)
