# The run's summary for people and for `snakemake --report`: tables and matplotlib figures, written by
# llavaflow.report (the same code as `llavaflow report RESULTS_DIR`).


rule report:
    input:
        summaries=expand("results/mmbench/{dataset}/summary.json", dataset=config["mmbench"]["datasets"]),
        pretrain=rules.pretrain.output[0],
        finetune=rules.finetune.output[0],
        benchmarks=every_benchmark,
    output:
        mmbench=report("results/report/mmbench_summary.tsv", caption="../workflow/report/mmbench.rst", category="Evaluation"),
        categories=report("results/report/mmbench_categories.png", caption="../workflow/report/categories.rst",
                          category="Evaluation"),
        curves=report("results/report/training_curves.png", caption="../workflow/report/curves.rst", category="Training"),
        runtimes=report("results/report/stage_runtimes.tsv", caption="../workflow/report/runtimes.rst", category="Runtime"),
        runtimes_figure=report("results/report/stage_runtimes.png", caption="../workflow/report/runtimes.rst",
                               category="Runtime"),
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    params:
        code=code_hash(*identity.REPORT_CODE),
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../envs/llavaflow.yaml"
    shell:
        "llavaflow report --out results/report"
        " --metrics pretrain={input.pretrain}/metrics.jsonl finetune={input.finetune}/metrics.jsonl"
        " --benchmarks {input.benchmarks} --summaries {input.summaries} > {log} 2>&1"
