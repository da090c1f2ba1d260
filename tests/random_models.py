"""Small random-weight checkpoints of each supported family, built with transformers."""

from __future__ import annotations

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def random_hf_model(family: str = "llama", num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16,
                    tie: bool = True, num_layers: int = 2, seed: int = 0, rope_theta: float = 10000.0):
    """Return a tiny transformers model with random weights (fp32, eval mode)."""
    config_class, model_class = FAMILIES[family]
    config = config_class(
        vocab_size=128, hidden_size=num_heads * head_dim, intermediate_size=96, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # Random norm weights make a wrong norm visible; the default all-ones would hide it.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            elif "bias" in name:
                parameter.normal_(0, 0.1)
    return model
