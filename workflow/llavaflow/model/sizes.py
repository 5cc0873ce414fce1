"""The reference architecture as data: Phi-3-mini-4k-instruct and CLIP ViT-L/14-336, as their HF configs
give them (their config.json files on the Hub). For benchmarks and FLOP checks at the real size without downloading."""

from __future__ import annotations

PHI3_MINI_4K = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                    original_max_position_embeddings=4096, sliding_window=2047, rope_theta=10000.0,
                    bos_token_id=1, eos_token_id=32000, pad_token_id=32000, tie_word_embeddings=False)
CLIP_VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def build_reference_llava(device="cpu", llm_layers: int | None = None, vit_layers: int | None = None,
                          attn: str = "sdpa"):
    """LLaVA-Phi-3-mini at random init on `device` ("meta" for shapes only); fewer layers on request."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

    from .build import new_projector
    from .llava import LlavaModel

    phi = Phi3Config(**{**PHI3_MINI_4K, **({"num_hidden_layers": llm_layers} if llm_layers else {})},
                     attn_implementation=attn)
    vit = CLIPVisionConfig(**{**CLIP_VIT_L_336, **({"num_hidden_layers": vit_layers} if vit_layers else {})},
                           attn_implementation=attn)
    with torch.device(device):
        return LlavaModel(Phi3ForCausalLM(phi), CLIPVisionModel(vit),
                          new_projector(vit.hidden_size, phi.hidden_size, 2))
