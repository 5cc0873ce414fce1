# llavaflow: the life of a LLaVA model as one DAG. Targets: results/iter_hf (and any intermediate), all.
# Real recipe:  snakemake --cores all
# Tiny preset:  snakemake --cores all --configfile config/tiny.yaml
from snakemake.utils import min_version

min_version("9.0")


# config/config.yaml is the default config, not a base layer: a --configfile replaces it, so a key missing
# from a preset is an error naming the key instead of a value silently taken from the reference recipe.
# (To layer files on purpose, name them all: --configfile config/config.yaml my-changes.yaml.)
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "rules/common.smk"


wildcard_constraints:
    stage="|".join(STAGES),
    dataset="|".join(config["mmbench"]["datasets"]),


include: "rules/assets.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/convert.smk"
include: "rules/eval.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        "results/iter_hf",
        "results/iter_llava",
        "results/iter_gguf",
        "results/report/mmbench_summary.tsv",
