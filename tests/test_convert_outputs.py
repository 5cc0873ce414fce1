"""Converters never delete what they did not create, clean up only their own dead temporaries, and check
that projector, ViT and LLM fit together before writing anything (issue 14)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llavaflow.convert.exports import to_hf, to_llava
from llavaflow.atomic import OutputError, remove_stale_temporaries
from llavaflow.convert.io import ConversionError
from llavaflow.convert.phi3_llama import phi_to_llama
from llavaflow.convert.pth_to_hf import pth_to_hf

def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def ckpt(converted, tmp_path):
    """A work dir holding a checkpoint (as `llavaflow train` leaves it) and the base models."""
    wd = tmp_path / "wd"
    wd.mkdir()
    torch.save({"state_dict": converted["state"]}, wd / "iter_10.pth")
    return wd / "iter_10.pth"


def test_save_dir_holding_the_input_is_refused_even_with_overwrite(tiny, ckpt):
    before = ckpt.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=r"wd: the output is or contains the input .*iter_10.pth"):
            pth_to_hf(ckpt, ckpt.parent, str(tiny["llm"]), str(tiny["vit"]), overwrite=overwrite)
        with pytest.raises(OutputError, match="is or contains the input"):
            pth_to_hf(ckpt, ckpt, str(tiny["llm"]), str(tiny["vit"]), overwrite=overwrite)
    assert ckpt.read_bytes() == before and sorted(p.name for p in ckpt.parent.iterdir()) == ["iter_10.pth"]
    base = ckpt.parent.parent / "base"  # a local base model inside SAVE_DIR is an input as well
    shutil.copytree(tiny["llm"], base / "llm")
    with pytest.raises(OutputError, match=r"base: the output is or contains the input .*base/llm"):
        pth_to_hf(ckpt, base, str(base / "llm"), str(tiny["vit"]), overwrite=True)
    assert (base / "llm" / "config.json").exists()


def test_phi_to_llama_onto_its_input_is_refused(converted, tmp_path):
    x = tmp_path / "iter_xtuner"
    shutil.copytree(converted["out"] / "iter_xtuner", x)
    before = snapshot(x)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="is or contains the input"):
            phi_to_llama(x, x, overwrite=overwrite)
        with pytest.raises(OutputError, match="is or contains the input"):
            phi_to_llama(x, tmp_path, overwrite=overwrite)
    assert snapshot(x) == before  # projector/ and visual_encoder/ still there, byte for byte


def test_phi_to_llama_without_a_generation_config_still_stops_on_phi3s_tokens(converted, tmp_path):
    """A Phi-3 folder with no generation_config.json once gave an empty one, which names no eos: transformers
    then never stops generating. Phi-3's own stop tokens are written instead."""
    from transformers import AutoTokenizer, GenerationConfig

    x = tmp_path / "iter_xtuner"
    shutil.copytree(converted["out"] / "iter_xtuner", x)
    (x / "generation_config.json").unlink()
    phi_to_llama(x, tmp_path / "llama")
    tok = AutoTokenizer.from_pretrained(tmp_path / "llama")
    gen = GenerationConfig.from_pretrained(tmp_path / "llama")
    assert gen.eos_token_id == tok.convert_tokens_to_ids(["<|endoftext|>", "<|assistant|>", "<|end|>"])
    assert gen.bos_token_id == tok.bos_token_id == 1


def test_non_empty_save_dir_needs_overwrite(tiny, ckpt, tmp_path):
    out = tmp_path / "iter_xtuner"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(OutputError, match=r"iter_xtuner: exists and is not empty; pass --overwrite"):
        pth_to_hf(ckpt, out, str(tiny["llm"]), str(tiny["vit"]))
    assert (out / "notes.txt").read_text() == "the user's"
    (out / "notes.txt").unlink()  # an empty folder (a failed earlier mkdir) is simply filled
    pth_to_hf(ckpt, out, str(tiny["llm"]), str(tiny["vit"]), dtype="fp32")
    first = snapshot(out)
    with pytest.raises(OutputError, match="pass --overwrite"):
        phi_to_llama(out, ckpt.parent)  # wd/ holds the checkpoint
    pth_to_hf(ckpt, out, str(tiny["llm"]), str(tiny["vit"]), dtype="fp32", overwrite=True)
    assert snapshot(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_xtuner", "wd"]  # no temporaries, nothing moved aside


def test_cli_overwrite_flag(converted, tmp_path):
    out = tmp_path / "llama"
    out.mkdir()
    (out / "x").write_text("keep")
    cmd = [sys.executable, "-m", "llavaflow.cli", "convert", "phi_to_llama", "--phi_path",
           str(converted["out"] / "iter_xtuner"), "--save_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "pass --overwrite" in proc.stderr and (out / "x").read_text() == "keep"
    proc = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert snapshot(out) == snapshot(converted["out"] / "iter_xtuner_llama_llm")


def test_overwrite_replaces_a_file_with_the_folder_and_a_failed_publish_leaves_no_temporary(tmp_path):
    from llavaflow.atomic import OutputError, atomic_output

    out = tmp_path / "afile"
    out.write_text("data")
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
    assert out.is_dir() and (out / "model.safetensors").read_bytes() == b"x"
    with pytest.raises(OutputError):
        with atomic_output(tmp_path / "late") as tmp:
            (tmp / "a").write_text("a")
            (tmp_path / "late").write_text("appeared meanwhile")  # refused at the rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "late"]  # no .late.tmp-PID left


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_runs_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "iter_hf"
    dead, alive = _dead_pid(), os.getppid()
    keep = [tmp_path / f".iter_hf.tmp-{alive}", tmp_path / ".iter_hf.tmp-abc", tmp_path / f".iter_hf2.tmp-{dead}",
            tmp_path / f"iter_hf.tmp-{dead}", tmp_path / f".iter_hf.tmp-{dead}.x"]
    for p in keep + [tmp_path / f".iter_hf.tmp-{dead}"]:
        p.mkdir()
        (p / "shard").write_bytes(b"x")
    assert remove_stale_temporaries(out) == [tmp_path / f".iter_hf.tmp-{dead}"]
    assert all((p / "shard").exists() for p in keep)


def test_killed_conversion_leaves_a_temporary_that_the_next_run_removes(converted, tmp_path):
    """kill -9 in the middle of a real conversion, then the same conversion again: identical output, no junk."""
    out = tmp_path / "llama"
    # Fault injection: the child wraps our own ShardWriter._flush to signal and then sleep after its first
    # shard, so the kill lands mid-conversion (temporary folder half written) every time.
    script = (
        "import sys, time, pathlib\n"
        "import llavaflow.convert.io as io\n"
        "orig = io.ShardWriter._flush\n"
        "def slow(self):\n"
        "    orig(self)\n"
        "    pathlib.Path(sys.argv[3]).write_text('written one shard')\n"
        "    time.sleep(600)\n"
        "io.ShardWriter._flush = slow\n"
        "from llavaflow.convert.phi3_llama import phi_to_llama\n"
        "phi_to_llama(sys.argv[1], sys.argv[2])\n"
    )
    flag = tmp_path / "flag"
    child = subprocess.Popen([sys.executable, "-c", script, str(converted["out"] / "iter_xtuner"), str(out), str(flag)],
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not flag.exists() and time.time() < deadline and child.poll() is None:
            time.sleep(0.05)
        assert flag.exists(), "the conversion never reached its first shard"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    left = tmp_path / f".llama.tmp-{child.pid}"
    assert left.is_dir() and any(left.iterdir()) and not out.exists()
    phi_to_llama(converted["out"] / "iter_xtuner", out)
    assert not left.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["flag", "llama"]
    assert snapshot(out) == snapshot(converted["out"] / "iter_xtuner_llama_llm")


def test_parts_that_do_not_fit_are_refused_before_writing(tiny, converted, tmp_path):
    state = dict(converted["state"])
    vit_hidden = state["projector.model.0.weight"].shape[1]
    wide = dict(state, **{"projector.model.0.weight": torch.zeros(state["projector.model.0.weight"].shape[0], vit_hidden + 8)})
    torch.save({"state_dict": wide}, tmp_path / "a.pth")
    with pytest.raises(ConversionError, match=rf"a.pth: projector takes {vit_hidden + 8} features, the visual encoder gives {vit_hidden}"):
        pth_to_hf(tmp_path / "a.pth", tmp_path / "out", str(tiny["llm"]), str(tiny["vit"]))
    # a pretrain checkpoint (projector only) for another LLM width: caught against the base LLM's config
    proj = {k: v for k, v in state.items() if k.startswith("projector.")}
    llm_hidden = proj["projector.model.0.weight"].shape[0]
    narrow = {"projector.model.0.weight": torch.zeros(32, vit_hidden), "projector.model.0.bias": torch.zeros(32),
              "projector.model.2.weight": torch.zeros(32, 32), "projector.model.2.bias": torch.zeros(32)}
    torch.save({"state_dict": narrow}, tmp_path / "b.pth")
    with pytest.raises(ConversionError, match=rf"projector gives 32 features, the LLM's hidden size is {llm_hidden}"):
        pth_to_hf(tmp_path / "b.pth", tmp_path / "out", str(tiny["llm"]), str(tiny["vit"]))
    good = converted["out"] / "iter_9.pth"
    with pytest.raises(ConversionError, match="outside the visual encoder's 3 hidden states"):
        pth_to_hf(good, tmp_path / "out", str(tiny["llm"]), str(tiny["vit"]), visual_select_layer=-4)
    with pytest.raises(ConversionError, match="projector has 2 Linear layers, the recipe says projector_depth 3"):
        pth_to_hf(good, tmp_path / "out", str(tiny["llm"]), str(tiny["vit"]), projector_depth=3)
    # exports: a projector folder next to an LLM of another width
    args = (converted["out"] / "iter_xtuner_llama_llm", converted["out"] / "iter_xtuner" / "visual_encoder")
    bad = tmp_path / "bad_projector"
    bad.mkdir()
    cfg = json.loads((converted["out"] / "iter_xtuner" / "projector" / "config.json").read_text())
    cfg["llm_hidden_size"] = 32
    (bad / "config.json").write_text(json.dumps(cfg))
    save_file({k.removeprefix("projector."): v.contiguous() for k, v in narrow.items()}, bad / "model.safetensors")
    for export in (to_hf, to_llava):
        kw = {"mm_vision_tower": str(tiny["vit"])} if export is to_llava else {}
        with pytest.raises(ConversionError, match=rf"projector gives 32 features, the LLM's hidden size is {llm_hidden}"):
            export(*args, bad / "model.safetensors", tmp_path / "iter_llava", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "b.pth", "bad_projector"]


def test_cli_takes_dtype_and_shape_facts_from_the_config(tiny, converted, tmp_path):
    """`llavaflow convert pth_to_hf CONFIG ...`: convert.dtype and model.visual_select_layer come from CONFIG
    (a flag overrides explicitly); config.json keeps _name_or_path for xtuner's convert_phi_to_llama.py."""
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "tiny.yaml").read_text())
    cfg["model"].update(llm=str(tiny["llm"]), visual_encoder=str(tiny["vit"]), visual_select_layer=-1)
    cfg["convert"]["dtype"] = "fp16"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    base = [sys.executable, "-m", "llavaflow.cli", "convert", "pth_to_hf", str(tmp_path / "c.yaml"),
            str(converted["out"] / "iter_9.pth")]
    for out, extra, dtype, layer in (("a", [], "F16", -1), ("b", ["--dtype", "bf16", "--visual-select-layer", "-3"], "BF16", -3)):
        proc = subprocess.run(base + [str(tmp_path / out), *extra], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        index = json.loads((tmp_path / out / "model.safetensors").read_bytes()[8:][: int.from_bytes(
            (tmp_path / out / "model.safetensors").read_bytes()[:8], "little")])
        assert {v["dtype"] for k, v in index.items() if k != "__metadata__"} == {dtype}
        assert json.loads((tmp_path / out / "projector" / "config.json").read_text())["visual_select_layer"] == layer
        assert json.loads((tmp_path / out / "config.json").read_text())["_name_or_path"] == str(tiny["llm"])


@pytest.mark.parametrize("where", ["top level (4.x)", "rope_parameters (5.x)"])
def test_a_partial_rotary_phi3_is_refused_wherever_its_config_keeps_the_factor(where):
    """Llama rotates every dimension of a head: a Phi-3 that rotates part of them has no Llama equivalent. A
    5.x config keeps the factor inside rope_parameters, where the check once did not look."""
    from llavaflow.convert.io import ConversionError
    from llavaflow.convert.phi3_llama import check_phi3

    cfg = {"model_type": "phi3", "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    if where.startswith("top"):
        cfg["partial_rotary_factor"] = 0.75
    else:
        cfg["rope_parameters"]["partial_rotary_factor"] = 0.75
    with pytest.raises(ConversionError, match="partial rotary factor 0.75 has no Llama equivalent"):
        check_phi3(cfg, "config.json")
    check_phi3({**cfg, "partial_rotary_factor": 1.0, "rope_parameters": {"rope_type": "default"}}, "config.json")


def test_a_full_clip_folder_as_the_vision_model_gives_the_same_export(converted, tmp_path):
    """xtuner's converter takes the full CLIP download (text tower, projections, logit_scale) as the vision
    model; those tensors are left out by name. They once crashed the writer (0-dim logit_scale) after being
    renamed into the vision tower."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    from llavaflow.convert.exports import to_hf

    vit_folder = converted["out"] / "iter_xtuner" / "visual_encoder"
    vit = CLIPVisionModel.from_pretrained(vit_folder)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "max_position_embeddings": 16}
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=vit.config.to_dict(), projection_dim=16))
    full.vision_model.load_state_dict(vit.state_dict())
    full.save_pretrained(tmp_path / "clip")
    shutil.copy(vit_folder / "preprocessor_config.json", tmp_path / "clip")
    to_hf(converted["out"] / "iter_xtuner_llama_llm", tmp_path / "clip",
          converted["out"] / "iter_xtuner" / "projector" / "model.safetensors", tmp_path / "hf", dtype="fp32")
    ours, reference = load_file(tmp_path / "hf" / "model.safetensors"), load_file(converted["out"] / "iter_hf" / "model.safetensors")
    assert sorted(ours) == sorted(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
