"""`llavaflow chat`: talk to a trained model about an image (the counterpart of `xtuner chat --llava`).

Reads the xtuner-style folder (results/iter_xtuner, with our loader) or the HF export (results/iter_hf,
with stock transformers). Prompts are built exactly as in training: phi3_chat turns, "<image>\\n" before
the first message, answers closed by <|end|> and the template's separator.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .constants import IMAGE_TOKEN_INDEX
from .data.conversation import Turn, encode_prompt, encode_turns
from .data.images import ImageError, open_image
from .template import PromptTemplate

HELP = ("end each message with an empty line (double enter), as in xtuner chat; commands: /image PATH_OR_URL "
        "(new image, new conversation), /reset (or RESET), /exit (or EXIT)")


def fetch_image(source: str):
    """An RGB image from a path or an http(s) URL; ImageError with the reason otherwise."""
    if source.startswith(("http://", "https://")):
        import requests

        try:
            r = requests.get(source, timeout=30)
            r.raise_for_status()
        except requests.RequestException as e:
            raise ImageError(f"{source}: cannot download image ({e})") from None
        return open_image(r.content, source)  # errors name the URL
    return open_image(Path(source).expanduser())


class XtunerBackend:
    def __init__(self, folder: str, dtype, device, visual_encoder=None, visual_select_layer=None):
        from .model.loading import load_xtuner_for_inference

        # The select layer is the folder's own (projector/config.json) unless explicitly overridden.
        self.model, self.tokenizer, self.transform = load_xtuner_for_inference(folder, dtype, visual_encoder,
                                                                               visual_select_layer, device=device)

    def pixels(self, image):
        return self.transform(image)[None]

    def generate(self, ids: list[int], pixels, **kw) -> list[int]:
        return self.model.generate([ids], pixels if IMAGE_TOKEN_INDEX in ids else None, **kw)[0]


class HFBackend:
    """The HF export through stock transformers; the image placeholder expands to image_seq_length tokens."""

    def __init__(self, folder: str, dtype, device):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .model.loading import from_pretrained_complete

        self.model = from_pretrained_complete(AutoModelForImageTextToText, folder, dtype=dtype).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(folder)
        self.tokenizer = self.processor.tokenizer

    def pixels(self, image):
        return self.processor.image_processor(image, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def generate(self, ids: list[int], pixels, **kw) -> list[int]:
        cfg = self.model.config
        expanded = []
        for i in ids:
            expanded += [cfg.image_token_index] * cfg.image_seq_length if i == IMAGE_TOKEN_INDEX else [i]
        x = torch.tensor([expanded], device=self.model.device)
        extra = {"pixel_values": pixels.to(self.model.device, self.model.dtype)} if IMAGE_TOKEN_INDEX in ids else {}
        out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **extra, **kw)
        return out[0, x.shape[1]:].tolist()


def load_backend(folder: str, dtype, device, visual_encoder=None, visual_select_layer=None):
    folder_path = Path(folder)
    if (folder_path / "projector").is_dir():
        return XtunerBackend(folder, dtype, device, visual_encoder, visual_select_layer)
    if visual_select_layer is not None:
        raise SystemExit(f"{folder}: --visual-select-layer applies to xtuner-style folders only (an HF export "
                         "records it as vision_feature_layer in config.json)")
    if (folder_path / "config.json").exists() and '"llava"' in (folder_path / "config.json").read_text():
        return HFBackend(folder, dtype, device)
    raise SystemExit(f"{folder}: neither an xtuner-style folder (with projector/) nor an HF LLaVA export")


@dataclass
class Session:
    backend: object
    template: PromptTemplate
    system: str = ""
    gen: dict = field(default_factory=dict)
    turns: list[Turn] = field(default_factory=list)
    pixels: torch.Tensor | None = None

    def set_image(self, image) -> None:
        self.pixels = self.backend.pixels(image)
        self.turns = []

    def reset(self) -> None:
        self.turns = []

    def prompt_ids(self, text: str) -> list[int]:
        tok = self.backend.tokenizer
        if not self.turns and self.pixels is not None:
            text = "<image>\n" + text
        history, _ = encode_turns(self.turns, tok, self.template, None, system=self.system)
        prompt = self.template.format_instruction(text)
        if not self.turns and self.system:
            prompt = self.template.format_system(self.system) + prompt
        return history + encode_prompt(tok, prompt, with_bos=not self.turns)

    def ask(self, text: str, streamer=None) -> str:
        tok = self.backend.tokenizer
        ids = self.prompt_ids(text)
        stop, strings = stop_ids_and_strings(tok, self.template.stop_words)
        by_text = {"stop_strings": strings, "tokenizer": tok} if strings else {}
        out = self.backend.generate(ids, self.pixels, eos_token_id=stop, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                    streamer=streamer, **by_text, **self.gen)
        cut = next((i for i, t in enumerate(out) if t in stop), len(out))
        answer = tok.decode(out[:cut], skip_special_tokens=True)
        at = min((answer.find(s) for s in strings if s in answer), default=-1)
        if at >= 0:  # a --stop-words text ended the reply: it ends there, and the turn stays in the history
            answer = answer[:at]
        if at < 0 and cut == len(out) and len(out) >= self.gen.get("max_new_tokens", 0):
            self.turns = []  # as xtuner: a reply cut by the budget ends the conversation
        else:
            self.turns.append(Turn(("<image>\n" + text) if not self.turns and self.pixels is not None else text, answer))
        return answer


def stop_ids_and_strings(tokenizer, words) -> tuple[list[int], list[str]]:
    """Stop words that are tokens of their own (the template's <|end|>) stop on their id, with EOS; any other
    text (--stop-words '###') through transformers' stop_strings, which finds it however it is tokenised
    (as token ids, a multi-token word once became <unk> and never stopped anything)."""
    special = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
    ids = [tokenizer.convert_tokens_to_ids(w) for w in words if w in special]
    return ids + [tokenizer.eos_token_id], [w for w in words if w not in special]


def generation_kwargs(temperature: float, top_p: float, top_k: int, max_new_tokens: int, repetition_penalty: float) -> dict:
    sample = temperature > 0
    kw = {"max_new_tokens": max_new_tokens, "do_sample": sample, "repetition_penalty": repetition_penalty}
    if sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=top_k)
    return kw


def read_message(inp) -> str | None:
    """One message as xtuner chat reads it: lines up to an empty one, so a question pasted with its options on
    separate lines is one turn. None at the end of the input with nothing typed."""
    lines: list[str] = []
    while True:
        line = inp.readline()
        if not line:
            return "\n".join(lines).strip() or None
        line = line.rstrip("\r\n")
        if line.strip():
            lines.append(line)
        elif lines:
            return "\n".join(lines).strip()


def interactive(session: Session, stream: bool, inp=sys.stdin, out=sys.stdout) -> None:
    from transformers import TextStreamer

    print(HELP, file=out, flush=True)
    while True:
        out.write("\n>>> ")
        out.flush()
        text = read_message(inp)
        if text is None:
            return
        if text in ("/exit", "EXIT"):
            return
        if text in ("/reset", "RESET"):
            session.reset()
            print("(conversation reset)", file=out, flush=True)
            continue
        if text.startswith("/image"):
            try:
                session.set_image(fetch_image(text[len("/image"):].strip()))
                print("(new image loaded; new conversation)", file=out, flush=True)
            except ImageError as e:
                print(f"error: {e}", file=out, flush=True)
            continue
        out.write("BOT: ")
        out.flush()
        streamer = TextStreamer(session.backend.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        answer = session.ask(text, streamer)
        if not stream:
            out.write(answer + "\n")
        out.flush()
