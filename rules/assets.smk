# The tiny preset builds every input locally: base models, tokenizer, training data, benchmark TSVs.
if TINY:

    rule build_tiny_assets:
        output:
            assets=directory("results/tiny"),
            tsvs=expand("results/mmbench/data/{dataset}.tsv", dataset=config["mmbench"]["datasets"]),
        log:
            "results/logs/build_tiny_assets.log",
        benchmark:
            "results/benchmarks/build_tiny_assets.tsv"
        params:
            seed=0,
            datasets=config["mmbench"]["datasets"],
            code=code_hash(*identity.ASSETS_CODE),
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        conda:
            "../envs/llavaflow.yaml"
        shell:
            "llavaflow build-tiny --out {output.assets} --mmbench-dir results/mmbench/data"
            " --datasets {params.datasets} --seed {params.seed} > {log} 2>&1"
