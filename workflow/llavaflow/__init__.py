"""llavaflow: the life of a LLaVA model (pretrain, fine-tune, convert, chat, evaluate) as one pipeline."""

__version__ = "0.1.0"
