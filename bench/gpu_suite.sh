#!/usr/bin/env bash
# The GPU measurement in one command, for a bare GPU machine without internet: install what its Python
# lacks from bench/wheels/ (made by bench/fetch_wheels.sh, carried with the tree), llavaflow itself, then
# run bench/gpu_suite.py (JSON lines on stdout and in $OUT/gpu_suite.jsonl). Arguments go to gpu_suite.py.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1  # no internet there: a hub lookup would only wait for its timeout
if [[ -d bench/wheels ]]; then
    offline=(--quiet --no-index --find-links bench/wheels)
    "$py" -m pip install "${offline[@]}" -r bench/requirements-gpu.txt deepspeed==0.19.8 \
        || for req in $(grep -v '^#' bench/requirements-gpu.txt) deepspeed==0.19.8; do  # what can be had
               "$py" -m pip install "${offline[@]}" "$req" || echo "gpu_suite.sh: could not install $req"
           done
fi
"$py" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . \
    || export PYTHONPATH="$PWD/workflow${PYTHONPATH:+:$PYTHONPATH}"  # no setuptools: import from the tree
# The device call's limit covers the install too: the measurements get what is left of GPU_SUITE_SECONDS.
exec "$py" bench/gpu_suite.py --budget-s $(( ${GPU_SUITE_SECONDS:-510} - SECONDS )) "$@"
