#!/usr/bin/env bash
# Installs llavaflow into the active Python environment (virtualenv or conda), or into ./.venv when
# none is active. An already installed torch is kept (e.g. a CUDA build on a GPU box); where there is
# none, torch==2.13.0 is installed first, from TORCH_INDEX_URL when set (PyPI's Linux wheel is the CUDA build;
# https://download.pytorch.org/whl/cpu has the CPU one), else from pip's configured index.
set -euo pipefail
cd "$(dirname "$0")"
if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]]; then
    py=python
else
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    py=.venv/bin/python
fi
if "$py" -c "import torch" 2>/dev/null; then
    echo "install.sh: keeping torch $("$py" -c 'import torch; print(torch.__version__)')"
else
    "$py" -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
"$py" -m pip install --quiet -e ".[test]"
echo "install.sh: llavaflow installed for $("$py" -c 'import sys; print(sys.executable)')"
