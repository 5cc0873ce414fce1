# One table of every evaluation, for people and for `snakemake --report`.


rule report:
    input:
        summaries=expand("results/mmbench/{dataset}/summary.json", dataset=config["mmbench"]["datasets"]),
        pretrain=rules.pretrain.output[0],
        finetune=rules.finetune.output[0],
        benchmarks=every_benchmark,
    output:
        mmbench=report("results/report/mmbench_summary.tsv", caption="../workflow/report/mmbench.rst", category="Evaluation"),
        curves=report("results/report/training_curves.svg", caption="../workflow/report/curves.rst", category="Training"),
        runtimes=report("results/report/stage_runtimes.tsv", caption="../workflow/report/runtimes.rst", category="Runtime"),
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    params:
        code=code_hash("report.py"),
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../envs/llavaflow.yaml"
    shell:
        "llavaflow report --out {output.mmbench} --curves {output.curves}"
        " --runtimes {output.runtimes} --metrics pretrain={input.pretrain}/metrics.jsonl"
        " finetune={input.finetune}/metrics.jsonl --benchmarks {input.benchmarks} --summaries {input.summaries}"
        " > {log} 2>&1"
