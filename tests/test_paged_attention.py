"""The paged KV cache and PagedAttention: slot mapping, grouped-query heads, step metadata and paged generation.

Logits are compared with tolerance 1e-4 (float rounding between equivalent computations), tokens exactly.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm_lib import BlockManager, CausalAttention, CausalLM, ModelConfig, NoFreeBlocksError, SamplingParams
from nanovllm_lib.kv_cache import ContiguousKVCache, decode_step, generate_cached, prefill
from nanovllm_lib.model import rope_inverse_frequencies
from nanovllm_lib.paged_attention import (PagedAttention, PagedKVCache, build_step_metadata, generate_paged,
                                          kv_tokens_needed, run_paged_step)
from nanovllm_lib.weights import load_weights
from random_models import random_hf_model

TOLERANCE = 1e-4
TEXT = ("The old lighthouse keeper climbed the stairs every evening to light the lamp. Ships passed in the night, "
        "and the keeper wrote their names in a book. One winter a storm broke the glass. ") * 3


@pytest.fixture(scope="module")
def corpus(tokenizer) -> list[int]:
    return tokenizer(TEXT)["input_ids"]


def ours_from_hf(hf_model) -> CausalLM:
    config = ModelConfig.from_dict(hf_model.config.to_dict())
    with torch.device("meta"):
        model = CausalLM(config)
    load_weights(model, dict(hf_model.state_dict()), dtype=torch.float32, device="cpu")
    model.inv_freq = rope_inverse_frequencies(config)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_llama():
    hf = random_hf_model("llama", num_heads=4, num_kv_heads=2, head_dim=16)
    return hf, ours_from_hf(hf)


@torch.no_grad()
def no_cache_logits(model: CausalLM, ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of every position of one sequence, computed without a cache."""
    hidden = model(torch.tensor([ids]), torch.arange(len(ids))[None], CausalAttention())
    return model.compute_logits(hidden[0])


@torch.no_grad()
def paged_greedy_trace(model: CausalLM, prompt: list[int], num_steps: int, block_size: int):
    """Prefill, then num_steps greedy decodes with a paged cache; return tokens and logits [num_steps + 1, vocab]."""
    manager = BlockManager(64, block_size)
    cache = PagedKVCache(model.config, 64, block_size)
    manager.allocate("s", len(prompt))
    step_ids, tokens, rows = list(prompt), [], []
    for _ in range(num_steps + 1):
        metadata = build_step_metadata(manager, [("s", len(step_ids))])
        rows.append(run_paged_step(model, cache, metadata, torch.tensor(step_ids))[0])
        tokens.append(int(rows[-1].argmax()))
        step_ids = tokens[-1:]
        manager.append_slots("s", 1)
    return tokens, torch.stack(rows)


@torch.no_grad()
def contiguous_greedy_trace(lm, prompt: list[int], num_steps: int):
    """The same with the contiguous cache of chapter 02."""
    cache = ContiguousKVCache(lm.config, 1, len(prompt) + num_steps)
    rows = [prefill(lm, cache, [prompt])[0]]
    tokens = [int(rows[-1].argmax())]
    for _ in range(num_steps):
        rows.append(decode_step(lm, cache, tokens[-1:])[0])
        tokens.append(int(rows[-1].argmax()))
    return tokens, torch.stack(rows)


def reference_attention(q, keys, values, query_positions, kv_head_of):
    """Causal attention written head by head: query head h reads KV head kv_head_of(h)."""
    out = torch.empty_like(q)
    for t, p in enumerate(query_positions):
        for h in range(q.shape[1]):
            scores = keys[: p + 1, kv_head_of(h)] @ q[t, h] / math.sqrt(q.shape[-1])
            out[t, h] = torch.softmax(scores, dim=0) @ values[: p + 1, kv_head_of(h)]
    return out


def attention_config(num_heads: int, num_kv_heads: int, head_dim: int = 8) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=16, hidden_size=num_heads * head_dim, intermediate_size=16,
                       num_layers=1, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                       tie_word_embeddings=True, attention_bias=False, qk_norm=False)


# Slot mapping and the pool.

def test_write_follows_block_table():
    config = attention_config(4, 2)
    cache = PagedKVCache(config, num_blocks=16, block_size=4)
    manager = BlockManager(16, 4)
    generator = torch.Generator().manual_seed(0)
    keys = {}
    for seq_id, prompt_len in enumerate((3, 4, 5, 8)):
        manager.allocate(seq_id, prompt_len)
        keys[seq_id] = torch.randn(prompt_len + 6, 2, 8, generator=generator)
    steps = [[(s, manager.num_tokens(s)) for s in keys]] + [[(s, 1) for s in keys]] * 6
    for step_index, batch in enumerate(steps):
        if step_index > 0:
            for seq_id in keys:
                manager.append_slots(seq_id, 1)
        metadata = build_step_metadata(manager, batch)
        new_keys = torch.cat([keys[s][c - n:c] for s, n, c in zip(metadata.seq_ids, metadata.query_lens,
                                                                     metadata.context_lens)])
        cache.write(0, metadata.slot_mapping, new_keys, new_keys)
        for seq_id, context in zip(metadata.seq_ids, metadata.context_lens):
            table = manager.block_table(seq_id)
            assert len(table) == math.ceil(context / 4)
            for p in range(context):
                assert torch.equal(cache.keys[0][table[p // 4], p % 4], keys[seq_id][p])


def test_model_keys_land_in_their_slots(tiny_llama):
    """End to end: the keys a no-cache forward computes for position p sit at block table[p // B], offset p % B."""
    _, model = tiny_llama
    recorded = {}

    class RecordKeys(CausalAttention):
        def attend(self, layer, q, k, v):
            recorded[layer] = k[0]
            return super().attend(layer, q, k, v)

    prompt = list(range(3, 14))
    tokens, _ = paged_greedy_trace(model, prompt, 5, block_size=4)
    full = prompt + tokens[:-1]
    with torch.no_grad():
        model(torch.tensor([full]), torch.arange(len(full))[None], RecordKeys())

    manager = BlockManager(64, 4)
    cache = PagedKVCache(model.config, 64, 4)
    manager.allocate("s", len(full))
    run_paged_step(model, cache, build_step_metadata(manager, [("s", len(full))]), torch.tensor(full))
    table = manager.block_table("s")
    for layer in range(model.config.num_layers):
        for p in range(len(full)):
            stored = cache.keys[layer][table[p // 4], p % 4]
            assert (stored - recorded[layer][p]).abs().max() < 1e-5


def test_read_returns_positions_in_order():
    config = attention_config(2, 1)
    cache = PagedKVCache(config, num_blocks=6, block_size=3)
    keys = torch.randn(7, 1, 8, generator=torch.Generator().manual_seed(1))
    table = [4, 0, 2]
    slots = torch.tensor([table[p // 3] * 3 + p % 3 for p in range(7)])
    cache.write(0, slots, keys, -keys)
    read_keys, read_values = cache.read(0, torch.tensor(table), 7)
    assert torch.equal(read_keys, keys)
    assert torch.equal(read_values, -keys)


def test_pool_sized_from_memory_budget(lm):
    per_block = PagedKVCache.bytes_per_block(lm.config, 16)
    assert per_block == 2 * 30 * 16 * 3 * 64 * 4
    assert PagedKVCache.num_blocks_for_memory(lm.config, 16, 10 * per_block + per_block // 2) == 10
    assert PagedKVCache.bytes_per_block(lm.config, 16, torch.bfloat16) == per_block // 2
    with pytest.raises(ValueError, match="smaller than one block"):
        PagedKVCache.num_blocks_for_memory(lm.config, 16, per_block - 1)


@pytest.mark.parametrize("num_blocks,block_size", [(0, 4), (4, 0), (2.5, 4), (True, 4)])
def test_cache_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        PagedKVCache(attention_config(2, 1), num_blocks, block_size)


# Grouped-query heads.

@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (16, 8), (4, 4), (8, 1)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_gqa_head_mapping(num_heads, num_kv_heads, block_size):
    config = attention_config(num_heads, num_kv_heads)
    manager = BlockManager(64, block_size)
    cache = PagedKVCache(config, 64, block_size)
    generator = torch.Generator().manual_seed(num_heads * 100 + block_size)
    # Sequence "p" prefills 9 tokens; "d" decodes its 13th token; "c" sends a second chunk of 5 after 6.
    plan = {"p": (0, 9), "d": (12, 1), "c": (6, 5)}
    full_k = {s: torch.randn(c + n, num_kv_heads, 8, generator=generator) for s, (c, n) in plan.items()}
    full_v = {s: torch.randn(c + n, num_kv_heads, 8, generator=generator) for s, (c, n) in plan.items()}
    for seq_id, (computed, new) in plan.items():
        manager.allocate(seq_id, computed + new)
        if computed:
            cache.write(0, torch.tensor(manager.slots(seq_id, 0, computed)), full_k[seq_id][:computed],
                        full_v[seq_id][:computed])
    metadata = build_step_metadata(manager, [(s, n) for s, (_, n) in plan.items()])
    new_k = torch.cat([full_k[s][c:] for s, (c, _) in plan.items()])
    new_v = torch.cat([full_v[s][c:] for s, (c, _) in plan.items()])
    q = torch.randn(metadata.num_tokens, num_heads, 8, generator=generator)
    out = PagedAttention(cache, metadata).attend(0, q, new_k, new_v)
    for i, seq_id in enumerate(metadata.seq_ids):
        rows = slice(metadata.query_start[i], metadata.query_start[i + 1])
        expected = reference_attention(q[rows], full_k[seq_id], full_v[seq_id], metadata.positions[rows].tolist(),
                                       lambda h: h // (num_heads // num_kv_heads))
        assert (out[rows] - expected).abs().max() < 1e-5


def test_gqa_reference_distinguishes_wrong_mapping():
    """The explicit reference must disagree with a modulo head mapping, or the GQA test could not fail."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 9, 8, generator=generator), torch.randn(5, 3, 8, generator=generator),
               torch.randn(5, 3, 8, generator=generator))
    right = reference_attention(q, k, v, list(range(5)), lambda h: h // 3)
    wrong = reference_attention(q, k, v, list(range(5)), lambda h: h % 3)
    assert (right - wrong).abs().max() > 1e-2


# Step metadata.

def test_metadata_of_mixed_step():
    manager = BlockManager(12, 4)
    manager.allocate("long", 6)
    manager.allocate("decode", 5)
    manager.append_slots("long", 4)
    manager.append_slots("decode", 1)
    manager.allocate("new", 3)
    metadata = build_step_metadata(manager, [("long", 4), ("decode", 1), ("new", 3)])
    assert metadata.query_lens == [4, 1, 3]
    assert metadata.context_lens == [10, 6, 3]
    assert metadata.query_start == [0, 4, 5, 8]
    assert metadata.positions.tolist() == [6, 7, 8, 9, 5, 0, 1, 2]
    expected = []
    for seq_id, start, end in [("long", 6, 10), ("decode", 5, 6), ("new", 0, 3)]:
        table = manager.block_table(seq_id)
        expected += [table[p // 4] * 4 + p % 4 for p in range(start, end)]
    assert metadata.slot_mapping.tolist() == expected
    assert [t.tolist() for t in metadata.block_tables] == [manager.block_table(s) for s in ("long", "decode", "new")]
    assert metadata.last_token_indices.tolist() == [3, 4, 7]


def test_metadata_with_explicit_computed_tokens():
    manager = BlockManager(8, 4)
    manager.allocate("s", 10)  # the whole prompt reserved, computed in chunks
    metadata = build_step_metadata(manager, [("s", 3, 4)])
    assert metadata.positions.tolist() == [4, 5, 6]
    assert metadata.context_lens == [7]
    assert [t.tolist() for t in metadata.block_tables] == [manager.block_table("s")[:2]]


def test_metadata_positions_restart_for_each_sequence():
    """Packed sequences never share a position counter: each starts at 0 on its first token."""
    manager = BlockManager(16, 4)
    for seq_id, length in enumerate((3, 9, 1, 5)):
        manager.allocate(seq_id, length)
    metadata = build_step_metadata(manager, [(s, manager.num_tokens(s)) for s in range(4)])
    assert metadata.positions.tolist() == [0, 1, 2] + list(range(9)) + [0] + list(range(5))


@pytest.mark.parametrize("batch,message", [
    ([], "empty"),
    ([("missing", 1)], "not found in the BlockManager"),
    ([("s", 1), ("s", 1)], "appears twice"),
    ([("s", 0)], "must be an integer >= 1"),
    ([("s", 6)], "num_new_tokens=6 is more than its 5 reserved slots"),
    ([("s", 3, 3)], "need 6 slots"),
    ([("s", 1, -1)], "num_computed_tokens=-1 must be"),
])
def test_metadata_rejects_invalid_batches(batch, message):
    manager = BlockManager(4, 4)
    manager.allocate("s", 5)
    with pytest.raises(ValueError, match=message):
        build_step_metadata(manager, batch)


def test_backend_rejects_mismatched_cache():
    config = attention_config(2, 1)
    manager = BlockManager(8, 4)
    manager.allocate("s", 30)
    metadata = build_step_metadata(manager, [("s", 30)])
    with pytest.raises(ValueError, match="same block_size"):
        PagedAttention(PagedKVCache(config, 8, 8), metadata)
    with pytest.raises(ValueError, match="outside the cache"):
        PagedAttention(PagedKVCache(config, 4, 4), metadata)
    backend = PagedAttention(PagedKVCache(config, 8, 4), metadata)
    with pytest.raises(ValueError, match="packed rows"):
        backend.attend(0, torch.zeros(1, 30, 2, 8), torch.zeros(1, 30, 1, 8), torch.zeros(1, 30, 1, 8))


# The real model.

@pytest.fixture(scope="module")
def contiguous_traces(lm, corpus) -> dict:
    """Contiguous-cache tokens and logits for each boundary prompt length, computed once per module."""
    return {n: contiguous_greedy_trace(lm, corpus[:n], 5) for n in (15, 16, 17, 31, 32, 33)}


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("prompt_len", [15, 16, 17, 31, 32, 33])
def test_paged_matches_contiguous_and_no_cache(lm, corpus, contiguous_traces, block_size, prompt_len):
    """Prompts end one before, on and one after a boundary of B = 4 and B = 16; 5 decodes cross more."""
    prompt = corpus[:prompt_len]
    paged_tokens, paged_rows = paged_greedy_trace(lm.model, prompt, 5, block_size)
    contiguous_tokens, contiguous_rows = contiguous_traces[prompt_len]
    assert paged_tokens == contiguous_tokens
    assert (paged_rows - contiguous_rows).abs().max() < TOLERANCE
    full_rows = no_cache_logits(lm.model, prompt + paged_tokens[:-1])[prompt_len - 1:]
    assert (paged_rows - full_rows).abs().max() < TOLERANCE


def test_paged_decode_matches_full_recomputation(lm, corpus):
    """A 10-token prompt and 20 greedy tokens: every step's logits equal a no-cache pass over the whole sequence."""
    prompt = corpus[:10]
    tokens, rows = paged_greedy_trace(lm.model, prompt, 19, block_size=4)
    # Causal attention makes row t of one pass over the whole sequence equal to a pass over its first t + 1 tokens.
    expected = no_cache_logits(lm.model, prompt + tokens[:-1])[9:]  # [20, vocab]
    assert (rows - expected).abs().max() < TOLERANCE
    assert tokens == expected.argmax(-1).tolist()


def test_paged_prefill_matches_transformers(lm, hf_model, corpus):
    prompts = [corpus[:7], corpus[7:23], corpus[23:56]]
    manager = BlockManager(32, 16)
    cache = PagedKVCache(lm.config, 32, 16)
    for seq_id, prompt in enumerate(prompts):
        manager.allocate(seq_id, len(prompt))
    metadata = build_step_metadata(manager, [(s, len(p)) for s, p in enumerate(prompts)])
    logits = run_paged_step(lm.model, cache, metadata, torch.tensor(sum(prompts, [])))
    for seq_id, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = hf_model(torch.tensor([prompt])).logits[0, -1]
        assert (logits[seq_id] - expected).abs().max() < TOLERANCE


def test_batch_equals_one_by_one(lm, tokenizer):
    questions = ["Hi.", "What is the capital of France?",
                 "Write a short sentence about a cat that sleeps in the sun all afternoon long."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                             add_generation_prompt=True, return_dict=True)["input_ids"]
               for q in questions]
    assert len({len(p) for p in prompts}) == 3
    params = SamplingParams(temperature=0, max_tokens=8)
    together = generate_paged(lm, prompts, params, block_size=16)
    alone = [generate_paged(lm, [p], params, block_size=4)[0] for p in prompts]
    cached = [generate_cached(lm, p, params) for p in prompts]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [g.token_ids for g in together] == [g.token_ids for g in cached]
    assert [g.finish_reason for g in together] == [g.finish_reason for g in cached]


def test_seeded_sampling_matches_contiguous_cache(lm, corpus):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=8, ignore_eos=True)
    prompts = [corpus[:9], corpus[9:30]]
    paged = generate_paged(lm, prompts, params, block_size=4)
    assert [g.token_ids for g in paged] == [generate_cached(lm, p, params).token_ids for p in prompts]


# Random-weight models of other families, against transformers.

@pytest.mark.parametrize("family,num_heads,num_kv_heads", [("llama", 4, 2), ("qwen3", 4, 2), ("qwen3", 6, 3),
                                                           ("qwen2", 4, 1)])
def test_random_model_paged_matches_transformers(family, num_heads, num_kv_heads):
    hf = random_hf_model(family, num_heads, num_kv_heads, tie=False)
    model = ours_from_hf(hf)
    generator = torch.Generator().manual_seed(3)
    sequences = {s: torch.randint(0, 128, (n,), generator=generator).tolist() for s, n in (("a", 21), ("b", 6))}
    manager = BlockManager(16, 4)
    cache = PagedKVCache(model.config, 16, 4)
    # Step 1: "a" sends its first 9 tokens, "b" its whole prompt. Step 2: "a" sends 12 more, "b" one token.
    manager.allocate("a", 9)
    manager.allocate("b", 5)
    first = build_step_metadata(manager, [("a", 9), ("b", 5)])
    run_paged_step(model, cache, first, torch.tensor(sequences["a"][:9] + sequences["b"][:5]))
    manager.append_slots("a", 12)
    manager.append_slots("b", 1)
    second = build_step_metadata(manager, [("b", 1), ("a", 12)])
    logits = run_paged_step(model, cache, second, torch.tensor(sequences["b"][5:] + sequences["a"][9:]))
    with torch.no_grad():
        for row, seq_id in enumerate(("b", "a")):
            expected = hf(torch.tensor([sequences[seq_id]])).logits[0, -1]
            assert (logits[row] - expected).abs().max() < TOLERANCE


@settings(max_examples=20, deadline=None)
@given(block_size=st.sampled_from([1, 2, 3, 4, 8]),
       plans=st.lists(st.lists(st.integers(1, 7), min_size=1, max_size=4), min_size=1, max_size=4))
def test_any_mix_of_chunks_matches_no_cache(tiny_llama, block_size, plans):
    """Each sequence's tokens arrive in chunks (a chunk of 1 is a decode); steps mix all sequences still sending."""
    _, model = tiny_llama
    generator = torch.Generator().manual_seed(sum(map(sum, plans)) + block_size)
    tokens = [torch.randint(0, 128, (sum(plan),), generator=generator).tolist() for plan in plans]
    manager = BlockManager(64, block_size)
    cache = PagedKVCache(model.config, 64, block_size)
    done = [0] * len(plans)
    for step in range(max(len(plan) for plan in plans)):
        batch, ids = [], []
        for seq_id, plan in enumerate(plans):
            if step >= len(plan):
                continue
            if seq_id in manager:
                manager.append_slots(seq_id, plan[step])
            else:
                manager.allocate(seq_id, plan[step])
            batch.append((seq_id, plan[step]))
            ids += tokens[seq_id][done[seq_id]:done[seq_id] + plan[step]]
            done[seq_id] += plan[step]
        metadata = build_step_metadata(manager, batch)
        logits = run_paged_step(model, cache, metadata, torch.tensor(ids))
        for row, (seq_id, _) in enumerate(batch):
            expected = no_cache_logits(model, tokens[seq_id][:done[seq_id]])[-1]
            assert (logits[row] - expected).abs().max() < TOLERANCE


# The generation loop.

def test_blocks_track_token_counts(lm, corpus):
    """B = 4, prompts of 3, 4, 5 and 8 tokens, 6 tokens each: blocks appear only when a token needs one."""
    prompts = [corpus[:n] for n in (3, 4, 5, 8)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (6, 6, 2, 6)]
    observed = []

    def check(metadata, manager, logits):
        assert logits.shape == (metadata.num_seqs, lm.config.vocab_size)
        assert manager.sequences() == metadata.seq_ids  # finished sequences hold no blocks
        for seq_id, context in zip(metadata.seq_ids, metadata.context_lens):
            assert manager.num_tokens(seq_id) == context
            assert len(manager.block_table(seq_id)) == math.ceil(context / 4)
        used_blocks = sum(len(manager.block_table(s)) for s in manager.sequences())
        assert manager.num_free_blocks == manager.num_blocks - used_blocks
        observed.append(list(metadata.context_lens))

    results = generate_paged(lm, prompts, params, block_size=4, on_step=check)
    assert [len(g.token_ids) for g in results] == [6, 6, 2, 6]
    assert observed[0] == [3, 4, 5, 8]
    assert observed[-1] == [8, 9, 13]


def test_kv_tokens_needed():
    assert kv_tokens_needed(10, 1) == 10
    assert kv_tokens_needed(10, 20) == 29


def test_pool_too_small_for_prompts(lm, corpus):
    with pytest.raises(NoFreeBlocksError, match="need 3 blocks"):
        generate_paged(lm, [corpus[:16], corpus[:17]], SamplingParams(temperature=0, max_tokens=4), 16, num_blocks=2)


def test_pool_runs_out_during_decode(lm, corpus):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with pytest.raises(NoFreeBlocksError, match="is full"):
        generate_paged(lm, [corpus[:8]], params, block_size=4, num_blocks=2)
    # The same request fits when the pool holds it at full length: ceil((8 + 8 - 1) / 4) = 4 blocks.
    assert len(generate_paged(lm, [corpus[:8]], params, block_size=4, num_blocks=4)[0].token_ids) == 8


def test_generate_paged_validates_input(lm, corpus):
    params = SamplingParams(temperature=0, max_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        generate_paged(lm, [[]], params)
    with pytest.raises(ValueError, match="No prompts"):
        generate_paged(lm, [], params)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        generate_paged(lm, [corpus[:4]], [params, params])


def test_run_paged_step_checks_input_shape(tiny_llama):
    _, model = tiny_llama
    manager = BlockManager(4, 4)
    manager.allocate("s", 3)
    metadata = build_step_metadata(manager, [("s", 3)])
    with pytest.raises(ValueError, match=r"describes \(3,\) packed tokens"):
        run_paged_step(model, PagedKVCache(model.config, 4, 4), metadata, torch.tensor([[1, 2, 3]]))


def test_cache_keeps_model_dtype(tiny_llama):
    _, model = tiny_llama
    config = dataclasses.replace(model.config)
    cache = PagedKVCache(config, 2, 4, dtype=torch.bfloat16)
    cache.write(0, torch.tensor([0, 5]), torch.ones(2, config.num_kv_heads, config.head_dim),
                torch.ones(2, config.num_kv_heads, config.head_dim))
    assert cache.keys[0].dtype == torch.bfloat16
    assert cache.keys[0][1, 1].eq(1).all()
