"""The config schema: both shipped configs validate; bad keys and types are named in the error."""

import copy
import dataclasses
import sys

import pytest
import yaml

from conftest import ROOT, run
from llavaflow.config import SCHEMA, ConfigError, stage_recipe, validate_config
from llavaflow.train.recipe import Recipe


def load(name):
    return yaml.safe_load((ROOT / "config" / name).read_text())


@pytest.mark.parametrize("name", ["config.yaml", "tiny.yaml"])
def test_shipped_configs_validate(name):
    validate_config(load(name), SCHEMA)


def test_real_config_is_the_reference_recipe():
    c = validate_config(load("config.yaml"), SCHEMA)
    assert c["model"]["llm"] == "microsoft/Phi-3-mini-4k-instruct"
    assert c["model"]["visual_encoder"] == "openai/clip-vit-large-patch14-336"
    assert c["model"]["max_length"] == int(4096 - (336 / 14) ** 2) == 3520
    pre, ft = c["pretrain"], c["finetune"]
    assert (pre["micro_batch_size"], pre["accumulative_counts"], pre["lr"], pre["epochs"]) == (16, 2, 1e-3, 1)
    assert (ft["micro_batch_size"], ft["accumulative_counts"], ft["lr"], ft["epochs"]) == (8, 2, 2e-5, 2)
    assert pre["train"] == ["projector"] and set(ft["train"]) == {"llm", "visual_encoder", "projector"}
    assert (pre["pad_image_to_square"], ft["pad_image_to_square"]) == (False, True)
    assert (pre["sampler"], ft["sampler"]) == ("shuffle", "length_grouped")
    assert pre["micro_batch_size"] * pre["accumulative_counts"] * pre["gpus_per_node"] == 256
    assert ft["micro_batch_size"] * ft["accumulative_counts"] * ft["gpus_per_node"] == 128
    assert len(c["data"]["finetune"]["datasets"]) == 9
    assert c["mmbench"]["datasets"] == ["MMBench_DEV_EN", "MMBench_TEST_EN", "MMBench_DEV_CN", "MMBench_TEST_CN", "CCBench"]


def test_defaults_are_filled_once_each():
    """Optional training keys take Recipe's defaults (the schema gives none); other optional keys the schema's,
    inside array items too."""
    c = load("tiny.yaml")
    c["finetune"].pop("num_workers")
    c["data"]["finetune"]["datasets"][0].pop("image_folder")
    c["mmbench"].pop("batch_size")
    validate_config(c, SCHEMA)
    assert "num_workers" not in c["finetune"] and stage_recipe(c, "finetune").num_workers == Recipe.num_workers == 4
    assert c["data"]["finetune"]["datasets"][0]["image_folder"] == "."
    assert c["mmbench"]["batch_size"] == 16


def test_the_schema_requires_every_recipe_value_that_changes_the_result():
    schema = yaml.safe_load(SCHEMA.read_text())
    stage = schema["$defs"]["stage"]
    assert not [k for k, v in stage["properties"].items() if "default" in v]  # Recipe is their one source
    from_model = {"stage", "llm", "visual_encoder", "datasets", "init_from", "prompt_template", "visual_select_layer",
                  "projector_depth", "max_length", "on_bad_sample"}
    semantic = {f.name for f in dataclasses.fields(Recipe)} - set(Recipe.VOLATILE) - from_model
    assert set(stage["required"]) == semantic | {"nodes", "gpus_per_node"}
    assert set(stage["properties"]) == semantic | set(Recipe.VOLATILE) | {"nodes", "gpus_per_node"}


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["pretrain"].update(lrr=1), "config key pretrain: unknown key(s) ['lrr']"),
    (lambda c: c["finetune"].update(lr="fast"), "config key finetune.lr: expected number, got 'fast'"),
    (lambda c: c["model"].update(max_length=1.5), "config key model.max_length: expected integer"),
    (lambda c: c["finetune"].update(train=["llm", "vit"]), "config key finetune.train.1"),
    (lambda c: c["pretrain"].update(nodes=0), "config key pretrain.nodes"),
    (lambda c: c.update(extra=1), "config key <top level>: unknown key(s) ['extra']"),
    (lambda c: c["mmbench"].update(datasets=["MMBench_DEV_XX"]), "config key mmbench.datasets.0"),
    (lambda c: c["model"].pop("llm"), "config key model.llm: missing"),
    (lambda c: c.pop("finetune"), "config key finetune: missing"),
    (lambda c: c["pretrain"].pop("eps"), "config key pretrain.eps: missing"),
    (lambda c: c["downloads"]["mmbench"].pop("CCBench"),
     "config key downloads.mmbench.CCBench: missing (mmbench.datasets lists CCBench; give its url and md5)"),
    (lambda c: c["pretrain"].update(accumulative_counts=16),  # save_steps 1000
     "config key pretrain.save_steps: 1000 is not a multiple of accumulative_counts (16): a checkpoint inside an "
     "accumulation cannot be resumed exactly"),
    (lambda c: c["finetune"].update(deepspeed_stage=3), "config key finetune.deepspeed_stage"),
    (lambda c: c["finetune"].update(deepspeed_stage=0, offload_optimizer="cpu"),
     "config key finetune.offload_optimizer: cpu needs deepspeed_stage 1 or 2"),
])
def test_bad_config_names_the_key(mutate, expected):
    c = copy.deepcopy(load("config.yaml"))
    mutate(c)
    with pytest.raises(ConfigError) as e:
        validate_config(c, SCHEMA)
    assert expected in str(e.value)


def test_stage_recipe_resolves_paths_and_chains_stages():
    c = validate_config(load("config.yaml"), SCHEMA)
    pre, ft = stage_recipe(c, "pretrain"), stage_recipe(c, "finetune")
    assert pre.init_from is None and ft.init_from == "results/pretrain/final.pth"
    assert ft.datasets[3] == {"annotation": "results/data/finetune/internvl_sft/dvqa_train_200k.jsonl",
                              "image_folder": "results/data/finetune/internvl_sft/data/dvqa"}
    # Volatile keys do not change the fingerprint; semantic keys and the world size do.
    assert pre.fingerprint(8) == dataclasses.replace(pre, num_workers=1, save_steps=7).fingerprint(8)
    assert pre.fingerprint(8) != dataclasses.replace(pre, lr=2e-3).fingerprint(8)
    assert pre.fingerprint(8) != pre.fingerprint(4)


def test_snakemake_stops_before_any_job_on_a_bad_key(tmp_path):
    bad = load("tiny.yaml")
    bad["finetune"]["lr"] = "fast"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(bad))
    proc = run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"),
                "--directory", str(tmp_path), "--configfile", str(cfg)], check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "config key finetune.lr: expected number, got 'fast'" in out
    assert "Job stats" not in out  # stopped while parsing, before any job was scheduled


@pytest.mark.parametrize("drop, key", [(lambda c: c["model"].pop("llm"), "model.llm"),
                                       (lambda c: c.pop("finetune"), "finetune")])
def test_a_preset_is_complete_on_its_own(tmp_path, drop, key):
    """A --configfile replaces config/config.yaml instead of overlaying it: a key the preset lacks is an
    error naming it, never the reference recipe's value. The working folder has config/config.yaml, as a
    checkout has, so an overlay would fill the key in."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text((ROOT / "config" / "config.yaml").read_text())
    preset = load("tiny.yaml")
    drop(preset)
    cfg = tmp_path / "preset.yaml"
    cfg.write_text(yaml.safe_dump(preset))
    proc = run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"),
                "--directory", str(tmp_path), "--configfile", str(cfg)], check=False)
    assert proc.returncode != 0
    assert f"config key {key}: missing" in proc.stdout + proc.stderr


def test_without_a_configfile_the_reference_recipe_is_used(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text((ROOT / "config" / "config.yaml").read_text())
    proc = run([sys.executable, "-m", "snakemake", "results/iter_hf", "--d3dag", "--snakefile", str(ROOT / "Snakefile"),
                "--directory", str(tmp_path)])
    assert '"rule": "download_data"' in proc.stdout  # the real preset downloads its inputs
