"""Tests for the block allocator and block manager of chapter 04 (nanovllm_lib.block_manager)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nanovllm_lib.block_manager import BlockAllocator, BlockManager, NoFreeBlocksError


def observable_state(manager: BlockManager) -> dict:
    """Everything a caller can observe about a manager, for before/after comparisons."""
    return {
        "tables": {s: manager.block_table(s) for s in manager.sequences()},
        "tokens": {s: manager.num_tokens(s) for s in manager.sequences()},
        "refcounts": manager.allocator.refcounts(),
        "free": manager.num_free_blocks,
    }


def assert_consistent(manager: BlockManager, extra_owners: dict[int, int] | None = None) -> None:
    """Check the manager's invariants from its public methods only."""
    extra_owners = extra_owners or {}
    owners = dict(extra_owners)
    for seq_id in manager.sequences():
        table = manager.block_table(seq_id)
        n = manager.num_tokens(seq_id)
        assert len(table) == math.ceil(n / manager.block_size), (seq_id, table, n)
        assert len(set(table)) == len(table), f"{seq_id} lists a block twice: {table}"
        for block_id in table:
            owners[block_id] = owners.get(block_id, 0) + 1
    refcounts = manager.allocator.refcounts()
    for block_id in range(manager.num_blocks):
        assert refcounts[block_id] == owners.get(block_id, 0), (block_id, refcounts[block_id], owners.get(block_id))
    assert manager.num_free_blocks == sum(1 for count in refcounts if count == 0)


# BlockAllocator


@pytest.mark.parametrize("num_blocks", [0, -1, 1.5, "3", None, True])
def test_allocator_rejects_invalid_size(num_blocks):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(num_blocks)


def test_allocator_hands_out_every_block_once():
    allocator = BlockAllocator(5)
    taken = [allocator.allocate() for _ in range(5)]
    assert sorted(taken) == [0, 1, 2, 3, 4]
    assert allocator.num_free == 0
    assert allocator.num_used == 5
    assert all(allocator.refcount(b) == 1 for b in taken)
    with pytest.raises(NoFreeBlocksError):
        allocator.allocate()
    assert allocator.num_free == 0


def test_allocator_refcounts_shared_block():
    allocator = BlockAllocator(2)
    block = allocator.allocate()
    allocator.incref(block)
    allocator.incref(block)
    assert allocator.refcount(block) == 3
    assert allocator.decref(block) is False
    assert allocator.decref(block) is False
    assert allocator.num_free == 1
    assert allocator.decref(block) is True
    assert allocator.refcount(block) == 0
    assert allocator.num_free == 2


def test_allocator_rejects_double_free():
    allocator = BlockAllocator(3)
    block = allocator.allocate()
    allocator.decref(block)
    with pytest.raises(ValueError, match="already free"):
        allocator.decref(block)
    assert allocator.num_free == 3


def test_allocator_rejects_incref_of_free_block():
    allocator = BlockAllocator(3)
    with pytest.raises(ValueError, match="is free"):
        allocator.incref(1)
    assert allocator.refcount(1) == 0


@pytest.mark.parametrize("block_id", [-1, 3, 100, 1.0, "0", True])
def test_allocator_rejects_invalid_block_id(block_id):
    allocator = BlockAllocator(3)
    for method in (allocator.incref, allocator.decref, allocator.refcount):
        with pytest.raises(ValueError, match="[Bb]lock id"):
            method(block_id)


def test_allocator_reuses_oldest_freed_block_first():
    allocator = BlockAllocator(3)
    a, b, c = (allocator.allocate() for _ in range(3))
    allocator.decref(b)
    allocator.decref(a)
    assert allocator.allocate() == b
    assert allocator.allocate() == a


# BlockManager: arguments and errors


@pytest.mark.parametrize("block_size", [0, -4, 2.5, None])
def test_manager_rejects_invalid_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, block_size)


@pytest.mark.parametrize("num_tokens,expected", [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_needed_is_ceiling(num_tokens, expected):
    assert BlockManager(4, 4).blocks_needed(num_tokens) == expected


def test_allocate_rejects_duplicate_sequence():
    manager = BlockManager(8, 4)
    manager.allocate("x", 5)
    before = observable_state(manager)
    with pytest.raises(ValueError, match="already allocated"):
        manager.allocate("x", 3)
    assert observable_state(manager) == before


@pytest.mark.parametrize("num_tokens", [0, -1, 2.0])
def test_allocate_rejects_invalid_length(num_tokens):
    manager = BlockManager(8, 4)
    with pytest.raises(ValueError, match="num_tokens"):
        manager.allocate("x", num_tokens)
    assert "x" not in manager
    assert manager.num_free_blocks == 8


def test_unknown_sequence_raises_key_error():
    manager = BlockManager(8, 4)
    calls = [
        lambda: manager.free("ghost"),
        lambda: manager.num_tokens("ghost"),
        lambda: manager.block_table("ghost"),
        lambda: manager.slot("ghost", 0),
        lambda: manager.slots("ghost", 0, 0),
        lambda: manager.append_slots("ghost"),
        lambda: manager.can_append("ghost"),
    ]
    for call in calls:
        with pytest.raises(KeyError, match="ghost"):
            call()


def test_free_twice_raises():
    manager = BlockManager(8, 4)
    manager.allocate("x", 9)
    manager.free("x")
    with pytest.raises(KeyError, match="already been freed"):
        manager.free("x")
    assert manager.num_free_blocks == 8
    assert manager.allocator.refcounts() == [0] * 8


def test_block_table_is_a_copy():
    manager = BlockManager(8, 4)
    manager.allocate("x", 6)
    table = manager.block_table("x")
    table.append(7)
    assert manager.block_table("x") == table[:-1]


def test_slot_rejects_positions_without_kv():
    manager = BlockManager(8, 4)
    manager.allocate("x", 6)
    assert manager.slot("x", 5) == manager.block_table("x")[1] * 4 + 1
    for position in (6, 100, -1):
        with pytest.raises(ValueError, match="position|Position"):
            manager.slot("x", position)


@pytest.mark.parametrize("start,end", [(-1, 2), (3, 2), (0, 7)])
def test_slots_rejects_invalid_range(start, end):
    manager = BlockManager(8, 4)
    manager.allocate("x", 6)
    with pytest.raises(ValueError):
        manager.slots("x", start, end)


def test_append_zero_tokens_changes_nothing():
    manager = BlockManager(8, 4)
    manager.allocate("x", 4)
    before = observable_state(manager)
    manager.append_slots("x", 0)
    assert observable_state(manager) == before


def test_sequence_ids_can_be_any_hashable():
    manager = BlockManager(8, 2)
    for seq_id in (0, "a", ("req", 1)):
        manager.allocate(seq_id, 3)
    assert manager.sequences() == [0, "a", ("req", 1)]
    assert ("req", 1) in manager
    manager.free(("req", 1))
    assert ("req", 1) not in manager


# Crossing block boundaries during decode (B = 4; prompts 3, 4, 5, 8; six decode steps)


@pytest.mark.parametrize("prompt_len", [3, 4, 5, 8])
def test_decode_crosses_block_boundaries(prompt_len):
    block_size = 4
    manager = BlockManager(16, block_size)
    manager.allocate("s", prompt_len)
    assert len(manager.block_table("s")) == math.ceil(prompt_len / block_size)
    for step in range(6):
        position = manager.num_tokens("s")  # the last sampled token's position
        blocks_before = len(manager.block_table("s"))
        manager.append_slots("s", 1)
        table = manager.block_table("s")
        assert manager.num_tokens("s") == prompt_len + step + 1
        assert len(table) == math.ceil(manager.num_tokens("s") / block_size)
        # a block is added exactly when the position starts a new logical block
        assert (len(table) > blocks_before) == (position % block_size == 0)
        slot = manager.slot("s", position)
        assert slot // block_size == table[position // block_size]
        assert slot % block_size == position % block_size


@settings(max_examples=150, deadline=None)
@given(
    block_size=st.integers(1, 9),
    prompt_len=st.integers(1, 40),
    appends=st.lists(st.integers(0, 7), max_size=12),
)
def test_table_length_and_slots_follow_tokens(block_size, prompt_len, appends):
    manager = BlockManager(128, block_size)  # room for 40 + 12 * 7 tokens even at block_size 1
    manager.allocate("s", prompt_len)
    for count in appends:
        manager.append_slots("s", count)
        n = manager.num_tokens("s")
        table = manager.block_table("s")
        assert len(table) == math.ceil(n / block_size)
        slots = manager.slots("s", 0, n)
        assert slots == [table[p // block_size] * block_size + p % block_size for p in range(n)]
        assert slots == [manager.slot("s", p) for p in range(n)]
    assert manager.num_tokens("s") == prompt_len + sum(appends)


# Failed allocation changes nothing (pool of 3 blocks, B = 4)


def test_failed_decode_append_changes_nothing():
    manager = BlockManager(num_blocks=3, block_size=4)
    manager.allocate("long", 7)  # 2 blocks
    manager.allocate("short", 3)  # 1 block
    manager.append_slots("long")  # 8 tokens: still 2 blocks
    manager.append_slots("short")  # 4 tokens: still 1 block
    before = observable_state(manager)
    assert not manager.can_append("long")
    with pytest.raises(NoFreeBlocksError):
        manager.append_slots("long")
    assert observable_state(manager) == before
    with pytest.raises(NoFreeBlocksError):
        manager.append_slots("short", 5)
    assert observable_state(manager) == before
    # preempting the short sequence returns exactly its block, and the long one can grow
    short_blocks = manager.block_table("short")
    manager.free("short")
    assert manager.num_free_blocks == 1
    assert all(manager.allocator.refcount(b) == 0 for b in short_blocks)
    manager.append_slots("long")
    assert manager.block_table("long")[-1] == short_blocks[0]
    assert_consistent(manager)


def test_failed_prompt_allocation_changes_nothing():
    manager = BlockManager(num_blocks=3, block_size=4)
    manager.allocate("a", 5)  # 2 blocks, 1 free
    before = observable_state(manager)
    assert not manager.can_allocate(5)
    with pytest.raises(NoFreeBlocksError):
        manager.allocate("b", 5)
    assert "b" not in manager
    assert observable_state(manager) == before
    assert manager.can_allocate(4)
    manager.allocate("b", 4)
    assert manager.num_free_blocks == 0


# Many requests in sequence: nothing leaks, nothing is freed twice


def test_many_requests_return_every_block():
    block_size = 4
    manager = BlockManager(num_blocks=40, block_size=block_size)
    rng = random.Random(0)
    remaining: dict[int, int] = {}  # request id -> output tokens still to sample
    final_tokens: dict[int, int] = {}  # request id -> tokens with KV when it finishes

    def growth_still_needed() -> int:
        return sum(manager.blocks_needed(final_tokens[s]) - len(manager.block_table(s)) for s in remaining)

    def step_all() -> None:
        for seq_id in list(remaining):
            if remaining[seq_id] == 0:
                manager.free(seq_id)
                del remaining[seq_id]
            else:
                manager.append_slots(seq_id)
                remaining[seq_id] -= 1

    for request_id in range(200):
        # prompt lengths on a block boundary, one past it, one before it, or anywhere
        boundary = block_size * rng.randint(1, 6)
        prompt_len = rng.choice([boundary, boundary + 1, boundary - 1, rng.randint(1, 30)])
        max_tokens = rng.randint(1, 12)
        # some requests stop early, as on EOS
        output_len = max_tokens if rng.random() < 0.5 else rng.randint(1, max_tokens)
        final_tokens[request_id] = prompt_len + output_len - 1  # the last sampled token never gets KV
        # admit only when every running request can still grow to its end
        while manager.num_free_blocks - growth_still_needed() < manager.blocks_needed(final_tokens[request_id]):
            step_all()
        manager.allocate(request_id, prompt_len)
        remaining[request_id] = output_len - 1  # the prefill samples the first token
        assert_consistent(manager)
    while remaining:
        step_all()
        assert_consistent(manager)
    assert manager.sequences() == []
    assert manager.num_free_blocks == manager.num_blocks
    assert manager.allocator.refcounts() == [0] * manager.num_blocks
    with pytest.raises(ValueError, match="already free"):
        manager.allocator.decref(0)


# The slots address a real tensor pool: interleaved sequences never overwrite each other


def test_pool_writes_and_reads_back_interleaved_sequences():
    block_size, num_blocks, heads, dim = 4, 12, 3, 8
    pool = torch.zeros(num_blocks, block_size, heads, dim)  # [blocks, B, Hkv, d]
    flat = pool.view(num_blocks * block_size, heads, dim)  # [slots, Hkv, d]
    manager = BlockManager(num_blocks, block_size)
    generator = torch.Generator().manual_seed(0)
    lengths = {"a": 13, "b": 7, "c": 17}
    keys = {s: torch.randn(n, heads, dim, generator=generator) for s, n in lengths.items()}
    for seq_id in keys:
        manager.allocate(seq_id, 2)
        flat[manager.slots(seq_id, 0, 2)] = keys[seq_id][:2]
    while any(manager.num_tokens(s) < lengths[s] for s in keys):
        for seq_id in keys:
            position = manager.num_tokens(seq_id)
            if position < lengths[seq_id]:
                manager.append_slots(seq_id)
                flat[manager.slot(seq_id, position)] = keys[seq_id][position]
    all_slots = [slot for s in keys for slot in manager.slots(s, 0, lengths[s])]
    assert len(all_slots) == len(set(all_slots))
    for seq_id, expected in keys.items():
        table = manager.block_table(seq_id)
        by_table = pool[table].reshape(-1, heads, dim)[: lengths[seq_id]]
        assert torch.equal(by_table, expected)
        assert torch.equal(flat[manager.slots(seq_id, 0, lengths[seq_id])], expected)


# Random operation sequences: the invariants always hold


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / free / share / unshare operations against a small pool."""

    @initialize(num_blocks=st.integers(1, 12), block_size=st.integers(1, 5))
    def setup(self, num_blocks, block_size):
        self.manager = BlockManager(num_blocks, block_size)
        self.expected_tokens: dict[int, int] = {}
        self.shared: dict[int, int] = {}  # block id -> owners added with incref (like a prefix cache)
        self.next_id = 0

    @rule(num_tokens=st.integers(1, 30))
    def allocate(self, num_tokens):
        before = observable_state(self.manager)
        fits = self.manager.can_allocate(num_tokens)
        seq_id = self.next_id
        self.next_id += 1
        if fits:
            self.manager.allocate(seq_id, num_tokens)
            self.expected_tokens[seq_id] = num_tokens
            assert self.manager.num_free_blocks == before["free"] - self.manager.blocks_needed(num_tokens)
        else:
            with pytest.raises(NoFreeBlocksError):
                self.manager.allocate(seq_id, num_tokens)
            assert observable_state(self.manager) == before

    @precondition(lambda self: self.expected_tokens)
    @rule(data=st.data(), count=st.integers(0, 9))
    def append(self, data, count):
        seq_id = data.draw(st.sampled_from(sorted(self.expected_tokens)))
        before = observable_state(self.manager)
        if self.manager.can_append(seq_id, count):
            self.manager.append_slots(seq_id, count)
            self.expected_tokens[seq_id] += count
            assert self.manager.block_table(seq_id)[: len(before["tables"][seq_id])] == before["tables"][seq_id]
        else:
            with pytest.raises(NoFreeBlocksError):
                self.manager.append_slots(seq_id, count)
            assert observable_state(self.manager) == before

    @precondition(lambda self: self.expected_tokens)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.expected_tokens)))
        table = self.manager.block_table(seq_id)
        free_before = self.manager.num_free_blocks
        self.manager.free(seq_id)
        del self.expected_tokens[seq_id]
        released = [b for b in table if self.shared.get(b, 0) == 0]
        assert self.manager.num_free_blocks == free_before + len(released)
        with pytest.raises(KeyError):
            self.manager.free(seq_id)

    @precondition(lambda self: self.expected_tokens)
    @rule(data=st.data())
    def share(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.expected_tokens)))
        table = self.manager.block_table(seq_id)
        if table:
            block_id = data.draw(st.sampled_from(table))
            self.manager.allocator.incref(block_id)
            self.shared[block_id] = self.shared.get(block_id, 0) + 1

    @precondition(lambda self: any(self.shared.values()))
    @rule(data=st.data())
    def unshare(self, data):
        block_id = data.draw(st.sampled_from(sorted(b for b, n in self.shared.items() if n)))
        self.manager.allocator.decref(block_id)
        self.shared[block_id] -= 1

    @rule(block_id=st.integers(0, 11))
    def release_free_block_raises(self, block_id):
        block_id %= self.manager.num_blocks
        if self.manager.allocator.refcount(block_id) == 0:
            with pytest.raises(ValueError):
                self.manager.allocator.decref(block_id)

    @invariant()
    def invariants_hold(self):
        assert_consistent(self.manager, self.shared)
        assert {s: self.manager.num_tokens(s) for s in self.manager.sequences()} == self.expected_tokens
        tables = [b for s in self.manager.sequences() for b in self.manager.block_table(s)]
        assert len(tables) == len(set(tables)), "a block is owned by two sequences"

    def teardown(self):
        if not hasattr(self, "manager"):
            return
        for seq_id in self.manager.sequences():
            self.manager.free(seq_id)
        for block_id, count in self.shared.items():
            for _ in range(count):
                self.manager.allocator.decref(block_id)
        assert self.manager.num_free_blocks == self.manager.num_blocks
        assert self.manager.allocator.refcounts() == [0] * self.manager.num_blocks


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase
