"""Fixed ids and names shared with xtuner and LLaVA (xtuner/utils/constants.py)."""

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
# xtuner's collate pads input_ids with 0 (Phi-3's <unk>), not with the tokenizer's pad id.
DEFAULT_PAD_TOKEN_INDEX = 0

# Phi-3's added tokens, in the order they follow the 32000-piece SentencePiece vocabulary.
PHI3_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
)

# The three parts of a LLaVA model, by the state-dict prefix they carry in iter_N.pth checkpoints.
MODEL_PARTS = ("llm", "visual_encoder", "projector")
