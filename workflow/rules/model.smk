# The classifier: trained here (small models) or loaded from a local torchvision cache
# or checkpoint, always normalized to results/<exp>/model/model.pt; plus a model card.

if config["model"]["source"] == "train":

    rule train:
        input:
            f"{R}/data/id_train",
        output:
            MODEL,
        params:
            code=code_version("model"),
            spec=jarg(train_params()),
            seed=config["seed"],
        log:
            f"{LOGS}/train.log",
        benchmark:
            f"{BENCH}/train.tsv"
        threads: THREADS
        resources:
            **attempt_scaled(mem_mb=8000, runtime=120),
        conda:
            CONDA_ENV
        shell:
            "GRADSPACE_THREADS={threads} gradspace train --data-dir {input} --params {params.spec} "
            "--seed {params.seed} --out {output} > {log} 2>&1"

else:

    rule load_model:
        output:
            MODEL,
        params:
            code=code_version("model"),
            source=shlex.quote(config["model"]["source"]),
            spec=jarg(load_params()),
        log:
            f"{LOGS}/load_model.log",
        benchmark:
            f"{BENCH}/load_model.tsv"
        resources:
            **attempt_scaled(mem_mb=8000, runtime=30),
        conda:
            CONDA_ENV
        shell:
            "gradspace load-model --source {params.source} --params {params.spec} "
            "--out {output} > {log} 2>&1"


rule model_card:
    input:
        model=MODEL,
        shards=shard_stores("id_test"),
    output:
        report(f"{R}/model/card.json", caption="../report/card.rst", category="Model"),
    params:
        code=code_version("model"),
    log:
        f"{LOGS}/model_card.log",
    benchmark:
        f"{BENCH}/model_card.tsv"
    resources:
        **attempt_scaled(mem_mb=4000, runtime=15),
    conda:
        CONDA_ENV
    shell:
        "gradspace model-card --model {input.model} --shards {input.shards} "
        "--out {output} > {log} 2>&1"
