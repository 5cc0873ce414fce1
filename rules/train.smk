# Training stages. Only final.pth is declared: resume state lives in the undeclared work_dir, which
# Snakemake never deletes, so a rerun of a killed job resumes from its newest iter_N.pth.


rule pretrain:
    input:
        **training_inputs("pretrain"),
    output:
        directory("results/pretrain/final.pth"),
    log:
        "results/logs/pretrain.log",
    benchmark:
        "results/benchmarks/pretrain.tsv"
    params:
        recipe=recipe_json("pretrain"),
        volatile=recipe_volatile("pretrain"),
        world=world_size("pretrain"),
        code=TRAIN_CODE,
        launcher=torchrun(config["pretrain"]["gpus_per_node"], config["pretrain"]["nodes"]),
        attempt=attempt_frame("pretrain"),
    threads: 4
    resources:
        **train_resources("pretrain", mem_mb=64000, runtime=24 * 60),
    conda:
        "../envs/llavaflow.yaml"
    shell:
        # every attempt is also appended to {log}.attempts, which Snakemake never deletes
        "exec > >(tee -a {log}.attempts > {log}) 2>&1; {params.attempt}"
        " {params.launcher} -m llavaflow.cli train --recipe {params.recipe:q} --set {params.volatile:q}"
        " --work-dir results/pretrain/work_dir --output {output}"


rule finetune:
    input:
        **training_inputs("finetune"),
    output:
        directory("results/finetune/final.pth"),
    log:
        "results/logs/finetune.log",
    benchmark:
        "results/benchmarks/finetune.tsv"
    params:
        recipe=recipe_json("finetune"),
        volatile=recipe_volatile("finetune"),
        world=world_size("finetune"),
        code=TRAIN_CODE,
        launcher=torchrun(config["finetune"]["gpus_per_node"], config["finetune"]["nodes"]),
        attempt=attempt_frame("finetune"),
    threads: 4
    resources:
        **train_resources("finetune", mem_mb=128000, runtime=72 * 60),
    conda:
        "../envs/llavaflow.yaml"
    shell:
        # every attempt is also appended to {log}.attempts, which Snakemake never deletes
        "exec > >(tee -a {log}.attempts > {log}) 2>&1; {params.attempt}"
        " {params.launcher} -m llavaflow.cli train --recipe {params.recipe:q} --set {params.volatile:q}"
        " --work-dir results/finetune/work_dir --output {output}"
