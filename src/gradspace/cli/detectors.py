"""``gradspace`` commands of ``gradspace.detectors.jobs``: argument parsing only; each command
calls the library function it names."""

from __future__ import annotations

from ..detectors.jobs import (
    DEFAULT_ROWS,
    cmd_fit,
    cmd_score,
)
from . import json_arg


def register(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit an OOD detector on ID-train embedding stores")
    p.add_argument("--method", required=True, help="detector registry key (e.g. energy, knn)")
    p.add_argument("--name", default=None, help="instance name recorded in the output (default: method)")
    p.add_argument("--params", type=json_arg, default={}, help="detector hyperparameters (JSON object)")
    p.add_argument("--space", default="feature", help="space recorded with the detector: feature|pca|ag")
    p.add_argument("--embedding", default=None,
                   help="metrics 'embedding' label (default: the detector's own in the feature space, "
                        "'gradient' otherwise)")
    p.add_argument("--train", nargs="*", default=[], metavar="STORE", help="ID-train shard stores")
    p.add_argument("--model", default=None, help="model checkpoint (head weights; BATS BN parameters)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None,
                   help="prepared ID-train directory, for detectors whose fit runs the model (GROOD)")
    p.add_argument("--compute", type=json_arg, default={},
                   help="JSON {batch_size, device, num_workers, mean, std} for fits that run the model")
    p.add_argument("--map", action="append", default=[], metavar="NAME=ARRAY",
                   help="read detector array NAME from store array ARRAY (repeatable)")
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows per chunk read from stores")
    p.add_argument("--out", required=True, help="fitted detector .npz")
    p.set_defaults(func=cmd_fit)

    s = subparsers.add_parser("score", help="score a dataset with a fitted detector")
    s.add_argument("--fitted", required=True, help="fitted detector .npz from `gradspace fit`")
    s.add_argument("--shards", nargs="*", default=[], metavar="STORE",
                   help="embedding shard stores of the dataset (array detectors)")
    s.add_argument("--model", default=None, help="model checkpoint (model-pass detectors)")
    s.add_argument("--data-dir", default=None, help="prepared dataset directory (model-pass detectors)")
    s.add_argument("--params", type=json_arg, default={},
                   help="compute params for model passes: batch_size, device, num_workers, mean, std")
    s.add_argument("--map", action="append", default=[], metavar="NAME=ARRAY",
                   help="override the store array a detector array is read from")
    s.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows per chunk read from stores")
    s.add_argument("--out", required=True, help="scores .npy (float64, manifest order)")
    s.set_defaults(runtime_into=("params",))
    s.set_defaults(func=cmd_score)
