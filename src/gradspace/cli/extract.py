"""``gradspace`` commands of ``gradspace.extract``: argument parsing only; each command
calls the library function it names."""

from __future__ import annotations

from ..extract import (
    extract_shard,
)
from . import json_arg


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="forward pass over one shard -> embedding store (logits, features, ...)",
        description="Run the model over one shard of a prepared dataset and write logits, "
                    "penultimate features, labels, predictions and manifest rows to a Zarr store.")
    p.add_argument("--model", required=True, help="normalized checkpoint (model.pt)")
    p.add_argument("--data-dir", required=True, help="prepared dataset directory")
    p.add_argument("--shard", required=True, type=int, help="shard number")
    p.add_argument("--params", type=json_arg, default={},
                   help="JSON: batch_size (256), num_workers (0), device (auto), "
                        "precision (fp32|bf16|tf32), mean, std")
    p.add_argument("--out", required=True, help="output store shard-K.zarr")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    p.set_defaults(func=lambda a: extract_shard(a.model, a.data_dir, a.shard, a.out, a.params,
                                                progress=not a.no_progress),
                   runtime_into=("params",))
