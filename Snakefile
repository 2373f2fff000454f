# gradspace: gradient-based OOD detection as a Snakemake workflow.
# Thin by design: configuration, schema validation, the rule files, and the targets.
# All logic lives in the `gradspace` Python package (src/gradspace), called through its CLI.

import os

from snakemake.utils import min_version, validate

min_version("9.0")


# The demo config is the default; a --configfile (e.g. a preset) replaces it whole,
# and the schema fills in every key it leaves out.
if not config:

    configfile: os.path.join(workflow.basedir, "config", "config.yaml")


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"


wildcard_constraints:
    dataset="|".join(DATASETS),
    shard=r"\d+",
    detector="|".join(DETECTORS) if DETECTORS else "__none__",
    gdetector="|".join(GRAD_DETECTORS) if GRAD_DETECTORS else "__none__",
    space="pca|ag",
    it=r"\d{3}",
    part=r"\d+",
    cand=r"\d+",


include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/gradients.smk"
include: "workflow/rules/gradstats.smk"
include: "workflow/rules/ag.smk"
include: "workflow/rules/pca.smk"
include: "workflow/rules/projection.smk"
include: "workflow/rules/grad_detectors.smk"
include: "workflow/rules/detectors.smk"
include: "workflow/rules/selection.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        f"{R}/model/card.json",
        f"{R}/metrics.csv",
        f"{R}/report",
        expand(f"{R}/diagnostics/{{space}}", space=SPACES),
        [f"{R}/diagnostics/gradient"] if SPACES else [],
    default_target: True
