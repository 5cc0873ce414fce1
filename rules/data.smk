# The real recipe's inputs: download manifests (config `downloads`), then a check that every image
# referenced by the annotations exists and opens. Downloaded data stays in the undeclared data root, so
# a rerun resumes partial files instead of deleting them; only small record files are declared.
if not TINY:

    rule download_data:
        output:
            "results/data/{stage}.download.json",
        log:
            "results/logs/download_data/{stage}.log",
        benchmark:
            "results/benchmarks/download_data/{stage}.tsv"
        params:
            sources=download_sources,
            entries=download_entries,
            root=data_root,
            jobs=download_jobs,
        localrule: True
        retries: 3
        threads: 4
        resources:
            mem_mb=4000,
            runtime=24 * 60,
        conda:
            "../envs/llavaflow.yaml"
        shell:
            "llavaflow download --root {params.root} --entries {params.entries:q} --jobs {params.jobs}"
            " --done {output} > {log} 2>&1"

    rule check_data:
        input:
            "results/data/{stage}.download.json",
        output:
            counts="results/data/{stage}.check.json",
            bad_images="results/data/{stage}.bad_images.tsv",
        log:
            "results/logs/check_data/{stage}.log",
        benchmark:
            "results/benchmarks/check_data/{stage}.tsv"
        params:
            sources=check_sources,
            on_bad=config["data"]["on_bad_sample"],
            code=code_hash(*identity.CHECK_CODE),
        threads: 8
        resources:
            mem_mb=8000,
            runtime=4 * 60,
        conda:
            "../envs/llavaflow.yaml"
        shell:
            "llavaflow check-data --sources {params.sources:q} --on-bad-sample {params.on_bad}"
            " --report {output.bad_images} --out {output.counts} > {log} 2>&1"

    rule download_mmbench:
        output:
            ensure("results/mmbench/data/{dataset}.tsv", non_empty=True),
        log:
            "results/logs/download_mmbench/{dataset}.log",
        benchmark:
            "results/benchmarks/download_mmbench/{dataset}.tsv"
        params:
            source=mmbench_source,
            entries=mmbench_entry,
        localrule: True
        retries: 3
        threads: 1
        resources:
            mem_mb=1000,
            runtime=60,
        conda:
            "../envs/llavaflow.yaml"
        shell:
            "llavaflow download --root results/mmbench/data --entries {params.entries:q} > {log} 2>&1"
