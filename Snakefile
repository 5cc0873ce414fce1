# llavaflow: the life of a LLaVA model as one DAG. Targets: results/iter_hf (and any intermediate), all.
# Real recipe:  snakemake --cores all
# Tiny preset:  snakemake --cores all --configfile config/tiny.yaml
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
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
