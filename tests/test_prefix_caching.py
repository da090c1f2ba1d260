"""Prefix caching: block keys, exact hits under collisions, eviction, and cache-on equals cache-off on the real model.

Tokens are compared exactly and logits with tolerance 1e-4 (float rounding between equivalent computations).
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm_lib import BlockManager, NoFreeBlocksError, SamplingParams
from nanovllm_lib.engine_core import EngineCore
from nanovllm_lib.llm import LLM
from nanovllm_lib.paged_attention import PagedKVCache, build_step_metadata, run_paged_step
from nanovllm_lib.prefix_caching import (PrefixCachingBlockAllocator, PrefixCachingBlockManager,
                                         PrefixCachingEngineCore, PrefixCachingScheduler, block_keys, hash_block)
from nanovllm_lib.scheduler import SchedulerConfig
from nanovllm_lib.sequence import Sequence

TOLERANCE = 1e-4
HASH_FUNCTIONS = {
    "chained": hash_block,
    "constant": lambda parent, tokens: 0,
    "unchained": lambda parent, tokens: hash(tokens),
    "parity": lambda parent, tokens: sum(tokens) % 2,
}


def mark_prefilled(manager, seq_id, token_ids):
    """Play the engine after a prefill: every token of the sequence now has KV."""
    return manager.cache_computed_blocks(seq_id, token_ids, len(token_ids))


def assert_no_block_in_use(manager):
    assert not any(manager.allocator.refcounts())
    assert manager.num_free_blocks == manager.num_blocks
    assert sorted(manager.allocator._free) == list(range(manager.num_blocks))


# Keys and lookups, without a model.

def test_keys_equal_only_inside_shared_prefix():
    a = list(range(40))
    b = list(range(37)) + [99, 98, 97]
    equal = [x == y for x, y in zip(block_keys(a, 8), block_keys(b, 8))]
    assert equal == [True, True, True, True, False]


def test_same_tokens_at_other_position_get_other_key():
    keys = block_keys([7] * 12, 4)
    assert len(set(keys)) == 3


def test_partial_block_has_no_key():
    assert len(block_keys(list(range(11)), 4)) == 2
    assert block_keys([1, 2, 3], 4) == []


@pytest.mark.parametrize("hash_name", sorted(HASH_FUNCTIONS))
def test_identical_second_blocks_never_shared(hash_name):
    manager = PrefixCachingBlockManager(8, 4, hash_function=HASH_FUNCTIONS[hash_name])
    first, second = [1, 2, 3, 4, 9, 9, 9, 9], [5, 6, 7, 8, 9, 9, 9, 9]
    manager.allocate_cached("first", first + [0])
    mark_prefilled(manager, "first", first + [0])
    assert manager.match_prefix(second) == []
    assert manager.allocate_cached("second", second + [0]) == 0
    assert set(manager.block_table("second")).isdisjoint(manager.block_table("first"))
    assert [e.block_id for e in manager.match_prefix(first)] == manager.block_table("first")[:2]


def test_hit_confirmed_against_stored_tokens():
    manager = PrefixCachingBlockManager(8, 4, hash_function=lambda parent, tokens: 0)
    manager.allocate_cached("a", [1, 2, 3, 4, 0])
    mark_prefilled(manager, "a", [1, 2, 3, 4, 0])
    assert manager.match_prefix([1, 2, 3, 5]) == []
    assert len(manager.match_prefix([1, 2, 3, 4])) == 1


def test_child_of_evicted_parent_not_matched():
    # Constant keys. T computes the same first block as A at the same time, so T's second block is cached with A's
    # first block as parent. A's blocks are then evicted while T still holds its second block, and a different
    # first block takes the (shared) key: T's second block must not match behind it.
    manager = PrefixCachingBlockManager(8, 2, hash_function=lambda parent, tokens: 0)
    manager.allocate_cached("A", [1, 1, 2, 2, 0])
    manager.allocate_cached("T", [1, 1, 3, 3, 0])
    mark_prefilled(manager, "A", [1, 1, 2, 2, 0])
    mark_prefilled(manager, "T", [1, 1, 3, 3, 0])
    t_second = manager.block_table("T")[1]
    assert manager.allocator.entry(t_second) is not None
    manager.free("A")
    manager.allocate_cached("B", [5, 5, 3, 3, 6, 6, 7, 7, 0])  # takes every free block, evicting A's
    assert manager.allocator.num_evictions == 2
    mark_prefilled(manager, "B", [5, 5, 3, 3, 6, 6, 7, 7, 0])
    matched = manager.match_prefix([5, 5, 3, 3])
    assert [e.block_id for e in matched] == manager.block_table("B")[:2]
    assert t_second not in [e.block_id for e in matched]
    assert manager.match_prefix([1, 1, 3, 3]) == []


def test_block_registered_only_when_kv_computed():
    manager = PrefixCachingBlockManager(8, 4)
    tokens = [5, 6, 7, 8, 9, 10]
    manager.allocate_cached("s", tokens)
    assert manager.cache_computed_blocks("s", tokens, 3) == 0
    assert manager.allocator.num_cached == 0
    assert manager.cache_computed_blocks("s", tokens, 4) == 1
    assert manager.cache_computed_blocks("s", tokens, 6) == 0  # the second block is not full yet
    manager.append_slots("s", 2)
    tokens += [11, 12]
    assert manager.cache_computed_blocks("s", tokens, 7) == 0  # position 7 reserved but not computed
    assert manager.cache_computed_blocks("s", tokens, 8) == 1


def test_cache_computed_rejects_more_than_reserved():
    manager = PrefixCachingBlockManager(8, 4)
    manager.allocate_cached("s", [1, 2, 3])
    with pytest.raises(ValueError, match="exceeds"):
        manager.cache_computed_blocks("s", [1, 2, 3, 4], 4)


@pytest.mark.parametrize("length", [1, 3, 4, 5, 7, 8, 9, 12, 13])
def test_last_token_always_left_to_compute(length):
    manager = PrefixCachingBlockManager(16, 4)
    tokens = list(range(100, 100 + length))
    manager.allocate_cached("warm", tokens + [1, 2, 3, 4])
    mark_prefilled(manager, "warm", tokens + [1, 2, 3, 4])
    hit = manager.allocate_cached("again", tokens)
    assert hit == (length - 1) // 4 * 4
    assert hit < length


def test_shared_blocks_counted_per_owner():
    manager = PrefixCachingBlockManager(8, 4)
    system = list(range(8))
    manager.allocate_cached("a", system + [1])
    mark_prefilled(manager, "a", system + [1])
    assert manager.allocate_cached("b", system + [2, 3]) == 8
    assert manager.allocate_cached("c", system + [4]) == 8
    shared = manager.block_table("a")[:2]
    assert manager.block_table("b")[:2] == shared == manager.block_table("c")[:2]
    assert [manager.allocator.refcount(b) for b in shared] == [3, 3]
    for name in ["a", "b", "c"]:
        manager.free(name)
    assert_no_block_in_use(manager)
    assert manager.allocator.num_evictable == 2


def test_failed_allocation_changes_nothing():
    manager = PrefixCachingBlockManager(3, 4)
    manager.allocate_cached("a", list(range(8)) + [1])
    mark_prefilled(manager, "a", list(range(8)) + [1])
    manager.free("a")
    manager.allocate_cached("b", [50, 51, 52])  # holds one block; two cached blocks are evictable
    state = (list(manager.allocator._free), manager.allocator.refcounts(), manager.allocator.num_cached)
    with pytest.raises(NoFreeBlocksError):
        manager.allocate_cached("c", list(range(40, 52)))  # 3 new blocks, 2 free
    assert (list(manager.allocator._free), manager.allocator.refcounts(), manager.allocator.num_cached) == state
    assert "c" not in manager


def test_eviction_removes_key():
    # Pool of 2 blocks, B = 4: X caches block 0, an unrelated 8-token Y takes both blocks, then X's prefix misses.
    manager = PrefixCachingBlockManager(2, 4)
    prompt = [1, 2, 3, 4]
    manager.allocate_cached("X", prompt + [5])
    mark_prefilled(manager, "X", prompt + [5])
    cached_block = manager.block_table("X")[0]
    manager.free("X")
    manager.allocate_cached("Y", [9, 9, 9, 9, 8, 8, 8, 8])
    assert cached_block in manager.block_table("Y")
    assert manager.allocator.refcount(cached_block) == 1
    assert manager.allocator.entry(cached_block) is None
    assert manager.allocator.num_evictions == 1
    assert manager.match_prefix(prompt) == []
    assert manager.allocator._buckets == {}


def test_lru_evicts_least_recently_freed_cached_block():
    manager = PrefixCachingBlockManager(4, 2)
    for name, tokens in [("old", [1, 1, 0]), ("new", [2, 2, 0])]:
        manager.allocate_cached(name, tokens)
        mark_prefilled(manager, name, tokens)
    old_block, new_block = manager.block_table("old")[0], manager.block_table("new")[0]
    manager.free("old")
    manager.free("new")
    manager.allocate_cached("filler", [5, 5, 5, 5, 5, 5])  # 3 blocks, taken in the order they were freed
    assert manager.allocator.entry(old_block) is None
    assert manager.allocator.entry(new_block) is not None
    assert len(manager.match_prefix([2, 2])) == 1


def test_share_revives_evictable_block():
    allocator = PrefixCachingBlockAllocator(3)
    block = allocator.allocate()
    allocator.cache(block, 1, (1, 2), None)
    allocator.decref(block)
    assert block in allocator._free
    allocator.share(block)
    assert block not in allocator._free
    assert allocator.refcount(block) == 1
    with pytest.raises(ValueError, match="not cached"):
        allocator.share(allocator.allocate())


def test_cache_rejects_free_or_already_cached_block():
    allocator = PrefixCachingBlockAllocator(2)
    with pytest.raises(ValueError, match="free"):
        allocator.cache(0, 1, (1,), None)
    block = allocator.allocate()
    allocator.cache(block, 1, (1,), None)
    with pytest.raises(ValueError, match="already cached"):
        allocator.cache(block, 2, (2,), None)


def test_double_free_rejected_with_cache():
    manager = PrefixCachingBlockManager(4, 2)
    manager.allocate_cached("a", [1, 2, 3])
    mark_prefilled(manager, "a", [1, 2, 3])
    block = manager.block_table("a")[0]
    manager.free("a")
    with pytest.raises(KeyError):
        manager.free("a")
    with pytest.raises(ValueError, match="already free"):
        manager.allocator.decref(block)


def test_scheduler_needs_prefix_caching_manager():
    with pytest.raises(ValueError, match="PrefixCachingBlockManager"):
        PrefixCachingScheduler(SchedulerConfig(4, 64, 64), BlockManager(8, 4))


# Many requests through the scheduler, without a model.

def fake_engine_step(scheduler, rng, eos_probability):
    """Play the engine: compute scheduled tokens, register blocks, append one token, finish some sequences."""
    batch = scheduler.schedule()
    manager = scheduler.block_manager
    for sequence, count in zip(batch.sequences, batch.num_new_tokens):
        assert count == sequence.num_tokens - sequence.num_computed_tokens
        assert count >= 1
        for position in range(sequence.num_computed_tokens, sequence.num_tokens):
            block = manager.block_table(sequence.seq_id)[position // manager.block_size]
            assert manager.allocator.refcount(block) == 1, "a sequence writes into a shared block"
            assert manager.allocator.entry(block) is None, "a sequence writes into a cached block"
        sequence.num_computed_tokens += count
        manager.cache_computed_blocks(sequence.seq_id, sequence.token_ids, sequence.num_computed_tokens)
        sequence.output_token_ids.append(rng.randrange(50))
        done = len(sequence.output_token_ids) >= sequence.params.max_tokens or rng.random() < eos_probability
        if done or sequence.num_tokens >= scheduler.config.max_model_len:
            scheduler.finish(sequence, "length" if not done else "stop")


def assert_refcounts_match_tables(manager):
    expected = [0] * manager.num_blocks
    for seq_id in manager.sequences():
        for block in manager.block_table(seq_id):
            expected[block] += 1
    assert manager.allocator.refcounts() == expected
    assert sorted(manager.allocator._free) == [b for b in range(manager.num_blocks) if expected[b] == 0]


@pytest.mark.parametrize("block_size", [4, 16])
def test_200_requests_return_every_block(block_size):
    rng = random.Random(block_size)
    manager = PrefixCachingBlockManager(24, block_size)
    scheduler = PrefixCachingScheduler(SchedulerConfig(4, 1024, 8 * block_size), manager)
    prefixes = [[rng.randrange(1000) for _ in range(2 * block_size)] for _ in range(3)]
    offsets = [-1, 0, 1]
    for index in range(200):
        prefix = rng.choice(prefixes)[: rng.randrange(1, 2 * block_size + 1)]
        length = max(1, rng.choice([block_size, 2 * block_size, 3 * block_size]) + rng.choice(offsets))
        prompt = (prefix + [rng.randrange(1000) for _ in range(length)])[:length]
        params = SamplingParams(max_tokens=rng.randrange(1, 3 * block_size), ignore_eos=True)
        scheduler.add(Sequence(f"r{index}", prompt, params))
        if index % 3 == 2 or index == 199:
            while scheduler.has_unfinished():
                fake_engine_step(scheduler, rng, eos_probability=0.05)
                assert_refcounts_match_tables(manager)
    assert manager.num_hit_tokens > 0
    assert_no_block_in_use(manager)


# Property test: random operations against a model of what each block's KV was computed from.

OPERATIONS = st.lists(
    st.tuples(st.sampled_from(["admit", "compute", "grow", "free"]), st.integers(0, 10**6)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(operations=OPERATIONS, hash_name=st.sampled_from(sorted(HASH_FUNCTIONS)), num_blocks=st.integers(3, 10),
       block_size=st.sampled_from([1, 2, 3]))
def test_hits_are_exact_and_bookkeeping_holds(operations, hash_name, num_blocks, block_size):
    manager = PrefixCachingBlockManager(num_blocks, block_size, hash_function=HASH_FUNCTIONS[hash_name])
    kv_source: dict[int, tuple[int, ...]] = {}  # block id -> the tokens up to its end when its KV was computed
    tokens: dict[str, list[int]] = {}
    num_computed: dict[str, int] = {}
    evictions_at_admission: dict[str, int] = {}
    names = iter(range(10**6))
    for operation, seed in operations:
        rng = random.Random(seed)
        running = sorted(tokens)
        if operation == "admit":
            name = f"s{next(names)}"
            # Few distinct tokens, so that prefixes repeat and keys collide often.
            prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 3 * block_size + 2))]
            free_before = list(manager.allocator._free)
            try:
                hit = manager.allocate_cached(name, prompt)
            except NoFreeBlocksError:
                assert list(manager.allocator._free) == free_before
                continue
            assert hit % block_size == 0
            assert hit < len(prompt)
            table = manager.block_table(name)
            for index in range(hit // block_size):
                assert kv_source[table[index]] == tuple(prompt[:(index + 1) * block_size]), "hit on the wrong KV"
            new_blocks = table[hit // block_size:]
            plain_front = [b for b in free_before if b not in table[:hit // block_size]]
            assert new_blocks == plain_front[:len(new_blocks)], "allocation did not take the least recently freed"
            for block in new_blocks:
                kv_source.pop(block, None)
            tokens[name], num_computed[name] = prompt, hit
            evictions_at_admission[name] = manager.allocator.num_evictions
        elif operation == "compute" and running:
            name = rng.choice(running)
            target = rng.randrange(num_computed[name], len(tokens[name]) + 1)
            table = manager.block_table(name)
            for position in range(num_computed[name], target):
                block = table[position // block_size]
                assert manager.allocator.refcount(block) == 1
                assert manager.allocator.entry(block) is None
                if (position + 1) % block_size == 0:
                    kv_source[block] = tuple(tokens[name][:position + 1])
            num_computed[name] = target
            manager.cache_computed_blocks(name, tokens[name], target)
            if manager.allocator.num_evictions == evictions_at_admission[name]:  # its cached blocks are all intact
                full = target // block_size
                assert len(manager.match_prefix(tokens[name][:full * block_size])) == full
        elif operation == "grow" and running:
            name = rng.choice(running)
            if manager.can_append(name, 1):
                manager.append_slots(name, 1)
                tokens[name].append(rng.randrange(3))
        elif operation == "free" and running:
            name = rng.choice(running)
            manager.free(name)
            del tokens[name], num_computed[name]
        assert_refcounts_match_tables(manager)
        for entry in manager.allocator.cached_blocks():
            assert kv_source[entry.block_id][-block_size:] == entry.token_ids
    for name in list(tokens):
        manager.free(name)
    assert_no_block_in_use(manager)


# The real model.

def greedy(max_tokens, ignore_eos=True):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos)


def run_one_by_one(lm, core_class, prompts, max_tokens, num_blocks=64, block_size=4):
    """Run prompts one after another through one engine; return (outputs, tokens found in the cache per prompt, core)."""
    core = core_class(lm, num_blocks, block_size, SchedulerConfig(4, 1024, 1024))
    outputs, hits = [], []
    for index, prompt in enumerate(prompts):
        before = getattr(core.block_manager, "num_hit_tokens", 0)
        sequence = Sequence(f"r{index}", list(prompt), greedy(max_tokens))
        core.run([sequence])
        outputs.append(sequence.output_token_ids)
        hits.append(getattr(core.block_manager, "num_hit_tokens", 0) - before)
    return outputs, hits, core


@pytest.fixture(scope="module")
def text_ids(tokenizer):
    ids = tokenizer("The river carried the boat past the mill, the church and the old stone bridge, where children "
                    "waved at the boatman every single morning of the summer. In autumn the water rose, the mill "
                    "stopped, and the boatman told stories of floods he had seen as a boy. Nobody believed the one "
                    "about the flying fish.")["input_ids"]
    assert len(ids) >= 60
    return ids


@pytest.mark.parametrize("length", [4, 5, 7, 8, 9, 12])
def test_prompt_fully_covered_by_cache(lm, text_ids, length):
    prompt = text_ids[:length]
    outputs, hits, core = run_one_by_one(lm, PrefixCachingEngineCore, [prompt, prompt], max_tokens=5)
    assert outputs[0] == outputs[1]
    assert hits[1] == (length - 1) // 4 * 4
    assert_no_block_in_use(core.block_manager)


def test_shared_part_around_block_boundary_matches_cache_off(lm, text_ids):
    base = text_ids[:16]
    tail = text_ids[20:26]
    # Shared with an earlier prompt: 16 tokens (on a boundary), 15 (one before), 17 (one after), then fully covered.
    prompts = [base + tail, base + text_ids[30:33], base[:-1] + [text_ids[40]] + tail,
               base + tail[:1] + text_ids[41:45], base, base[:-1], base[:13]]
    plain, _, _ = run_one_by_one(lm, EngineCore, prompts, max_tokens=6)
    cached, hits, core = run_one_by_one(lm, PrefixCachingEngineCore, prompts, max_tokens=6)
    assert cached == plain
    assert hits == [0, 16, 12, 16, 12, 12, 12]
    assert_no_block_in_use(core.block_manager)


@pytest.mark.parametrize("second_len", [4, 8])
def test_evicted_prefix_is_miss_or_intact_hit(lm, text_ids, second_len):
    # Pool of 2 blocks, B = 4. An unrelated 8-token prompt reuses both blocks; a 4-token one leaves block 0 intact.
    x_prompt = text_ids[:5]
    prompts = [x_prompt, text_ids[40:40 + second_len], x_prompt]
    plain, _, _ = run_one_by_one(lm, EngineCore, prompts, max_tokens=1, num_blocks=2)
    cached, hits, core = run_one_by_one(lm, PrefixCachingEngineCore, prompts, max_tokens=1, num_blocks=2)
    assert cached == plain
    assert hits[2] == (0 if second_len == 8 else 4)
    assert_no_block_in_use(core.block_manager)


def test_mixed_hit_and_miss_in_one_step(lm, text_ids):
    a = text_ids[:12]
    a_prime = a[:8] + text_ids[30:33]
    c = text_ids[50:57]
    expected, _, _ = run_one_by_one(lm, EngineCore, [a_prime, c], max_tokens=6)
    core = PrefixCachingEngineCore(lm, 32, 4, SchedulerConfig(4, 1024, 1024))
    core.run([Sequence("A", a, greedy(1))])
    a_blocks = [e.block_id for e in core.block_manager.match_prefix(a[:8])]
    sequences = [Sequence("A'", a_prime, greedy(6)), Sequence("C", c, greedy(6))]
    for sequence in sequences:
        core.add(sequence)
    core.step()
    assert core.stats.steps[-1].seq_ids == ["A'", "C"]
    assert core.stats.steps[-1].num_new_tokens == [3, 7]
    table_a, table_c = core.block_manager.block_table("A'"), core.block_manager.block_table("C")
    assert table_a[:2] == a_blocks
    assert len(table_a) == 3
    assert len(table_c) == 2
    assert len(set(table_a[2:]) | set(table_c) | set(a_blocks)) == 5
    while core.has_unfinished():
        core.step()
    assert [s.output_token_ids for s in sequences] == expected


def test_block_completed_by_unfed_token_never_cached(lm):
    # B = 16: 15 copies of one token plus the generated token would fill block 0, but that token has no KV.
    token = 1234
    core = PrefixCachingEngineCore(lm, 16, 16, SchedulerConfig(4, 1024, 1024))
    first = Sequence("first", [token] * 15, greedy(1))
    core.run([first])
    generated = first.output_token_ids[0]
    assert core.block_manager.allocator.num_cached == 0
    other = 3 if generated != 3 else 4
    prompts = [[token] * 15 + [other] + [5, 6, 7], [token] * 15 + [generated] + [5, 6, 7]]
    plain, _, _ = run_one_by_one(lm, EngineCore, prompts, max_tokens=4, num_blocks=16, block_size=16)
    sequences = [Sequence(f"s{i}", p, greedy(4)) for i, p in enumerate(prompts)]
    hits = []
    for sequence in sequences:
        before = core.block_manager.num_hit_tokens
        core.run([sequence])
        hits.append(core.block_manager.num_hit_tokens - before)
    assert hits == [0, 0]
    assert [s.output_token_ids for s in sequences] == plain


def test_resumed_prefill_logits_match_full_prefill(lm, tokenizer):
    system = ("You are a patient tutor for a class of twelve-year-olds. Explain every idea with a small example "
              "from daily life, avoid jargon, and end each answer with one short question that checks understanding.")

    def chat(question):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])

    q1, q2 = chat("Why is the sky blue?"), chat("What is a fraction?")
    manager = PrefixCachingBlockManager(32, 16)
    cache = PagedKVCache(lm.config, 32, 16)
    manager.allocate_cached("q1", q1)
    run_paged_step(lm.model, cache, build_step_metadata(manager, [("q1", len(q1), 0)]), torch.tensor(q1))
    manager.cache_computed_blocks("q1", q1, len(q1))
    hit = manager.allocate_cached("q2", q2)
    assert hit >= 32
    metadata = build_step_metadata(manager, [("q2", len(q2) - hit, hit)])
    assert metadata.positions.tolist() == list(range(hit, len(q2)))
    resumed = run_paged_step(lm.model, cache, metadata, torch.tensor(q2[hit:]))[0]
    fresh = BlockManager(32, 16)
    fresh.allocate("q2", len(q2))
    full = run_paged_step(lm.model, PagedKVCache(lm.config, 32, 16), build_step_metadata(fresh, [("q2", len(q2))]),
                          torch.tensor(q2))[0]
    assert torch.allclose(resumed, full, atol=TOLERANCE)

    plain, _, _ = run_one_by_one(lm, EngineCore, [q1, q2], max_tokens=32, block_size=16)
    cached, hits, _ = run_one_by_one(lm, PrefixCachingEngineCore, [q1, q2], max_tokens=32, block_size=16)
    assert cached == plain
    assert hits[1] >= 32


def test_preemption_with_cache_keeps_outputs(lm, text_ids):
    prompts = [text_ids[:10], text_ids[:10] + text_ids[20:23], text_ids[30:41]]
    params = greedy(20)
    expected, _, _ = run_one_by_one(lm, EngineCore, prompts, max_tokens=20)
    core = PrefixCachingEngineCore(lm, 12, 4, SchedulerConfig(3, 1024, 64))
    sequences = [Sequence(f"p{i}", p, params) for i, p in enumerate(prompts)]
    core.run(sequences)
    assert core.stats.num_preemptions >= 1
    assert [s.output_token_ids for s in sequences] == expected
    assert_no_block_in_use(core.block_manager)


# Through the public API.

@pytest.fixture(scope="module")
def chat_prompts(tokenizer):
    system = ("You answer questions about the solar system for a museum. Keep answers to two sentences and give "
              "one number in each answer. Planets in order: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus, "
              "Neptune.")
    questions = ["Which planet is largest?", "How far is Mars?", "Which planet has rings?", "Is Pluto a planet?"]
    return [{"prompt_token_ids": list(tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": q}], tokenize=True,
        add_generation_prompt=True, return_dict=True)["input_ids"])} for q in questions]


def test_llm_with_cache_equals_without(chat_prompts):
    params = SamplingParams(temperature=0, max_tokens=12)
    results = {}
    for enabled in (False, True):
        llm = LLM(enable_prefix_caching=enabled, num_kv_blocks=64, block_size=16)
        first = llm.generate(chat_prompts[:1], params, use_tqdm=False)
        rest = llm.generate(chat_prompts[1:], params, use_tqdm=False)
        results[enabled] = [o.outputs[0].token_ids for o in first + rest]
        core = llm.engine.core
        assert_no_block_in_use(core.block_manager)
        if enabled:
            assert isinstance(core, PrefixCachingEngineCore)
            assert core.block_manager.num_hit_tokens >= 3 * 48
    assert results[True] == results[False]
