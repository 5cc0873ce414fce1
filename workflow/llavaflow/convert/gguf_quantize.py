"""Quantized GGUF variants through llama.cpp's own quantizer (`llama_model_quantize`).

llama.cpp is not a dependency of llavaflow: the quantizer is taken from llama-cpp-python where it is
importable, else from a `llama-quantize` executable on PATH. Types needing an importance matrix (IQ*) are
not offered. Runnable on its own: `python -m llavaflow.convert.gguf_quantize IN OUT TYPE` (stdlib only,
so any Python with llama-cpp-python can run it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
               "Q5_K_S", "Q5_K_M", "Q6_K")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def check_quantizer(types) -> None:
    bad = [t for t in types if t not in QUANT_TYPES]
    if bad:
        raise ValueError(f"gguf.quantize: unknown type(s) {bad}; choose from {list(QUANT_TYPES)}")
    if types and _llama_cpp() is None and shutil.which("llama-quantize") is None:
        raise RuntimeError(f"gguf.quantize lists {list(types)}, but llama.cpp's quantizer is not installed: "
                           "`pip install llama-cpp-python` (or put llama-quantize on PATH), or set gguf.quantize: []")


def quantize_file(src: Path, dst: Path, qtype: str) -> None:
    check_quantizer([qtype])
    llama_cpp = _llama_cpp()
    if llama_cpp is not None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
        params.nthread = len(os.sched_getaffinity(0))
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize {src} -> {qtype} failed (return code {rc})")
        return
    proc = subprocess.run(["llama-quantize", str(src), str(dst), qtype], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-quantize {src} -> {qtype} failed:\n{proc.stderr[-2000:]}")


if __name__ == "__main__":
    quantize_file(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
