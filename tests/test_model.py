"""Our forward pass against transformers: tiny random checkpoints of each family, and the real model."""

from __future__ import annotations

import pytest
import torch

from nanovllm_lib import CausalAttention, CausalLM, ModelConfig, SamplingParams, generate_naive
from nanovllm_lib.model import expand_kv_heads, rope_inverse_frequencies
from nanovllm_lib.weights import load_weights
from random_models import random_hf_model


def ours_from_hf(hf_model) -> CausalLM:
    config = ModelConfig.from_dict(hf_model.config.to_dict())
    with torch.device("meta"):
        model = CausalLM(config)
    load_weights(model, dict(hf_model.state_dict()), dtype=torch.float32, device="cpu")
    model.inv_freq = rope_inverse_frequencies(config)
    return model.eval()


def logits_of(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model.compute_logits(model(ids, positions, CausalAttention()))


CASES = [
    ("llama", 4, 2, True),
    ("llama", 16, 8, False),  # 16 query / 8 KV heads and an untied output head
    ("llama", 9, 3, True),
    ("qwen2", 4, 2, False),   # q/k/v biases
    ("qwen3", 4, 2, True),    # per-head q/k RMSNorm before RoPE
    ("qwen3", 8, 8, False),   # plain multi-head attention
]


@pytest.mark.parametrize("family,num_heads,num_kv_heads,tie", CASES)
def test_random_model_matches_transformers(family, num_heads, num_kv_heads, tie):
    hf = random_hf_model(family, num_heads, num_kv_heads, tie=tie)
    ours = ours_from_hf(hf)
    ids = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    assert (logits_of(ours, ids) - expected).abs().max() < 1e-4


def test_untied_head_is_separate():
    ours = ours_from_hf(random_hf_model("llama", tie=False))
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight


def test_tied_head_shares_embedding():
    ours = ours_from_hf(random_hf_model("llama", tie=True))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_rope_theta_comes_from_config():
    hf = random_hf_model("llama", rope_theta=1_000_000.0)
    config = ModelConfig.from_dict(hf.config.to_dict())
    expected = 1.0 / (1_000_000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert config.rope_theta == 1_000_000.0
    assert torch.allclose(rope_inverse_frequencies(config), expected)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (16, 8)])
def test_query_head_reads_kv_head_by_group(num_heads, num_kv_heads):
    kv = torch.randn(5, num_kv_heads, 8)
    expanded = expand_kv_heads(kv, num_heads // num_kv_heads)
    group = num_heads // num_kv_heads
    for head in range(num_heads):
        assert torch.equal(expanded[:, head], kv[:, head // group])


def test_unsupported_architecture_lists_supported():
    with pytest.raises(ValueError, match="llama, qwen2, qwen3"):
        ModelConfig.from_dict({"model_type": "gpt2"})


def test_real_model_logits_match(lm, hf_model, tokenizer):
    for text in ["The capital of France is", "def add(a, b):\n    return", "Once upon a time, in a land far"]:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            expected = hf_model(ids).logits
        assert (logits_of(lm.model, ids) - expected).abs().max() < 1e-4


def test_real_model_greedy_matches_generate(lm, hf_model, tokenizer):
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=True,
                                         add_generation_prompt=True, return_dict=True)["input_ids"]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for ids in [tokenizer("The tallest mountain on Earth")["input_ids"], chat]:
        ours = generate_naive(lm, ids, params).token_ids
        with torch.no_grad():
            prompt = torch.tensor([ids])
            theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64,
                                       do_sample=False, eos_token_id=None)[0, len(ids):].tolist()
        assert ours == theirs


def test_forward_rejects_mismatched_positions(lm):
    with pytest.raises(ValueError, match="differ in shape"):
        lm.model(torch.zeros(1, 4, dtype=torch.long), torch.arange(3)[None], CausalAttention())
