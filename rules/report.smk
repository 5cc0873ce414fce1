# One table of every evaluation, for people and for `snakemake --report`.


rule report:
    input:
        expand("results/mmbench/{dataset}/summary.json", dataset=config["mmbench"]["datasets"]),
    output:
        report("results/report/mmbench_summary.tsv", caption="../workflow/report/mmbench.rst", category="Evaluation"),
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    params:
        python=python_exe,
        scripts=scripts_dir,
        code=code_hash("report.py"),
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../envs/llavaflow.yaml"
    shell:
        "{params.python} {params.scripts}/report.py --out {output} {input} > {log} 2>&1"
