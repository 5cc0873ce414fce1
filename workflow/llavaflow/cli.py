"""The `llavaflow` command. Each subcommand parses its arguments and makes one library call."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


class ArgumentError(ValueError):
    """A command-line value that cannot be used, named by its flag or file."""


def _json_arg(flag: str, text: str, kind: type):
    """A JSON command-line value of the given kind, or an error naming the flag."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArgumentError(f"{flag}: not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise ArgumentError(f"{flag}: expected a JSON {'list' if kind is list else 'object'}, got {type(value).__name__}")
    return value


def _load_recipe(value: str, overrides: str | None = None):
    import yaml

    from .train.recipe import Recipe

    if value.lstrip().startswith("{"):
        data, where = _json_arg("--recipe", value, dict), "--recipe"
    else:
        path = where = Path(value)
        try:
            # YAML 1.1 reads 1e-8 as a string, so JSON files go through the JSON parser.
            data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise ArgumentError(f"{path}: not a readable recipe ({explain(e)})") from None
        if not isinstance(data, dict):
            raise ArgumentError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    try:
        recipe = Recipe.from_dict(data)  # the file alone first: its errors are the file's
    except ValueError as e:
        raise ArgumentError(f"{where}: {e}") from None
    if not overrides:
        return recipe
    extra = _json_arg("--set", overrides, dict)
    try:
        return Recipe.from_dict({**data, **extra})
    except ValueError as e:
        raise ArgumentError(f"--set: {e}") from None


def cmd_train(args) -> None:
    from .train.loop import train

    train(_load_recipe(args.recipe, args.set), work_dir=args.work_dir, output=args.output, overwrite=args.overwrite)


def cmd_build_tiny(args) -> None:
    from .tiny import build_tiny_assets

    build_tiny_assets(Path(args.out), Path(args.mmbench_dir), args.datasets, seed=args.seed, overwrite=args.overwrite)


def _folder(text: str) -> str:
    """A local model folder that must exist."""
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _model_ref(text: str) -> str:
    """A local folder or a hub repo id ('org/name'): a path-like value must exist, so that a missing
    folder is not reported by the hub client as a malformed repo id."""
    path = Path(text).expanduser()
    if (text.startswith(("/", ".", "~")) or text.count("/") > 1) and not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such folder (a hub repo id looks like 'org/name')")
    return text


def _existing_path(text: str) -> str:
    """A file or folder that must exist (a DeepSpeed checkpoint iter_N.pth is a folder)."""
    if not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return text


def _existing_file(text: str) -> str:
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a folder, not a file")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB)")


def cmd_pth_to_hf(args) -> None:
    from .config import load_config
    from .convert.pth_to_hf import pth_to_hf

    config = load_config(args.config) if args.config else {}
    model = config.get("model", {})
    llm, vit = args.llm or model.get("llm"), args.visual_encoder or model.get("visual_encoder")
    if not llm or not vit:
        raise SystemExit("pth_to_hf: give CONFIG or both --llm and --visual-encoder (the base models trained from)")
    # An explicit flag wins, then the config's value; without either, the library's default applies.
    dtype = "fp32" if args.fp32 else args.dtype or config.get("convert", {}).get("dtype", "bf16")
    layer = args.visual_select_layer if args.visual_select_layer is not None else model.get("visual_select_layer")
    recipe = json.loads(args.recipe) if args.recipe else None
    pth_to_hf(args.pth_model, args.save_dir, llm, vit, dtype, args.max_shard_size, recipe,
              visual_select_layer=layer, projector_depth=model.get("projector_depth"), overwrite=args.overwrite)


def cmd_phi_to_llama(args) -> None:
    from .convert.phi3_llama import phi_to_llama

    phi_to_llama(args.phi_path, args.save_path, args.max_shard_size, overwrite=args.overwrite)


def cmd_export(args) -> None:
    from .convert.exports import to_hf, to_llava

    common = (args.text_model_id, args.vision_model_id, args.projector_weight, args.save_path)
    kw = {"visual_select_layer": args.visual_select_layer, "overwrite": args.overwrite}
    if args.format == "to_hf":
        to_hf(*common, dtype=args.dtype, max_shard_size=args.max_shard_size, **kw)
    else:
        tower = args.mm_vision_tower or str(Path(args.vision_model_id).resolve())
        to_llava(*common, mm_vision_tower=tower, dtype=args.dtype, max_shard_size=args.max_shard_size, **kw)


def cmd_to_gguf(args) -> None:
    from .convert.gguf import to_gguf

    to_gguf(args.xtuner_folder, args.save_path, dtype=args.dtype, quantize=args.quantize,
            template_name=args.prompt_template, overwrite=args.overwrite)


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="checkpoint and format conversions (xtuner's argument names)")
    conv = c.add_subparsers(dest="conversion", required=True)
    p = conv.add_parser("pth_to_hf", help="iter_N.pth (file or DeepSpeed dir) -> xtuner-style HF folder")
    p.add_argument("config", nargs="?", help="llavaflow config YAML naming the base LLM and visual encoder")
    p.add_argument("pth_model", type=_existing_path)
    p.add_argument("save_dir")
    p.add_argument("--llm", type=_model_ref, help="base LLM (hub id or folder); overrides CONFIG")
    p.add_argument("--visual-encoder", type=_model_ref, help="base CLIP vision model; overrides CONFIG")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="LLM dtype (ViT and projector stay fp32); default: CONFIG's convert.dtype, else bf16")
    p.add_argument("--fp32", action="store_true", help="same as --dtype fp32 (xtuner's flag)")
    p.add_argument("--visual-select-layer", type=int,
                   help="ViT layer the projector was trained on, recorded in projector/config.json "
                        "(default: CONFIG's model.visual_select_layer, else xtuner's -2)")
    p.add_argument("--max-shard-size", type=_size, default="2GB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty SAVE_DIR")
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_pth_to_hf)
    p = conv.add_parser("phi_to_llama", help="Phi-3 LLM folder -> Llama (exact below the 2047-token window)")
    p.add_argument("--phi_path", required=True, type=_folder)
    p.add_argument("--save_path", required=True)
    p.add_argument("--max-shard-size", type=_size, default="2GB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty save_path")
    p.set_defaults(func=cmd_phi_to_llama)
    for fmt, what in (("to_llava", "official LLaVA format"), ("to_hf", "HF LlavaForConditionalGeneration format")):
        p = conv.add_parser(fmt, help=f"xtuner folder (Llama LLM) -> {what}")
        p.add_argument("--text_model_id", required=True, type=_folder, help="the Llama LLM folder (phi_to_llama output)")
        p.add_argument("--vision_model_id", required=True, type=_folder, help="the visual_encoder/ folder")
        p.add_argument("--projector_weight", required=True, type=_existing_file, help="projector/model.safetensors")
        p.add_argument("--save_path", required=True)
        p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
        p.add_argument("--max-shard-size", type=_size, default="2GB" if fmt == "to_llava" else "5GB")
        p.add_argument("--visual_select_layer", type=int,
                       help="override the select layer recorded in the projector's config.json")
        p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty save_path")
        if fmt == "to_llava":
            p.add_argument("--mm_vision_tower", help="hub id or folder LLaVA builds the tower from (default: vision_model_id)")
        p.set_defaults(func=cmd_export, format=fmt)
    p = conv.add_parser("to_gguf", help="xtuner folder (Phi-3 LLM) -> GGUF LLM + mmproj (+ quantized, Modelfile) for llama.cpp/Ollama")
    p.add_argument("xtuner_folder", type=_folder, help="results/iter_xtuner: LLM, visual_encoder/, projector/")
    p.add_argument("save_path")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], default="f16", help="LLM tensor type (mmproj: f32 if f32, else f16)")
    p.add_argument("--quantize", nargs="*", default=[], help="llama.cpp quantized variants, e.g. Q4_K_M Q8_0 (needs llama-cpp-python or llama-quantize)")
    p.add_argument("--prompt-template", default="phi3_chat")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty save_path")
    p.set_defaults(func=cmd_to_gguf)


def cmd_mmbench(args) -> None:
    from .distributed import init_distributed
    from .eval.mmbench import evaluate
    from .identity import path_fingerprint
    from .model.loading import inference_dtype, load_xtuner_for_inference

    folder = args.llava or args.model_name_or_path
    layer = args.visual_select_layer  # None: the layer the folder's projector/config.json records
    _, _, device = init_distributed()
    device = str(device)
    model, tokenizer, transform = load_xtuner_for_inference(folder, inference_dtype(args.torch_dtype, device),
                                                            args.visual_encoder, layer, device)
    # An overridden layer or visual encoder is another model: its predictions must not be reused from the cache.
    model_id = path_fingerprint(folder) + ("" if layer is None else f":select_layer={layer}")
    if args.visual_encoder:
        model_id += f":visual_encoder={path_fingerprint(args.visual_encoder)}"
    evaluate(model, tokenizer, transform, args.data_path, args.work_dir, args.dataset, args.prompt_template,
             args.policy, args.batch_size, args.max_new_tokens, fast=not args.no_fast_path, model_id=model_id,
             verbose_quirk=args.verbose_quirk, overwrite=args.overwrite)


def cmd_chat(args) -> int:
    import torch

    from .chat import Session, fetch_image, generation_kwargs, interactive, load_backend
    from .data.images import ImageError
    from .model.loading import inference_dtype
    from .template import get_template

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = load_backend(args.llava or args.model_name_or_path, inference_dtype(args.torch_dtype, device), device,
                           args.visual_encoder, args.visual_select_layer)
    template = get_template(args.prompt_template)
    if args.stop_words:
        from dataclasses import replace

        template = replace(template, stop_words=template.stop_words + tuple(args.stop_words))
    session = Session(backend, template, args.system or "",
                      generation_kwargs(args.temperature, args.top_p, args.top_k, args.max_new_tokens,
                                        args.repetition_penalty))
    if args.image:
        try:
            session.set_image(fetch_image(args.image))
        except ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            if args.prompt is not None:
                return 2
    if args.prompt is not None:
        print(session.ask(args.prompt))
        return 0
    interactive(session, stream=not args.no_streamer)
    return 0


def _add_chat(sub) -> None:
    c = sub.add_parser("chat", help="chat about an image with a trained model (xtuner chat's arguments)")
    c.add_argument("model_name_or_path", type=_folder,
                   help="results/iter_xtuner (xtuner-style) or results/iter_hf (HF export)")
    c.add_argument("--llava", type=_folder, help="the LLaVA folder, if not the positional one")
    c.add_argument("--visual-encoder", type=_model_ref, help="only for xtuner folders without visual_encoder/")
    c.add_argument("--visual-select-layer", type=int,
                   help="override the ViT layer recorded in projector/config.json (xtuner folders without it: -2)")
    c.add_argument("--prompt-template", default="phi3_chat")
    c.add_argument("--image", help="a path or an http(s) URL")
    c.add_argument("--system", help="system prompt (none by default, as in training)")
    c.add_argument("--prompt", help="one-shot: answer this, print the answer and exit")
    c.add_argument("--temperature", type=float, default=0.1, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=0.75)
    c.add_argument("--top-k", type=int, default=40)
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--max-new-tokens", type=int, default=2048)
    c.add_argument("--stop-words", nargs="*", default=[])
    c.add_argument("--no-streamer", action="store_true")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--torch-dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    c.set_defaults(func=cmd_chat)


def cmd_download(args) -> None:
    import yaml

    from .download import Entry, download

    if args.entries:
        raw = _json_arg("--entries", args.entries, list)
    else:
        sections = (yaml.safe_load(Path(args.config).read_text()) or {}).get("downloads") or {}
        if args.section not in sections:
            raise SystemExit(f"llavaflow download: {args.config} has no downloads.{args.section} section "
                             f"(it has: {', '.join(sections) or 'none'})")
        manifest = sections[args.section]
        raw = [dict(e, dest=e.get("dest", f"{name}.tsv")) for name, e in manifest.items()] \
            if isinstance(manifest, dict) else manifest
    results = download([Entry.from_dict(e) for e in raw], args.root, args.jobs)
    if args.done:
        Path(args.done).write_text(json.dumps({"fetched": results}, indent=1))


def cmd_check_data(args) -> None:
    from .data.check import check_data, failed_report

    from .atomic import atomic_output, check_output

    sources = _json_arg("--sources", args.sources, list)
    for i, src in enumerate(sources):
        if not isinstance(src, dict) or not isinstance(src.get("annotation"), str) or \
                not isinstance(src.get("image_folder", ""), str):
            raise ArgumentError(f"--sources[{i}]: expected {{\"annotation\": PATH, \"image_folder\": PATH}}, got {src!r}")
    inputs = [src.get(k) for src in sources for k in ("annotation", "image_folder")]
    for out in (Path(args.out), Path(args.report), failed_report(Path(args.report))):
        check_output(out, inputs, overwrite=True)  # before the check (hours on real data): never over an input
    counts = check_data(sources, args.report, args.on_bad_sample)
    with atomic_output(Path(args.out), folder=False, inputs=inputs, overwrite=True) as tmp:
        tmp.write_text(json.dumps(counts, indent=1))


def _add_download(sub) -> None:
    d = sub.add_parser("download", help="fetch a download manifest (resumable, verified, safe extraction)")
    d.add_argument("--root", required=True, help="folder the entries' dest paths are relative to")
    d.add_argument("--entries", help="the manifest as a JSON list of entries")
    d.add_argument("--config", default="config/config.yaml", help="or: a config file's downloads section ...")
    d.add_argument("--section", default="pretrain", help="... with this name (pretrain, finetune, mmbench, ...)")
    d.add_argument("--jobs", type=int, default=4)
    d.add_argument("--done", help="write a JSON record of what was fetched here when everything succeeded")
    d.set_defaults(func=cmd_download)
    c = sub.add_parser("check-data", help="count samples, check that every referenced image exists and opens")
    c.add_argument("--sources", required=True, help="JSON list of {annotation, image_folder}")
    c.add_argument("--report", required=True, help="TSV of bad image references")
    c.add_argument("--out", required=True, help="JSON of the counts, written when the check passes")
    c.add_argument("--on-bad-sample", choices=["error", "skip"], default="error")
    c.set_defaults(func=cmd_check_data)


def _add_mmbench(sub) -> None:
    m = sub.add_parser("mmbench", help="evaluate on an MMBench/CCBench TSV (xtuner mmbench's arguments)")
    m.add_argument("model_name_or_path", type=_folder, help="the xtuner-style folder (results/iter_xtuner)")
    m.add_argument("--llava", type=_folder, help="the xtuner-style LLaVA folder, if not the positional one")
    m.add_argument("--visual-encoder", type=_model_ref, help="only for folders without visual_encoder/")
    m.add_argument("--visual-select-layer", type=int,
                   help="override the ViT layer recorded in projector/config.json (xtuner folders without it: -2)")
    m.add_argument("--prompt-template", default="phi3_chat")
    m.add_argument("--data-path", required=True, type=_existing_file, help="the benchmark TSV")
    m.add_argument("--work-dir", required=True)
    m.add_argument("--dataset", help="name used in output files (default: the TSV's stem)")
    m.add_argument("--policy", default="vlmeval", help="answer extraction: vlmeval (default), xtuner, or a full policy name")
    m.add_argument("--verbose-quirk", action="store_true",
                   help="extract as VLMEvalKit does with its VERBOSE variable set (changes scores; off in VLMEvalKit too)")
    m.add_argument("--batch-size", type=_positive, default=16)
    m.add_argument("--max-new-tokens", type=_positive, default=100)
    m.add_argument("--overwrite", action="store_true",
                   help="use a --work-dir holding another dataset's results or files that are not ours")
    m.add_argument("--torch-dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto")
    m.add_argument("--no-fast-path", action="store_true", help="always decode to the end (for comparisons)")
    m.set_defaults(func=cmd_mmbench)


def cmd_report(args) -> None:
    import pandas as pd

    from .report import ReportError, render_report, report_results

    if args.metrics:  # the report rule: its inputs named by the DAG
        if not (args.out and args.benchmarks and args.summaries):
            raise SystemExit("llavaflow report: --metrics needs --out, --benchmarks and --summaries")
        if any("=" not in m for m in args.metrics):
            raise SystemExit(f"llavaflow report: --metrics takes STAGE=FILE, got {next(m for m in args.metrics if '=' not in m)!r}")
        render_report(metrics=dict(m.split("=", 1) for m in args.metrics), summaries=args.summaries,
                      benchmarks=args.benchmarks, out_dir=args.out)
        return
    if not args.results:
        raise SystemExit("llavaflow report: give a finished results folder (or --metrics/--benchmarks/--summaries)")
    out = Path(args.out) if args.out else Path(args.results) / "summary"
    try:
        paths = report_results(args.results, out)
    except ReportError as e:
        raise SystemExit(f"llavaflow report: {e}") from None
    with pd.option_context("display.width", 200, "display.max_columns", None):
        for name in ("mmbench_table", "runtimes_table"):
            print(pd.read_csv(paths[name], sep="\t").to_string(index=False), end="\n\n")
    print("\n".join(f"{name}: {path}" for name, path in paths.items() if not name.endswith("_table")))


def _add_report(sub) -> None:
    r = sub.add_parser("report", help="the summary (tables, figures, summary.html) of a finished results folder")
    r.add_argument("results", nargs="?", help="a finished run's results folder (e.g. results)")
    r.add_argument("--out", help="where to write it (default: RESULTS/summary)")
    # What the report rule passes instead of RESULTS: the files its DAG inputs name.
    r.add_argument("--metrics", nargs="+", help="STAGE=metrics.jsonl")
    r.add_argument("--benchmarks", nargs="+", help="Snakemake benchmark TSVs")
    r.add_argument("--summaries", nargs="+", help="the evaluations' summary.json files")
    r.set_defaults(func=cmd_report)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llavaflow", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run one training stage (launch with torchrun for several ranks)")
    t.add_argument("--recipe", required=True, help="the stage recipe: a JSON/YAML file or an inline JSON object")
    t.add_argument("--set", help="JSON object of recipe keys to override (e.g. save_steps, num_workers)")
    t.add_argument("--work-dir", required=True, help="resume state (iter_N.pth checkpoints); reruns resume from it")
    t.add_argument("--output", required=True, help="where the final checkpoint is published when the run completes "
                   "(an earlier one published there is replaced; anything else there is refused)")
    t.add_argument("--overwrite", action="store_true", help="replace whatever is at --output (never an input)")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("build-tiny", help="build the tiny embedded preset's models and data")
    b.add_argument("--out", required=True)
    b.add_argument("--mmbench-dir", required=True)
    b.add_argument("--datasets", nargs="+", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out and TSVs of the same names")
    b.set_defaults(func=cmd_build_tiny)
    _add_convert(sub)
    _add_mmbench(sub)
    _add_chat(sub)
    _add_download(sub)
    _add_report(sub)
    return p


def _add_debug_everywhere(p: argparse.ArgumentParser) -> None:
    """--debug before or after the subcommand (argparse has no inherited options: walk the subparsers)."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, show the full traceback instead of one line")
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug_everywhere(child)


def explain(e: BaseException) -> str:
    """One line for an error: our own errors already name the file/row/URL and what to do; library errors
    get their type and, where we know it, what it means here."""
    text = str(e).strip() or type(e).__name__
    if type(e).__module__.startswith("llavaflow"):
        return text
    name = type(e).__name__
    if name == "HFValidationError":  # a path that does not exist is taken for a (malformed) hub repo id
        return (f"not an existing folder, nor a valid Hugging Face repo id ({text.splitlines()[0]}); "
                "check the path")
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.filename}: no such file or folder"
    if isinstance(e, OSError) and "is not a local folder and is not a valid model identifier" in text:
        return text.splitlines()[0] + " (no such local folder, and the hub has no such model)"
    first = text.splitlines()[0]
    return f"{name}: {first}" + (" [...]" if "\n" in text else "")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = parser()
    _add_debug_everywhere(p)
    args = p.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"llavaflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the command line's one place for errors: one line, or the traceback on --debug
        if getattr(args, "debug", False):
            raise
        print(f"llavaflow {args.command}: error: {explain(e)} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
