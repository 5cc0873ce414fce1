"""The pipeline config: validation against config/schema.yaml and the per-stage training recipes."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

from .train.recipe import Recipe

STAGE_INPUT = {"pretrain": None, "finetune": "pretrain"}  # which stage's checkpoint starts each stage
# Keys of a stage section that place the job (world size) rather than describe the recipe.
PLACEMENT_KEYS = ("nodes", "gpus_per_node")


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
        return f"config key {where}: {error.message}"
    return f"config key {where}: {error.message}"


def _resolve(root: dict, schema: dict) -> dict:
    ref = schema.get("$ref", "")
    if ref.startswith("#/$defs/"):
        return {**root["$defs"][ref.removeprefix("#/$defs/")], **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _fill_defaults(root: dict, schema: dict, instance: dict) -> None:
    """Set `default:` values of absent keys, inside objects that exist (as snakemake's validate does)."""
    for key, sub in _resolve(root, schema).get("properties", {}).items():
        sub = _resolve(root, sub)
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(root, sub, instance[key])


def validate_config(config: dict, schema_path: str | Path) -> dict:
    """Validate in place (filling defaults); raise ConfigError naming the first offending key."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    if not isinstance(config, dict):
        raise ConfigError(f"the config must be a mapping, got {type(config).__name__}")
    _fill_defaults(schema, schema, config)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("\n".join(_message(e) for e in errors))
    return config


def stage_recipe(config: dict, stage: str, checkpoint_of=lambda stage: f"results/{stage}/final.pth") -> Recipe:
    """The Recipe of a training stage: model + data + stage hyperparameters, paths resolved."""
    model, data = config["model"], config["data"]
    section = {k: v for k, v in config[stage].items() if k not in PLACEMENT_KEYS}
    root = Path(data[stage]["root"])
    datasets = [{"annotation": str(root / d["annotation"]), "image_folder": str(root / d.get("image_folder", "."))}
                for d in data[stage]["datasets"]]
    previous = STAGE_INPUT[stage]
    return Recipe.from_dict({
        "stage": stage, "llm": model["llm"], "visual_encoder": model["visual_encoder"], "datasets": datasets,
        "init_from": checkpoint_of(previous) if previous else None,
        "prompt_template": model["prompt_template"], "visual_select_layer": model["visual_select_layer"],
        "projector_depth": model["projector_depth"], "max_length": model["max_length"],
        "on_bad_sample": data["on_bad_sample"], **section,
    })


def load_config(path: str | Path, schema_path: str | Path) -> dict:
    return validate_config(yaml.safe_load(Path(path).read_text()), schema_path)
