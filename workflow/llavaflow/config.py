"""The pipeline config: validation against config.schema.yaml (shipped with the package) and the per-stage
training recipes."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

from .train.recipe import Recipe, combination_errors

STAGE_INPUT = {"pretrain": None, "finetune": "pretrain"}  # which stage's checkpoint starts each stage
# Keys of a stage section that place the job (world size) rather than describe the recipe.
PLACEMENT_KEYS = ("nodes", "gpus_per_node")


SCHEMA = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    pass


def _path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _message(error: jsonschema.ValidationError) -> str:
    where = _path(error)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return f"config key {where!s}: unknown key(s) {extra}; allowed: {allowed}"
    if error.validator == "type":
        return f"config key {where}: expected {error.validator_value}, got {error.instance!r}"
    if error.validator == "required":
        prefix = f"{where}." if error.absolute_path else ""
        missing = [k for k in error.validator_value if k not in error.instance]
        return "\n".join(f"config key {prefix}{k}: missing (a config file is complete on its own; "
                         f"config/config.yaml lists every key)" for k in missing)
    return f"config key {where}: {error.message}"


def validate_config(config: dict, schema_path: str | Path = SCHEMA) -> dict:
    """Validate in place, then fill the schema's defaults; raise ConfigError naming every offending key.

    Our messages name the key in one line; snakemake.utils.validate then fills `default:` values (in
    array items and behind $refs too). Optional training keys are left out: Recipe holds their defaults.
    """
    schema = yaml.safe_load(Path(schema_path).read_text())
    if not isinstance(config, dict):
        raise ConfigError(f"the config must be a mapping, got {type(config).__name__}")
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [line for e in errors for line in _message(e).splitlines()]
        raise ConfigError("\n".join(dict.fromkeys(lines)))
    lines = [f"config key {stage}.{key}: {why}" for stage in STAGE_INPUT
             for key, why in combination_errors(config[stage]).items()]
    if config["preset"] != "tiny":  # the real preset downloads every benchmark it evaluates
        sources = (config.get("downloads") or {}).get("mmbench") or {}
        lines += [f"config key downloads.mmbench.{name}: missing (mmbench.datasets lists {name}; give its url and md5)"
                  for name in config["mmbench"]["datasets"] if name not in sources]
    if lines:
        raise ConfigError("\n".join(lines))
    from snakemake.utils import validate

    validate(config, str(Path(schema_path).resolve()), set_default=True)
    return config


def stage_recipe(config: dict, stage: str, checkpoint_of=lambda stage: f"results/{stage}/final.pth") -> Recipe:
    """The Recipe of a training stage: model + data + stage hyperparameters, paths resolved."""
    model, data = config["model"], config["data"]
    section = {k: v for k, v in config[stage].items() if k not in PLACEMENT_KEYS}
    root = Path(data[stage]["root"])
    datasets = [{"annotation": str(root / d["annotation"]), "image_folder": str(root / d["image_folder"])}
                for d in data[stage]["datasets"]]
    previous = STAGE_INPUT[stage]
    return Recipe.from_dict({
        "stage": stage, "llm": model["llm"], "visual_encoder": model["visual_encoder"], "datasets": datasets,
        "init_from": checkpoint_of(previous) if previous else None,
        "prompt_template": model["prompt_template"], "visual_select_layer": model["visual_select_layer"],
        "projector_depth": model["projector_depth"], "max_length": model["max_length"],
        "on_bad_sample": data["on_bad_sample"], **section,
    })


def load_config(path: str | Path, schema_path: str | Path = SCHEMA) -> dict:
    return validate_config(yaml.safe_load(Path(path).read_text()), schema_path)
