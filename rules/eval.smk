# MMBench / CCBench evaluation of the xtuner-style folder, one job per dataset. The prediction cache in
# results/mmbench/<dataset>/cache is undeclared, so a rerun after a crash reuses the rows already predicted.
# Datasets with answers get VLMEvalKit's _acc.csv and xtuner's mmbench_result.json; TEST splits (no answers)
# only predictions for submission, so they have a rule of their own with fewer outputs.


rule mmbench_eval:
    input:
        model="results/iter_xtuner",
        tsv="results/mmbench/data/{dataset}.tsv",
    output:
        summary="results/mmbench/{dataset}/summary.json",
        predictions="results/mmbench/{dataset}/predictions.xlsx",
        predictions_csv="results/mmbench/{dataset}/predictions.csv",
        acc="results/mmbench/{dataset}/{dataset}_acc.csv",
        xtuner_result="results/mmbench/{dataset}/mmbench_result.json",
    wildcard_constraints:
        dataset="|".join(SCORED_SPLITS) or "(?!)",
    log:
        "results/logs/mmbench_eval/{dataset}.log",
    benchmark:
        "results/benchmarks/mmbench_eval/{dataset}.tsv"
    params:
        template=config["mmbench"]["prompt_template"],
        policy=config["mmbench"]["policy"],
        verbose_quirk="--verbose-quirk" if config["mmbench"]["verbose_quirk"] else "",
        max_new_tokens=config["mmbench"]["max_new_tokens"],
        torch_dtype=config["mmbench"]["torch_dtype"],
        code=EVAL_CODE,
        batch_size=config["mmbench"]["batch_size"],
        launcher=torchrun(config["mmbench"]["gpus"]),
    threads: 2
    resources:
        gpu=gpu_request(config["mmbench"]["gpus"]),
        nodes=1,
        mem_mb=32000,
        runtime=60,
    conda:
        "../envs/llavaflow.yaml"
    shell:
        "{params.launcher} -m llavaflow.cli mmbench {input.model} --data-path {input.tsv}"
        " --work-dir results/mmbench/{wildcards.dataset} --dataset {wildcards.dataset}"
        " --prompt-template {params.template} --policy {params.policy} {params.verbose_quirk} --max-new-tokens {params.max_new_tokens}"
        " --batch-size {params.batch_size} --torch-dtype {params.torch_dtype} > {log} 2>&1"


use rule mmbench_eval as mmbench_predict with:
    output:
        summary="results/mmbench/{dataset}/summary.json",
        predictions="results/mmbench/{dataset}/predictions.xlsx",
        predictions_csv="results/mmbench/{dataset}/predictions.csv",
    wildcard_constraints:
        dataset="|".join(TEST_SPLITS) or "(?!)",
    log:
        "results/logs/mmbench_predict/{dataset}.log",
    benchmark:
        "results/benchmarks/mmbench_predict/{dataset}.tsv"
