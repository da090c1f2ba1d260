"""The contiguous KV cache: slot bookkeeping, capacity, cached vs uncached attention, and generation on real weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm_lib import CausalAttention, CausalLM, LoadedModel, ModelConfig, SamplingParams, generate_naive
from nanovllm_lib.kv_cache import (ContiguousKVCache, cache_length_for, decode_step, generate_batch_cached,
                                   generate_cached, kv_bytes_per_token, prefill)
from nanovllm_lib.model import rope_inverse_frequencies, scaled_dot_product
from nanovllm_lib.weights import load_weights
from random_models import random_hf_model


def small_config(num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 8,
                 max_position_embeddings: int = 256) -> ModelConfig:
    return ModelConfig.from_dict({
        "model_type": "llama", "vocab_size": 128, "hidden_size": num_heads * head_dim, "intermediate_size": 64,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim, "rms_norm_eps": 1e-5, "max_position_embeddings": max_position_embeddings,
    })


def marked(numbers: list[list[float]], config: ModelConfig) -> torch.Tensor:
    """Keys or values [B, T, kv_heads, head_dim] whose entries all equal the given number per token."""
    tensor = torch.tensor(numbers, dtype=torch.float32)[:, :, None, None]
    return tensor.expand(-1, -1, config.num_kv_heads, config.head_dim).clone()


def write_chunk(cache: ContiguousKVCache, numbers: list[list[float]], commit) -> torch.Tensor:
    """Run one fake forward pass through every layer (key = value = marked numbers) and commit it."""
    config = cache.config
    chunk = len(numbers[0])
    q = torch.randn(cache.batch_size, chunk, config.num_heads, config.head_dim, generator=torch.Generator().manual_seed(0))
    kv = marked(numbers, config)
    outputs = [cache.attend(layer, q, kv, kv) for layer in range(config.num_layers)]
    cache.advance(commit)
    return outputs[-1]


def slot_marks(cache: ContiguousKVCache, layer: int, row: int) -> list[float]:
    return cache.keys[layer][row, :, 0, 0].tolist()


def test_cache_tensors_store_only_kv_heads():
    config = small_config(num_heads=4, num_kv_heads=2, head_dim=8)
    cache = ContiguousKVCache(config, batch_size=3, max_len=10)
    assert len(cache.keys) == len(cache.values) == config.num_layers
    assert tuple(cache.keys[0].shape) == (3, 10, 2, 8)
    assert tuple(cache.values[1].shape) == (3, 10, 2, 8)
    assert cache.lengths.tolist() == [0, 0, 0]


def test_prefill_and_decode_writes_land_at_their_slots():
    config = small_config()
    cache = ContiguousKVCache(config, batch_size=1, max_len=6)
    write_chunk(cache, [[1, 2, 3]], commit=3)
    write_chunk(cache, [[4]], commit=1)
    write_chunk(cache, [[5]], commit=1)
    for layer in range(config.num_layers):
        assert slot_marks(cache, layer, 0) == [1, 2, 3, 4, 5, 0]
        assert torch.equal(cache.values[layer][0, :5, 0, 0], torch.tensor([1.0, 2, 3, 4, 5]))
    assert cache.lengths.tolist() == [5]


def test_rows_write_at_own_length():
    config = small_config()
    cache = ContiguousKVCache(config, batch_size=2, max_len=8)
    write_chunk(cache, [[1, 2, 3, 4], [11, 12, 99, 99]], commit=[4, 2])  # row 1: 2 tokens + 2 padding
    assert cache.lengths.tolist() == [4, 2]
    assert cache.positions(1).tolist() == [[4], [2]]
    write_chunk(cache, [[5], [13]], commit=1)
    assert slot_marks(cache, 0, 0)[:5] == [1, 2, 3, 4, 5]
    assert slot_marks(cache, 0, 1)[:3] == [11, 12, 13]  # the decode token overwrote the first padding slot
    assert cache.lengths.tolist() == [5, 3]


def test_finished_row_commits_nothing():
    config = small_config()
    cache = ContiguousKVCache(config, batch_size=2, max_len=8)
    write_chunk(cache, [[1, 2], [11, 12]], commit=2)
    write_chunk(cache, [[3], [13]], commit=[1, 0])
    write_chunk(cache, [[4], [14]], commit=[1, 0])
    assert cache.lengths.tolist() == [4, 2]
    assert slot_marks(cache, 0, 1)[2] == 14  # rewritten in place, never committed


def test_uncommitted_slots_do_not_leak_into_attention():
    config = small_config(num_layers=1)
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, config.num_heads, config.head_dim, generator=generator)
    k = torch.randn(2, 1, config.num_kv_heads, config.head_dim, generator=generator)
    outputs = []
    for garbage in [0.0, 1000.0]:
        cache = ContiguousKVCache(config, batch_size=2, max_len=8)
        prompt = torch.full((2, 4, config.num_kv_heads, config.head_dim), garbage)
        prompt[:, :2] = 1.0  # row 1 keeps 2 real tokens, and its padding and everything past it is garbage
        cache.attend(0, torch.zeros(2, 4, config.num_heads, config.head_dim), prompt, prompt)
        cache.advance([4, 2])
        outputs.append(cache.attend(0, q, k, k)[1])
    assert torch.allclose(outputs[0], outputs[1])


def test_positions_continue_from_each_row_length():
    cache = ContiguousKVCache(small_config(), batch_size=2, max_len=10)
    assert cache.positions(3).tolist() == [[0, 1, 2], [0, 1, 2]]
    write_chunk(cache, [[1, 2, 3], [1, 2, 3]], commit=[3, 1])
    assert cache.positions(2).tolist() == [[3, 4], [1, 2]]


def test_cache_full_raises_and_writes_nothing():
    config = small_config()
    cache = ContiguousKVCache(config, batch_size=2, max_len=5)
    write_chunk(cache, [[1, 2, 3, 4], [1, 2, 9, 9]], commit=[4, 2])
    keys_before = [k.clone() for k in cache.keys]
    values_before = [v.clone() for v in cache.values]
    q = torch.zeros(2, 2, config.num_heads, config.head_dim)
    with pytest.raises(ValueError, match=r"row 0 contains 4 tokens.*adds 2.*6 in all.*max_len is 5") as error:
        cache.attend(0, q, marked([[5, 6], [5, 6]], config), marked([[5, 6], [5, 6]], config))
    assert "max_tokens" in str(error.value)  # the message names the fix
    assert all(torch.equal(a, b) for a, b in zip(cache.keys, keys_before))
    assert all(torch.equal(a, b) for a, b in zip(cache.values, values_before))
    assert cache.lengths.tolist() == [4, 2]
    write_chunk(cache, [[5], [13]], commit=1)  # a chunk that fits still works after the error
    assert cache.lengths.tolist() == [5, 3]


def test_positions_raise_when_chunk_does_not_fit():
    cache = ContiguousKVCache(small_config(), batch_size=1, max_len=3)
    with pytest.raises(ValueError, match="max_len is 3"):
        cache.positions(4)


def test_advance_protocol_is_checked():
    config = small_config(num_layers=2)
    cache = ContiguousKVCache(config, batch_size=1, max_len=8)
    kv = marked([[1, 2]], config)
    q = torch.zeros(1, 2, config.num_heads, config.head_dim)
    with pytest.raises(RuntimeError, match="no forward pass"):
        cache.advance(1)
    cache.attend(0, q, kv, kv)
    with pytest.raises(RuntimeError, match="advance"):
        cache.attend(0, q, kv, kv)  # same layer twice without advance
    with pytest.raises(RuntimeError, match="Only layers"):
        cache.advance(2)  # layer 1 not written yet
    cache.attend(1, q, kv, kv)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        cache.advance(3)
    with pytest.raises(ValueError, match="one per row"):
        cache.advance([1, 1])
    cache.advance(2)
    assert cache.lengths.tolist() == [2]


@pytest.mark.parametrize("kwargs", [dict(batch_size=0, max_len=4), dict(batch_size=1, max_len=0),
                                    dict(batch_size=1.5, max_len=4)])
def test_constructor_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError):
        ContiguousKVCache(small_config(), **kwargs)


def test_attend_rejects_wrong_shapes():
    config = small_config()
    cache = ContiguousKVCache(config, batch_size=2, max_len=8)
    q = torch.zeros(2, 1, config.num_heads, config.head_dim)
    kv = torch.zeros(2, 1, config.num_kv_heads, config.head_dim)
    with pytest.raises(ValueError, match="q has shape"):
        cache.attend(0, q[:1], kv[:1], kv[:1])
    with pytest.raises(ValueError, match="must both have shape"):
        cache.attend(0, q, torch.zeros(2, 1, config.num_heads, config.head_dim), kv)
    with pytest.raises(ValueError, match="layer=5"):
        cache.attend(5, q, kv, kv)


@pytest.mark.parametrize("dtype,element_bytes", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)])
def test_allocated_bytes_match_formula(dtype, element_bytes):
    config = small_config(num_layers=3, num_kv_heads=2, head_dim=8)
    cache = ContiguousKVCache(config, batch_size=4, max_len=7, dtype=dtype)
    assert kv_bytes_per_token(3, 2, 8, element_bytes) == 2 * 3 * 2 * 8 * element_bytes
    assert cache.nbytes == 4 * 7 * kv_bytes_per_token(3, 2, 8, element_bytes)
    assert cache.keys[0].dtype == dtype


def test_cache_length_for_static_batch():
    assert cache_length_for([5, 12], [10, 10]) == 21
    assert cache_length_for([30, 4], [1, 1]) == 30  # the padded prefill alone needs the longest prompt
    assert cache_length_for([3, 8], [20, 2]) == 22


HEAD_LAYOUTS = [(9, 3), (16, 8), (4, 4), (8, 1)]


@settings(max_examples=40, deadline=None)
@given(layout=st.sampled_from(HEAD_LAYOUTS), chunks=st.lists(st.integers(1, 6), min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
def test_chunked_attention_equals_whole_sequence(layout, chunks, seed):
    num_heads, num_kv_heads = layout
    config = small_config(num_layers=1, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=8)
    total = sum(chunks)
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, total, num_heads, 8, generator=generator)
    k = torch.randn(1, total, num_kv_heads, 8, generator=generator)
    v = torch.randn(1, total, num_kv_heads, 8, generator=generator)
    whole = scaled_dot_product(q, k, v, torch.ones(total, total, dtype=torch.bool).tril()[None])
    cache = ContiguousKVCache(config, batch_size=1, max_len=total)
    pieces, start = [], 0
    for size in chunks:
        pieces.append(cache.attend(0, q[:, start:start + size], k[:, start:start + size], v[:, start:start + size]))
        cache.advance(size)
        start += size
    assert torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(prompt_lens=st.lists(st.integers(1, 8), min_size=1, max_size=4), decode_steps=st.integers(0, 4),
       seed=st.integers(0, 2**16))
def test_padded_batch_rows_equal_each_row_alone(prompt_lens, decode_steps, seed):
    config = small_config(num_layers=1, num_heads=9, num_kv_heads=3, head_dim=8)
    batch, longest = len(prompt_lens), max(prompt_lens)
    total = longest + decode_steps
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, total, 9, 8, generator=generator)
    k = torch.randn(batch, total, 3, 8, generator=generator)
    v = torch.randn(batch, total, 3, 8, generator=generator)

    # Row b's real sequence is its prompt q/k/v[b, :len_b] followed by the decode tokens q/k/v[b, longest + s].
    def real(x, row):
        return torch.cat([x[row, :prompt_lens[row]], x[row, longest:]])

    cache = ContiguousKVCache(config, batch_size=batch, max_len=total)
    prompt_out = cache.attend(0, q[:, :longest], k[:, :longest], v[:, :longest])
    cache.advance(prompt_lens)
    decode_out = []
    for step in range(decode_steps):
        s = longest + step
        decode_out.append(cache.attend(0, q[:, s:s + 1], k[:, s:s + 1], v[:, s:s + 1]))
        cache.advance(1)
    for row, length in enumerate(prompt_lens):
        n = length + decode_steps
        alone = scaled_dot_product(real(q, row)[None], real(k, row)[None], real(v, row)[None],
                                   torch.ones(n, n, dtype=torch.bool).tril()[None])[0]
        batched = torch.cat([prompt_out[row, :length]] + [out[row] for out in decode_out])
        assert torch.allclose(batched, alone, atol=1e-5)


# Random-weight checkpoints built with transformers: GQA layouts and families beyond the embedded model.

def loaded_from_hf(hf_model) -> LoadedModel:
    config = ModelConfig.from_dict(hf_model.config.to_dict())
    with torch.device("meta"):
        network = CausalLM(config)
    load_weights(network, dict(hf_model.state_dict()), dtype=torch.float32, device="cpu")
    network.inv_freq = rope_inverse_frequencies(config)
    return LoadedModel(network.eval(), None, config, frozenset(), Path("random"))


def uncached_logits(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        hidden = lm.model(torch.tensor([ids]), torch.arange(len(ids))[None], CausalAttention())
        return lm.model.compute_logits(hidden[0, -1])


@pytest.mark.parametrize("family,num_heads,num_kv_heads", [("llama", 16, 8), ("llama", 9, 3), ("qwen2", 4, 2),
                                                            ("qwen3", 8, 2)])
def test_random_model_cached_logits_match_uncached(family, num_heads, num_kv_heads):
    hf = random_hf_model(family, num_heads, num_kv_heads, num_layers=2, tie=False)
    lm = loaded_from_hf(hf)
    ids = torch.randint(0, 128, (7,), generator=torch.Generator().manual_seed(2)).tolist()
    cache = ContiguousKVCache(lm.config, batch_size=1, max_len=len(ids) + 12)
    logits = prefill(lm, cache, [ids])[0]
    with torch.no_grad():
        assert (logits - hf(torch.tensor([ids])).logits[0, -1]).abs().max() < 1e-4
    sequence = list(ids)
    for _ in range(12):
        assert (logits - uncached_logits(lm, sequence)).abs().max() < 1e-4
        sequence.append(int(logits.argmax()))
        logits = decode_step(lm, cache, [sequence[-1]])[0]


def test_random_model_batch_matches_one_by_one():
    lm = loaded_from_hf(random_hf_model("llama", 16, 8, num_layers=2))
    prompts = [[5, 6, 7], [9] * 11, list(range(20, 26))]
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    assert generate_batch_cached(lm, prompts, params) == [generate_cached(lm, p, params) for p in prompts]


# The embedded SmolLM2-135M-Instruct.

def chat(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                         add_generation_prompt=True, return_dict=True)["input_ids"]


def test_cached_greedy_equals_naive_and_transformers(lm, hf_model, tokenizer):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for ids in [tokenizer("The capital of France is")["input_ids"], chat(tokenizer, "Name a fruit.")]:
        ours = generate_cached(lm, ids, params)
        assert ours == generate_naive(lm, ids, params)
        # The chat prompt contains <|im_end|>, which is also the pad id: without an explicit attention mask,
        # generate would infer one that hides those prompt tokens.
        with torch.no_grad():
            theirs = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=10, do_sample=False, eos_token_id=None,
                                       pad_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
        assert ours.token_ids == theirs


def test_cached_logits_match_full_recompute_every_step(lm, tokenizer):
    ids = tokenizer("The three most important inventions in history are")["input_ids"][:10]
    cache = ContiguousKVCache(lm.config, batch_size=1, max_len=30)
    logits = prefill(lm, cache, [ids])[0]
    sequence = list(ids)
    for step in range(20):
        difference = (logits - uncached_logits(lm, sequence)).abs().max().item()
        assert difference < 1e-4, f"step {step}: max |logit difference| {difference:.2e}"
        sequence.append(int(logits.argmax()))
        logits = decode_step(lm, cache, [sequence[-1]])[0]


def test_stops_on_eos_like_naive(lm, tokenizer):
    ids = chat(tokenizer, "Say hi.")
    params = SamplingParams(temperature=0, max_tokens=40)
    result = generate_cached(lm, ids, params)
    assert result.finish_reason == "stop"
    assert result.token_ids[-1] in lm.eos_token_ids
    assert result == generate_naive(lm, ids, params)


@pytest.mark.parametrize("max_tokens", [1, 2, 5])
def test_exactly_max_tokens(lm, tokenizer, max_tokens):
    result = generate_cached(lm, tokenizer("Hi")["input_ids"], SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                                ignore_eos=True))
    assert len(result.token_ids) == max_tokens
    assert result.finish_reason == "length"


def test_batch_positions_start_at_zero_per_row(lm, tokenizer):
    prompts = [tokenizer("Short prompt")["input_ids"], tokenizer("This is a longer prompt with more tokens")["input_ids"]]
    assert len(prompts[1]) - len(prompts[0]) >= 5
    cache = ContiguousKVCache(lm.config, batch_size=2, max_len=30)
    longest = len(prompts[1])
    assert cache.positions(longest).tolist() == [list(range(longest))] * 2
    prefill(lm, cache, prompts)
    assert cache.lengths.tolist() == [len(p) for p in prompts]
    assert cache.positions(1).tolist() == [[len(prompts[0])], [len(prompts[1])]]


def test_batch_equals_one_by_one_greedy(lm, tokenizer):
    prompts = [tokenizer(t)["input_ids"] for t in ["Short prompt", "This is a longer prompt with more tokens",
                                                   "1, 2, 3,"]] + [chat(tokenizer, "Name three colours.")]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert generate_batch_cached(lm, prompts, params) == [generate_cached(lm, p, params) for p in prompts]


def test_batch_rows_finish_independently(lm, tokenizer):
    prompts = [chat(tokenizer, "Say hi."), chat(tokenizer, "Write a haiku about the sea.")]
    params = SamplingParams(temperature=0, max_tokens=30)
    batch = generate_batch_cached(lm, prompts, params)
    assert batch == [generate_cached(lm, p, params) for p in prompts]
    assert [g.finish_reason for g in batch] == ["stop", "length"]
    assert len(batch[0].token_ids) < len(batch[1].token_ids) == 30


def test_batch_with_per_row_params_and_seeds(lm, tokenizer):
    prompts = [tokenizer("Once upon a time")["input_ids"], tokenizer("My favourite food is")["input_ids"]]
    params = [SamplingParams(temperature=0.8, seed=1, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)]
    batch = generate_batch_cached(lm, prompts, params)
    assert batch == [generate_cached(lm, p, q) for p, q in zip(prompts, params)]
    assert [len(g.token_ids) for g in batch] == [8, 3]


def test_request_longer_than_context_is_rejected(lm):
    params = SamplingParams(max_tokens=10)
    prompt = [1] * (lm.config.max_position_embeddings - 5)
    with pytest.raises(ValueError, match=r"\(10\).*context window of 8192"):
        generate_cached(lm, prompt, params)
    with pytest.raises(ValueError, match="context window"):
        generate_batch_cached(lm, [[1, 2], prompt], params)


def test_empty_prompts_are_rejected(lm):
    params = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        generate_cached(lm, [], params)
    with pytest.raises(ValueError, match="empty"):
        generate_batch_cached(lm, [[1, 2, 3], []], params)
    with pytest.raises(ValueError, match="No prompts"):
        generate_batch_cached(lm, [], params)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        generate_batch_cached(lm, [[1]], [params, params])
