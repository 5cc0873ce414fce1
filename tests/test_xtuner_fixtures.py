"""Against real xtuner 0.2.0 outputs (../shared/fixtures/xtuner-0.2.0, see its README): xtuner's own
checkpoints through our converters give xtuner's folders tensor for tensor, and our chat and MMBench on
xtuner's folder give xtuner's text. Where the README says xtuner is wrong, the difference is tested."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llavaflow.convert.exports import to_hf
from llavaflow.convert.io import iter_tensors
from llavaflow.convert.phi3_llama import phi_to_llama
from llavaflow.convert.pth_to_hf import pth_to_hf
from llavaflow.model.checkpoint_reader import MODEL_STATES, CheckpointError, load_state_dict

from consumer_venv import CACHE

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "xtuner-0.2.0"
pytestmark = pytest.mark.skipif(not FIX.is_dir(), reason=f"xtuner fixtures not present at {FIX}")
LLM, VIT = FIX / "models" / "tiny-phi3", FIX / "models" / "tiny-clip-vit"
PROMPT = "Describe the image briefly."


def tensors(folder: Path) -> dict:
    return dict(iter_tensors(folder))


def assert_same_tensors(ours: dict, theirs: dict, cast: bool = False) -> None:
    assert ours.keys() == theirs.keys()
    for k, t in theirs.items():
        got = ours[k].to(t.dtype) if cast else ours[k]
        assert got.dtype == t.dtype and torch.equal(got, t), k


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our converters on xtuner's checkpoint and on xtuner's own folder."""
    out = tmp_path_factory.mktemp("xtuner_fixtures")
    pth_to_hf(FIX / "checkpoints" / "finetune" / "iter_4.pth", out / "iter_4_xtuner", str(LLM), str(VIT), dtype="fp16")
    pth_to_hf(FIX / "checkpoints" / "pretrain" / "iter_4.pth", out / "pretrain_iter_4_xtuner", str(LLM), str(VIT))
    phi_to_llama(FIX / "converted" / "iter_4_xtuner", out / "iter_4_xtuner_llama_llm")
    x = FIX / "converted" / "iter_4_xtuner"
    to_hf(out / "iter_4_xtuner_llama_llm", x / "visual_encoder", x / "projector" / "model.safetensors",
          out / "iter_4_hf", dtype="fp32")
    return out


def test_xtuner_checkpoints_read_without_foreign_code():
    state = load_state_dict(FIX / "checkpoints" / "finetune" / "iter_4.pth")
    assert {k.split(".")[0] for k in state} == {"llm", "visual_encoder", "projector"}
    assert all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in state.values())
    assert sorted(load_state_dict(FIX / "checkpoints" / "pretrain" / "iter_4.pth")) == [
        "projector.model.0.bias", "projector.model.0.weight", "projector.model.2.bias", "projector.model.2.weight"]
    # what made the plain weights_only load fail: the mmengine objects are still there, and still refused
    with pytest.raises(Exception, match="HistoryBuffer"):
        torch.load(FIX / "checkpoints" / "finetune" / "iter_4.pth", weights_only=True)


def test_pth_to_hf_equals_xtuners_folder(ours):
    x = FIX / "converted" / "iter_4_xtuner"
    assert_same_tensors(tensors(ours / "iter_4_xtuner"), tensors(x))  # fp16 LLM, 2 shards vs 1: same tensors
    assert_same_tensors(tensors(ours / "iter_4_xtuner" / "visual_encoder"), tensors(x / "visual_encoder"))
    assert_same_tensors(load_file(ours / "iter_4_xtuner" / "projector" / "model.safetensors"),
                        load_file(x / "projector" / "model.safetensors"))
    mine = json.loads((ours / "iter_4_xtuner" / "projector" / "config.json").read_text())
    theirs = json.loads((x / "projector" / "config.json").read_text())
    for key in ("architectures", "auto_map", "bias", "depth", "hidden_act", "llm_hidden_size", "model_type",
                "visual_hidden_size"):
        assert mine[key] == theirs[key], key  # xtuner's keys kept, so xtuner's code reads our projector/
    assert (mine["visual_select_layer"], mine["visual_select_feature"]) == (-2, "patch")  # and the facts xtuner leaves out
    cfg = json.loads((ours / "iter_4_xtuner" / "config.json").read_text())
    assert cfg["_name_or_path"] == str(LLM)  # xtuner's convert_phi_to_llama.py pops it (KeyError without)


def test_pretrain_checkpoint_equals_xtuners(ours):
    x = FIX / "converted" / "pretrain_iter_4_xtuner"
    assert sorted(p.name for p in (ours / "pretrain_iter_4_xtuner").iterdir()) == ["projector"]
    assert_same_tensors(load_file(ours / "pretrain_iter_4_xtuner" / "projector" / "model.safetensors"),
                        load_file(x / "projector" / "model.safetensors"))


def test_phi_to_llama_equals_xtuners(ours):
    assert_same_tensors(tensors(ours / "iter_4_xtuner_llama_llm"), tensors(FIX / "converted" / "iter_4_xtuner_llama_llm"))


def test_to_hf_weights_equal_xtuners_and_its_defects_are_not_copied(ours):
    theirs = FIX / "converted" / "iter_4_hf"
    assert_same_tensors(tensors(ours / "iter_4_hf"), tensors(theirs), cast=True)  # xtuner: LLM+ViT fp16, projector fp32
    mine, xt = (json.loads((f / "config.json").read_text()) for f in (ours / "iter_4_hf", theirs))
    assert (mine["vision_feature_layer"], mine["projector_hidden_act"]) == (xt["vision_feature_layer"], xt["projector_hidden_act"])
    # xtuner writes image_seq_length 576 for a ViT that gives (56/14)^2 = 16 patches
    assert xt["image_seq_length"] == 576 and mine["image_seq_length"] == 16
    proc = json.loads((ours / "iter_4_hf" / "processor_config.json").read_text())
    assert json.loads((theirs / "processor_config.json").read_text())["patch_size"] is None and proc["patch_size"] == 14
    # xtuner's image processor centre-crops (training padded to a square); ours pads
    xt_pre, pre = (json.loads((f / "preprocessor_config.json").read_text()) for f in (theirs, ours / "iter_4_hf"))
    assert xt_pre["image_processor_type"] == "CLIPImageProcessor" and "do_pad" not in xt_pre
    assert (pre["image_processor_type"], pre["do_pad"]) == ("LlavaImageProcessor", True)
    # xtuner's generation config never stops on <|end|> (eos 500 = <|endoftext|> only); ours does
    end = json.loads((LLM / "tokenizer.json").read_text())["added_tokens"]
    end_id = next(t["id"] for t in end if t["content"] == "<|end|>")
    assert json.loads((theirs / "generation_config.json").read_text())["eos_token_id"] == 500
    assert end_id in json.loads((ours / "iter_4_hf" / "generation_config.json").read_text())["eos_token_id"]


def _cli(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # everything is local; a hub lookup would be a bug
    proc = subprocess.run([sys.executable, "-m", "llavaflow.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_chat_on_xtuners_folder_gives_xtuners_text(dtype):
    log = (FIX / "chat" / f"xtuner_chat_{dtype}.log").read_text().splitlines()
    expected = next(line for line in log if line.startswith("ou "))  # the answer line (README)
    out = _cli("chat", FIX / "converted" / "iter_4_xtuner", "--image", FIX / "data" / "x.png", "--prompt", PROMPT,
               "--max-new-tokens", 16, "--temperature", 0, "--no-streamer", "--torch-dtype", dtype)
    assert out.strip() == expected


def test_mmbench_cli_on_xtuners_folder_gives_xtuners_predictions(tmp_path):
    import pandas as pd

    _cli("mmbench", FIX / "converted" / "iter_4_xtuner", "--data-path", FIX / "data" / "mmbench" / "tiny_mmbench_dev.tsv",
         "--work-dir", tmp_path, "--max-new-tokens", 8, "--torch-dtype", "fp16")  # xtuner_8tok_args.json
    theirs = pd.read_excel(FIX / "mmbench" / "xtuner_8tok_result.xlsx").set_index("index")["prediction"]
    mine = pd.read_excel(tmp_path / "predictions.xlsx").set_index("index")["prediction"]
    assert mine.sort_index().to_dict() == theirs.sort_index().to_dict()
    assert json.loads((tmp_path / "mmbench_result.json").read_text()) == \
        json.loads((FIX / "mmbench" / "xtuner_8tok_result.json").read_text())


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_mmbench_predictions_at_32_tokens_equal_xtuners(dtype):
    """At 32 tokens the rows differ from each other and hold \\x07 (xtuner's README): raw predictions compared."""
    from llavaflow.eval.mmbench import build_prompts
    from llavaflow.eval.mmbench_data import read_benchmark
    from llavaflow.eval.predict import Predictor
    from llavaflow.model.loading import load_xtuner_for_inference
    from llavaflow.template import get_template

    model, tok, transform = load_xtuner_for_inference(FIX / "converted" / "iter_4_xtuner",
                                                      {"fp32": torch.float32, "fp16": torch.float16}[dtype])
    prompts = build_prompts(read_benchmark(FIX / "data" / "mmbench" / "tiny_mmbench_dev.tsv"))
    got = Predictor(model, tok, transform, get_template("phi3_chat"), 32).predict_batch(prompts, fast=False)
    theirs = json.loads((FIX / "mmbench" / f"xtuner_32tok_{dtype}_predictions.json").read_text())
    assert {r["index"]: r["prediction"] for r in theirs} == got
    assert any("\x07" in p for p in got.values()) and len(set(got.values())) > 1


# --- foreign objects next to the weights (DeepSpeed client state, mmengine message hub) -----------------------

RAN: list[str] = []


def _foreign_code(tag):
    RAN.append(tag)  # would prove that unpickling ran code of the checkpoint's classes
    return tag


class HistoryBuffer:
    """Pickles as a call of _foreign_code: loading it must not run it."""

    def __reduce__(self):
        return _foreign_code, ("history",)


def test_deepspeed_dir_with_foreign_client_state(tmp_path):
    import numpy as np

    state = load_state_dict(FIX / "checkpoints" / "finetune" / "iter_4.pth")
    tag = tmp_path / "iter_4.pth"
    tag.mkdir()
    torch.save({"module": state, "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}},
                "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": np.float64(1e-3)}]},
                "param_schedulers": [HistoryBuffer()], "ds_version": "0.16"}, tag / MODEL_STATES)
    RAN.clear()
    back = load_state_dict(tag)
    assert not RAN
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    out = tmp_path / "out"
    pth_to_hf(tag, out, str(LLM), str(VIT), dtype="fp16")
    assert not RAN
    assert_same_tensors(tensors(out), tensors(FIX / "converted" / "iter_4_xtuner"))


def test_weights_that_need_foreign_code_are_refused(tmp_path):
    state = dict(load_state_dict(FIX / "checkpoints" / "pretrain" / "iter_4.pth"))
    state["projector.model.0.weight"] = HistoryBuffer()
    torch.save({"state_dict": state}, tmp_path / "iter_1.pth")
    RAN.clear()
    with pytest.raises(CheckpointError, match=r"iter_1.pth: weight 'projector.model.0.weight' needs class "
                                              r"\S*_foreign_code to be built"):
        load_state_dict(tmp_path / "iter_1.pth")
    assert not RAN


# --- xtuner's own converter script on our folder -------------------------------------------------------------

XTUNER_SCRIPT_REQS = ["xtuner==0.2.0", "mmengine==0.10.7", "addict==2.4.0", "yapf==0.43.0", "termcolor==3.3.0"]
PHI_TO_LLAMA = "xtuner/configs/llava/phi3_mini_4k_instruct_clip_vit_large_p14_336/convert_phi_to_llama.py"


def xtuner_script_env() -> Path:
    """xtuner 0.2.0's convert_phi_to_llama.py and the mmengine it imports (no-deps, next to this venv's torch
    and transformers), fetched once from PyPI and cached under ~/.cache/llavaflow/xtuner-scripts-<hash> (consumer_venv.CACHE)."""
    import hashlib
    import shutil
    import zipfile

    key = hashlib.sha256(" ".join(XTUNER_SCRIPT_REQS).encode()).hexdigest()[:12]
    home = CACHE / f"xtuner-scripts-{key}"
    if (home / "done").exists():
        return home
    tmp = home.with_name(f"{home.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["download", "--no-deps", "-d", str(tmp / "wheel"), XTUNER_SCRIPT_REQS[0]], check=True, timeout=600)
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp / "site"), *XTUNER_SCRIPT_REQS[1:]], check=True,
                   timeout=600)
    with zipfile.ZipFile(next((tmp / "wheel").glob("xtuner-*.whl"))) as whl:
        (tmp / "convert_phi_to_llama.py").write_bytes(whl.read(PHI_TO_LLAMA))
    (tmp / "done").touch()
    if not home.exists():
        os.replace(tmp, home)
    shutil.rmtree(tmp, ignore_errors=True)
    return home


def test_xtuners_convert_phi_to_llama_runs_on_our_folder(tmp_path):
    """issue 13.6: xtuner's script pops _name_or_path (KeyError without it) and needs an index JSON."""
    env_dir = xtuner_script_env()
    ours = tmp_path / "iter_4_xtuner"
    pth_to_hf(FIX / "checkpoints" / "finetune" / "iter_4.pth", ours, str(LLM), str(VIT), dtype="fp16",
              max_shard_size=160_000)  # sharded, as xtuner's --max-shard-size 160KB run
    proc = subprocess.run([sys.executable, str(env_dir / "convert_phi_to_llama.py"), "--phi_path", str(ours),
                           "--save_path", str(tmp_path / "xtuner_llama")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(env_dir / "site"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    phi_to_llama(ours, tmp_path / "our_llama")
    # xtuner splits qkv in equal thirds: equal to ours here because this model has no GQA (README of the fixtures)
    assert_same_tensors(tensors(tmp_path / "xtuner_llama"), tensors(tmp_path / "our_llama"))
