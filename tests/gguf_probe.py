"""Runs inside the llama-cpp-python venv that test_gguf.py builds (no torch, no llavaflow there).

Usage: python gguf_probe.py JOB.json OUT.npz. JOB: {"model": path, and any of
  "logits_ids": [ids] (logits of every position), "greedy": {"ids": [...], "n": k},
  "tokenize": [texts] (add_bos, special tokens parsed), "quantize": {"src", "dst", "type"},
  "mtmd": {"mmproj": path, "rgb": path of an HxWx3 uint8 .npy, "prompt": text with the media marker}}.
Everything it computes goes into OUT.npz; the test compares it with transformers / torch.
"""

import ctypes
import json
import sys

import numpy as np

import llama_cpp


def _llama(path):
    return llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, logits_all=True, n_threads=2, seed=0,
                           verbose=False)


def _mtmd(model_path, job, out):
    from llama_cpp import mtmd_cpp as m

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), llama_cpp.llama_model_default_params())
    params = m.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 2, False, False
    ctx = m.mtmd_init_from_file(job["mmproj"].encode(), model, params)
    if not ctx:
        raise SystemExit("mtmd_init_from_file failed")
    rgb = np.ascontiguousarray(np.load(job["rgb"]), dtype=np.uint8)
    h, w, _ = rgb.shape
    buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
    bitmap = m.mtmd_bitmap_init(w, h, buf)
    chunks = m.mtmd_input_chunks_init()
    prompt = job["prompt"].replace("<__media__>", m.mtmd_default_marker().decode()).encode()
    text = m.mtmd_input_text()
    text.text, text.text_len, text.add_special, text.parse_special = prompt, len(prompt), True, True
    bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
    rc = m.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1)
    if rc != 0:
        raise SystemExit(f"mtmd_tokenize returned {rc}")
    n_embd = llama_cpp.llama_model_n_embd(model)
    layout = []  # text ids, with -200 where the image's embeddings go
    for i in range(m.mtmd_input_chunks_size(chunks)):
        chunk = m.mtmd_input_chunks_get(chunks, i)
        if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            n = m.mtmd_input_chunk_get_n_tokens(chunk)
            if m.mtmd_encode_chunk(ctx, chunk) != 0:
                raise SystemExit("mtmd_encode_chunk failed")
            embd = m.mtmd_get_output_embd(ctx)
            out["image_embd"] = np.ctypeslib.as_array(embd, shape=(n * n_embd,)).reshape(n, n_embd).copy()
            layout.append(-200)
        else:
            n = ctypes.c_size_t()
            ids = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            layout += [ids[j] for j in range(n.value)]
    out["mtmd_ids"] = np.array(layout, dtype=np.int64)
    m.mtmd_input_chunks_free(chunks)
    m.mtmd_bitmap_free(bitmap)
    m.mtmd_free(ctx)
    llama_cpp.llama_model_free(model)


def main(job_path, out_path):
    job = json.loads(open(job_path).read())
    out = {}
    if "quantize" in job:
        q = job["quantize"]
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q['type']}")
        out["quantize_rc"] = np.array(llama_cpp.llama_model_quantize(q["src"].encode(), q["dst"].encode(), params))
    if any(k in job for k in ("logits_ids", "greedy", "tokenize")):
        llm = _llama(job["model"])
        if "logits_ids" in job:
            ids = job["logits_ids"]
            llm.reset()
            llm.eval(ids)
            out["logits"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
        if "greedy" in job:
            ids, new = list(job["greedy"]["ids"]), []
            llm.reset()
            llm.eval(ids)
            for _ in range(job["greedy"]["n"]):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                new.append(nxt)
                llm.eval([nxt])
            out["greedy"] = np.array(new, dtype=np.int64)
        if "tokenize" in job:
            for i, text in enumerate(job["tokenize"]):
                out[f"tok_{i}"] = np.array(llm.tokenize(text.encode(), add_bos=True, special=True), dtype=np.int64)
        out["n_vocab"] = np.array(llm.n_vocab())
        del llm
    if "mtmd" in job:
        _mtmd(job["model"], job["mtmd"], out)
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
