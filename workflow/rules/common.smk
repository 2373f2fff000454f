# Helpers shared by the rule files (dataset names, shard lists, detector instances) and
# the JSON parameter blobs handed to the gradspace CLI. Every setting that changes a
# rule's output reaches it through `params`, so Snakemake's params trigger reruns
# exactly the invalidated jobs.

import json
import shlex

from gradspace import __version__ as GRADSPACE_VERSION
from gradspace.cli import export_runtime_settings
from gradspace.detectors.base import get_detector
from gradspace.errors import ConfigError

EXP = config["experiment"]
R = f"results/{EXP}"
LOGS = f"logs/{EXP}"
BENCH = f"{R}/benchmarks"
MODEL = f"{R}/model/model.pt"

ID_SETS = ["id_train", "id_test"]
OOD_SETS = list(config["data"]["ood"])
DATASETS = ID_SETS + OOD_SETS


def jarg(obj):
    """A JSON blob, shell-quoted, for --params."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


def n_shards(dataset):
    data = config["data"]
    if dataset in ID_SETS:
        idc = data["id"]
        own = idc.get("train" if dataset == "id_train" else "test") or {}
        return int(own.get("shards", idc.get("shards", data["shards"])))
    return int(data["ood"][dataset].get("shards", data["shards"]))


def shard_stores(dataset, kind="embeddings"):
    return [f"{R}/{kind}/{dataset}/shard-{k}.zarr" for k in range(n_shards(dataset))]


def _id_sources():
    idc = config["data"]["id"]
    if bool(idc.get("train")) != bool(idc.get("test")):
        raise ConfigError("data.id: give both 'train' and 'test' sources, or neither (then 'source' is split)")


_id_sources()


def prepare_params(dataset):
    data = config["data"]
    common = {
        "image_size": data["image_size"],
        "channels": data["channels"],
        "shards": n_shards(dataset),
    }
    if dataset in ID_SETS:
        idc = data["id"]
        part = "train" if dataset == "id_train" else "test"
        separate = part in idc
        source = dict(idc[part] if separate else idc["source"])
        source.pop("shards", None)
        return {
            "role": dataset,
            "source": source,
            "num_classes": idc["num_classes"],
            "test_fraction": None if separate else idc["test_fraction"],
            "train_subsample": idc["train_subsample"] if dataset == "id_train" else None,
            "n": None,
            **common,
        }
    source = dict(data["ood"][dataset])
    n = source.pop("n", None)
    source.pop("shards", None)
    return {"role": "ood", "source": source, "num_classes": None, "test_fraction": None,
            "train_subsample": None, "n": n, **common}


# Settings that change how fast a job runs but not what it writes (device, batch size,
# data-loader workers) reach the CLI through $GRADSPACE_RUNTIME instead of rule params,
# so changing them never reruns finished jobs. Every job (local or on SLURM) parses this
# file again, so the variable is set wherever a job runs.
export_runtime_settings(config["compute"])


def compute_params():
    """Settings that change outputs: numeric precision and input normalization."""
    c = config["compute"]
    d = config["data"]
    return {"precision": c["precision"], "mean": d["mean"], "std": d["std"]}


def norm_params():
    """Input normalization, for commands that run the model over prepared images."""
    return {"mean": config["data"]["mean"], "std": config["data"]["std"]}


def train_params():
    """Everything that changes the trained model (device and workers come at run time)."""
    d = config["data"]
    return {
        "arch": config["model"]["arch"],
        "num_classes": d["id"]["num_classes"],
        "in_channels": d["channels"],
        "image_size": d["image_size"],
        "mean": d["mean"],
        "std": d["std"],
        "train": config["model"]["train"],
    }


def load_params():
    """Settings of an externally trained model (torchvision cache or checkpoint)."""
    d = config["data"]
    return {
        "arch": config["model"]["arch"],
        "weights": config["model"]["weights"],
        "num_classes": d["id"]["num_classes"],
        "in_channels": d["channels"],
        "image_size": d["image_size"],
    }


def _detector_table(section):
    table = {}
    for name, cfg in (section or {}).items():
        hparams = dict(cfg or {})
        method = hparams.pop("method", name)
        cls = get_detector(method)  # ConfigError naming the unknown detector
        cls(**hparams)  # ConfigError naming an unknown hyperparameter
        table[name] = {
            "method": method,
            "hparams": hparams,
            "embedding": cls.embedding,
            "needs_model": bool(cls.needs_model),
            "needs_fit": bool(cls.needs_fit),
        }
    return table


DETECTORS = _detector_table(config["detectors"])


def detector_params(name):
    d = DETECTORS[name]
    return {"method": d["method"], "hparams": d["hparams"]}


def store_kind(detector):
    """Which shard stores a detector reads: the gradient pass's or the extraction's."""
    return "gradscores" if DETECTORS[detector]["method"] == "stored_grad_score" else "embeddings"


def grad_scores_params():
    g = config["gradients"]
    return {**norm_params(), "params": g["params"], "strategy": g["strategy"],
            "chunk_size": g["chunk_size"], "temperature": g["temperature"],
            "precision": config["compute"]["precision"], "scores": g["scores"],
            "seed": config["seed"]}


def grad_scores_inputs(wc):
    inputs = {"model": MODEL, "data": f"{R}/data/{wc.dataset}"}
    if any(s["kind"] == "batchgrad" for s in config["gradients"]["scores"].values()):
        inputs["ref"] = f"{R}/data/id_train"
    return inputs


def detector_regex(model_pass):
    """Regex of the detector instances that do (or do not) need a model pass to score."""
    names = [n for n, d in DETECTORS.items() if d["needs_model"] == model_pass]
    return "|".join(names) if names else "__none__"


def feature_score_files():
    return [f"{R}/scores/feature/{d}/{ds}.npy" for d in DETECTORS for ds in ["id_test"] + OOD_SETS]


def all_score_files():
    return feature_score_files()


def detector_table_json():
    return jarg({n: {"method": d["method"], "embedding": d["embedding"]} for n, d in DETECTORS.items()})
