"""``gradspace`` commands of ``gradspace.grads.scoring``: argument parsing only; each command
calls the library function it names."""

from __future__ import annotations

from ..grads.scoring import (
    cmd_grad_scores,
)
from . import json_arg


def register(subparsers) -> None:
    p = subparsers.add_parser("grad-scores", help="block/all-parameter gradient-norm scores "
                              "(GradNorm, ExGrad, Igoe et al. variants, BatchGrad) for one shard")
    p.add_argument("--model", required=True, help="model checkpoint (model/model.pt)")
    p.add_argument("--data-dir", required=True, help="prepared dataset directory")
    p.add_argument("--shard", type=int, default=None, help="shard number (default: all shards)")
    p.add_argument("--params", type=json_arg, default={},
                   help="JSON: params, temperature, strategy, chunk_size, precision, max_chunk_mb "
                        "(gradient workspace per step, MiB; default 1024), device, batch_size, "
                        "num_workers, mean, std, seed, scores")
    p.add_argument("--ref-data-dir", default=None,
                   help="ID-train dataset for BatchGrad's reference points")
    p.add_argument("--out", required=True, help="output store gradscores/<dataset>/shard-K.zarr")
    p.set_defaults(func=cmd_grad_scores, runtime_into=("params",))
