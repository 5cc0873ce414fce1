#!/usr/bin/env bash
# The tiny preset's whole DAG from nothing, timed: wall time, each job's seconds, and the MMBench table.
# Usage: bash bench/tiny_dag.sh [WORKDIR]   (default: a new temporary folder; run with nothing else busy)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
workdir=${1:-$(mktemp -d -t tiny-dag-XXXXXX)}
mkdir -p "$workdir"
start=$(date +%s)
python -m snakemake all --cores 2 --snakefile "$repo/Snakefile" --directory "$workdir" \
    --configfile "$repo/config/tiny.yaml" --quiet rules
echo "tiny DAG: $(( $(date +%s) - start )) s wall on $(nproc) cores, in $workdir"
(cd "$workdir/results/benchmarks" && find . -name '*.tsv' | sort) | while read -r f; do
    printf '  %-36s %8s s\n' "${f#./}" "$(tail -n 1 "$workdir/results/benchmarks/$f" | cut -f1)"
done
column -t -s $'\t' "$workdir/results/report/mmbench_summary.tsv" | cut -c1-110
