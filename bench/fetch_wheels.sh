#!/usr/bin/env bash
# Downloads the wheels bench/gpu_suite.py needs (bench/requirements-gpu.txt and their dependencies, torch
# and numpy excepted: the GPU machine's CUDA torch brings its own) into bench/wheels/, for a GPU machine
# without internet: the folder is git-ignored; pass it in the device tool's `carry` (64 MiB in all).
# Usage: bench/fetch_wheels.sh [python versions, default 3.12; each adds ~25 MB]
set -euo pipefail
cd "$(dirname "$0")"
versions=${*:-3.12}  # the GPU machine's Python (gpu_suite's env line says it); transformers 5.24 needs >= 3.11
mkdir -p wheels
for v in $versions; do
    python3 -m pip download --quiet --dest wheels --only-binary=:all: --python-version "$v" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --implementation cp -r requirements-gpu.txt
done
# DeepSpeed is published as an sdist whose setup.py imports torch: build its pure-Python wheel (ops are
# compiled just in time on the GPU machine) with the torch of the interpreter running this script.
py=${PYTHON:-../.venv/bin/python}
"$py" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir wheels deepspeed==0.19.8
# numpy comes with every CUDA torch image; torch and its nvidia-* wheels must never travel (GBs).
rm -f wheels/torch-*.whl wheels/nvidia_*.whl wheels/triton-*.whl wheels/numpy-*.whl
du -sh wheels
ls wheels | wc -l
