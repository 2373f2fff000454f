"""``gradspace`` commands of ``gradspace.models.jobs``: argument parsing only; each command
calls the library function it names."""

from __future__ import annotations

from ..models.jobs import (
    load_model_command,
    model_card_command,
    train_command,
    with_compute,
)
from . import json_arg


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the ID classifier -> normalized checkpoint")
    p.add_argument("--data-dir", required=True, help="prepared id_train dataset directory")
    p.add_argument("--params", type=json_arg, default={},
                   help="JSON: arch, arch_kwargs, num_classes, in_channels, image_size, mean, std, "
                        "train {epochs, batch_size, lr, momentum, nesterov, weight_decay, schedule, "
                        "milestones, gamma, augment}, compute {device, num_workers}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compute", type=json_arg, default={},
                   help="JSON {device, num_workers}; filled from $GRADSPACE_RUNTIME by the workflow")
    p.add_argument("--out", required=True, help="output checkpoint model.pt")
    p.add_argument("--log-json", default=None, help="optional training-curve JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=lambda a: train_command(a.data_dir, with_compute(a.params, a.compute), a.seed,
                                                a.out, a.log_json, progress=not a.no_progress))

    p = subparsers.add_parser("load-model",
                              help="normalize torchvision:<arch> / checkpoint:<path> -> model.pt")
    p.add_argument("--source", required=True, help="torchvision:<arch> or checkpoint:<path>")
    p.add_argument("--params", type=json_arg, default={},
                   help="JSON: arch (raw state dicts), arch_kwargs, num_classes (checked), "
                        "in_channels (checked), weights (torchvision enum member), image_size")
    p.add_argument("--out", required=True, help="output checkpoint model.pt")
    p.set_defaults(func=lambda a: load_model_command(a.source, a.params, a.out))

    p = subparsers.add_parser("model-card", help="model card JSON (arch, parameters, ID accuracy)")
    p.add_argument("--model", required=True, help="normalized checkpoint model.pt")
    p.add_argument("--shards", required=True, nargs="+", help="id_test embedding shard stores")
    p.add_argument("--out", required=True, help="output card.json")
    p.set_defaults(func=lambda a: model_card_command(a.model, a.shards, a.out))
