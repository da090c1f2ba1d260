# %% [markdown]
# # 04 · Block tables and the block manager
#
# Chapter 03 measured the problem: a server that reserves one contiguous KV region per request
# leaves most of its KV memory empty, and paging fixes that.
# This chapter builds the bookkeeping that paging needs.
# The KV memory becomes a pool of fixed-size **blocks**,
# each sequence gets a **block table** that maps its logical blocks to physical ones,
# and a **block manager** hands blocks out one at a time, only when a token needs one.
#
# **At the end** you will have `BlockAllocator`, a free list with reference counts,
# and `BlockManager`, which keeps block tables, maps positions to slots, grows sequences during decoding and frees them.
# You will also see a tensor pool store and return the keys of several interleaved sequences exactly,
# and step through a small workload in an interactive view.
# No attention yet: chapter 05 reads the KV through these tables.

# %% [markdown]
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-github-user/nano-vllm-course/blob/main/notebooks/04_block_tables.ipynb) [![Launch on Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/your-github-user/nano-vllm-course/main?urlpath=lab/tree/notebooks/04_block_tables.ipynb)

# %%
# On Google Colab this cell gets the course, installs what it needs (keeping Colab's own torch)
# and fetches the model, which takes a few minutes the first time. Anywhere else it does nothing.
import sys

if "google.colab" in sys.modules:
    import os
    import runpy
    import subprocess

    if not os.path.isdir("/content/nano-vllm-course"):
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", "main",
                        "https://github.com/your-github-user/nano-vllm-course.git", "/content/nano-vllm-course"], check=True)
    # Loaded by file path, so that no package is imported before setup_colab installs its pinned version.
    runpy.run_path("/content/nano-vllm-course/nanovllm_lib/colab.py")["setup_colab"]("/content/nano-vllm-course")

# %% [markdown]
# ## Setup

# %%
import copy
import math
import textwrap

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
from IPython.display import display

from nanovllm_lib import ModelConfig, ensure_embedded_model, sample_workload, simulate_serving

torch.manual_seed(0)
config = ModelConfig.from_pretrained(ensure_embedded_model())
print(f"{config.num_layers} layers, {config.num_kv_heads} KV heads of dim {config.head_dim}")

# %% [markdown]
# ## Why: one pool, many sequences, unknown lengths
#
# A KV cache stores, per layer, one key and one value vector per KV head for every token.
# For SmolLM2 in fp32 that is $2 \times 30 \times 3 \times 64 \times 4$ bytes per token.
# A server keeps one big pool of this memory and shares it between all running sequences.
# It cannot know how long a reply will be,
# and chapter 03 showed what reserving for the worst case costs.
#
# Paging borrows the operating system's answer.
# Memory is cut into blocks of $B$ token slots each (the "physical frames").
# A sequence sees its tokens as logical blocks 0, 1, 2, … (its "virtual pages"),
# and its **block table** (its "page table") says which physical block holds each logical block.
# Physical blocks of one sequence need not be adjacent, so any free block will do,
# and a sequence wastes at most $B - 1$ slots, in its last block.

# %%
bytes_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4
print(f"KV bytes per token (fp32): {bytes_per_token:,} = {bytes_per_token / 1024:.0f} KiB")
print(f"one block of 16 tokens: {16 * bytes_per_token / 2**20:.2f} MiB across all layers")

# %% [markdown]
# ## The block allocator: a free list with reference counts
#
# The allocator has no notion of sequences.
# It keeps the ids of free blocks in a queue and one reference count per block.
# `allocate` takes a free block and gives it one owner.
# `incref` adds an owner to a block in use: chapter 08 uses it to share the blocks of a common prompt prefix.
# `decref` removes an owner, and the block returns to the free queue when its last owner leaves.
# Releasing a free block is a bug in the caller (a double free), so it raises instead of passing silently.
#
# The free queue is first in, first out.
# A block that was just freed is reused last,
# so its contents stay available as long as possible for the prefix cache of chapter 08.

# %%
#| default_exp block_manager

# %%
#| export
from __future__ import annotations

import operator
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field


def _as_count(name: str, value, minimum: int) -> int:
    """Return `value` as an int, or raise ValueError if it is not an integer >= `minimum`."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got the bool {value!r}.")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.") from None
    if number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {number}.")
    return number


# %%
#| export
class NoFreeBlocksError(RuntimeError):
    """Raised when the pool has fewer free blocks than an operation needs. The operation changed nothing."""


class BlockAllocator:
    """A pool of `num_blocks` KV block ids with one reference count per block.

    A block is free exactly when its reference count is 0. Free blocks wait in a
    first-in, first-out queue, so the block freed longest ago is reused first.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = _as_count("num_blocks", num_blocks, 1)
        self._free: deque[int] = deque(range(self.num_blocks))
        self._refcounts = [0] * self.num_blocks

    @property
    def num_free(self) -> int:
        """Number of blocks with reference count 0."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Number of blocks with at least one owner."""
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        """Take the oldest free block, set its reference count to 1 and return its id."""
        if not self._free:
            raise NoFreeBlocksError(
                f"All {self.num_blocks} KV blocks are in use. Free a sequence first, or make the pool larger."
            )
        block_id = self._free.popleft()
        self._refcounts[block_id] = 1
        return block_id

    def incref(self, block_id: int) -> None:
        """Add an owner to a block that is in use (a block shared between sequences)."""
        block_id = self._check_block_id(block_id)
        if self._refcounts[block_id] == 0:
            raise ValueError(f"Block {block_id} is free, so it cannot gain a second owner. Call allocate() instead.")
        self._refcounts[block_id] += 1

    def decref(self, block_id: int) -> bool:
        """Remove one owner of a block; return True if that was the last owner and the block is now free."""
        block_id = self._check_block_id(block_id)
        if self._refcounts[block_id] == 0:
            raise ValueError(
                f"Block {block_id} is already free: each owner must release a block exactly once (double free)."
            )
        self._refcounts[block_id] -= 1
        if self._refcounts[block_id] > 0:
            return False
        self._free.append(block_id)
        return True

    def refcount(self, block_id: int) -> int:
        """Number of owners of a block (0 when it is free)."""
        return self._refcounts[self._check_block_id(block_id)]

    def refcounts(self) -> list[int]:
        """Return a copy of every block's reference count, indexed by block id."""
        return list(self._refcounts)

    def _check_block_id(self, block_id: int) -> int:
        if isinstance(block_id, bool):
            raise ValueError(f"Block id must be an integer in [0, {self.num_blocks}), got the bool {block_id!r}.")
        try:
            number = operator.index(block_id)
        except TypeError:
            raise ValueError(f"Block id must be an integer in [0, {self.num_blocks}), got {block_id!r}.") from None
        if not 0 <= number < self.num_blocks:
            raise ValueError(f"Block id {number} is out of range: this pool has blocks 0 to {self.num_blocks - 1}.")
        return number


# %% [markdown]
# A quick run: take three of four blocks, share one, release them, and try a double free.

# %%
allocator = BlockAllocator(num_blocks=4)
taken = [allocator.allocate() for _ in range(3)]
allocator.incref(taken[0])  # a second owner for block 0
print("taken", taken, "| free", allocator.num_free, "| refcounts", allocator.refcounts())
print("release block 0 once, now free:", allocator.decref(taken[0]))
print("release block 0 again, now free:", allocator.decref(taken[0]))
for block_id in taken[1:]:
    allocator.decref(block_id)
print("all free again:", allocator.num_free == 4, "| refcounts", allocator.refcounts())
try:
    allocator.decref(taken[1])
except ValueError as error:
    print("double free rejected:", error)

# %% [markdown]
# ## The block manager: one block table per sequence
#
# The block manager owns an allocator and, for each sequence id, two things:
# its block table and the number of tokens that have a KV slot reserved.
# With block size $B$, a sequence of $n$ tokens needs $\lceil n / B \rceil$ blocks, never more:
# `allocate` reserves that many for a new prompt,
# and `append_slots` adds a block only when a token lands at offset 0 of a new logical block.
#
# Every method that can fail checks first and changes state second.
# If the pool has too few free blocks, it raises `NoFreeBlocksError` and the manager is exactly as before,
# so the scheduler of chapter 06 can wait or preempt someone without cleaning up half-done work.
#
# `free` returns the blocks in reverse order: the prompt's first blocks go back to the queue last,
# so, with the first-in, first-out queue, they are the last to be overwritten
# (chapter 08 reuses exactly those prefix blocks).

# %%
#| export
@dataclass
class SequenceBlocks:
    """The KV blocks of one sequence: `block_table[i]` is the physical block that holds its logical block i."""

    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0  # tokens with a KV slot reserved


class BlockManager:
    """Map each sequence's token positions to slots in a pool of `num_blocks` blocks of `block_size` tokens.

    The KV pool of one layer is a tensor of shape [num_blocks, block_size, num_kv_heads, head_dim],
    or the same memory viewed flat as [num_blocks * block_size, num_kv_heads, head_dim]. The token at
    position p of a sequence lives in logical block p // block_size at offset p % block_size, so its
    index in the flat view (its slot) is block_table[p // block_size] * block_size + p % block_size.
    Sequence ids can be any hashable value.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = _as_count("block_size", block_size, 1)
        self.allocator = BlockAllocator(num_blocks)
        self.num_blocks = self.allocator.num_blocks
        self._sequences: dict[Hashable, SequenceBlocks] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        """Number of blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
        num_tokens = _as_count("num_tokens", num_tokens, 0)
        return -(-num_tokens // self.block_size)

    # Admitting a new sequence.

    def can_allocate(self, num_tokens: int) -> bool:
        """True if a new sequence of `num_tokens` tokens fits in the free blocks."""
        num_tokens = _as_count("num_tokens", num_tokens, 1)
        return self.blocks_needed(num_tokens) <= self.allocator.num_free

    def allocate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Reserve blocks for the first `num_tokens` tokens (the prompt) of a new sequence.

        Raises ValueError if `seq_id` already holds blocks or `num_tokens` < 1, and
        NoFreeBlocksError, with nothing changed, if the free blocks are too few.
        """
        num_tokens = _as_count("num_tokens", num_tokens, 1)
        if seq_id in self._sequences:
            raise ValueError(f"Sequence {seq_id!r} is already allocated. Free it before allocating it again.")
        needed = self.blocks_needed(num_tokens)
        if needed > self.allocator.num_free:
            raise NoFreeBlocksError(
                f"Sequence {seq_id!r} needs {needed} blocks for {num_tokens} tokens, "
                f"but only {self.allocator.num_free} of {self.num_blocks} are free."
            )
        table = [self.allocator.allocate() for _ in range(needed)]
        self._sequences[seq_id] = SequenceBlocks(block_table=table, num_tokens=num_tokens)

    # Growing a running sequence.

    def can_append(self, seq_id: Hashable, num_new_tokens: int = 1) -> bool:
        """True if the sequence can reserve slots for `num_new_tokens` more tokens."""
        return self._new_blocks_needed(seq_id, num_new_tokens) <= self.allocator.num_free

    def append_slots(self, seq_id: Hashable, num_new_tokens: int = 1) -> None:
        """Reserve KV slots for the next `num_new_tokens` positions of a sequence (0 does nothing).

        A block is allocated only for a position that falls at offset 0 of a logical block
        the sequence does not have yet. Raises NoFreeBlocksError, with nothing changed, if
        the free blocks are too few.
        """
        needed = self._new_blocks_needed(seq_id, num_new_tokens)
        if needed > self.allocator.num_free:
            raise NoFreeBlocksError(
                f"Sequence {seq_id!r} needs {needed} more block(s) to grow by {num_new_tokens} token(s), "
                f"but only {self.allocator.num_free} of {self.num_blocks} are free."
            )
        sequence = self._sequences[seq_id]
        sequence.block_table.extend(self.allocator.allocate() for _ in range(needed))
        sequence.num_tokens += num_new_tokens

    def _new_blocks_needed(self, seq_id: Hashable, num_new_tokens: int) -> int:
        num_new_tokens = _as_count("num_new_tokens", num_new_tokens, 0)
        sequence = self._get(seq_id)
        return self.blocks_needed(sequence.num_tokens + num_new_tokens) - len(sequence.block_table)

    # Reading the mapping.

    def num_tokens(self, seq_id: Hashable) -> int:
        """Number of tokens of the sequence that have a KV slot reserved."""
        return self._get(seq_id).num_tokens

    def block_table(self, seq_id: Hashable) -> list[int]:
        """Return a copy of the sequence's block table: entry i is the physical block of logical block i."""
        return list(self._get(seq_id).block_table)

    def slot(self, seq_id: Hashable, position: int) -> int:
        """Index in the flat KV pool of the token at `position`, for 0 <= position < num_tokens(seq_id)."""
        sequence = self._get(seq_id)
        position = _as_count("position", position, 0)
        if position >= sequence.num_tokens:
            raise ValueError(
                f"Position {position} of sequence {seq_id!r} has no slot: only positions 0 to "
                f"{sequence.num_tokens - 1} are reserved. Call append_slots() first."
            )
        block_id = sequence.block_table[position // self.block_size]
        return block_id * self.block_size + position % self.block_size

    def slots(self, seq_id: Hashable, start: int, end: int) -> list[int]:
        """Slots of positions start, start + 1, …, end - 1, for 0 <= start <= end <= num_tokens(seq_id)."""
        sequence = self._get(seq_id)
        start = _as_count("start", start, 0)
        end = _as_count("end", end, 0)
        if not start <= end <= sequence.num_tokens:
            raise ValueError(
                f"Slot range [{start}, {end}) is invalid for sequence {seq_id!r} with {sequence.num_tokens} "
                f"reserved tokens: it needs 0 <= start <= end <= {sequence.num_tokens}."
            )
        block_size, table = self.block_size, sequence.block_table
        return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]

    # Releasing.

    def free(self, seq_id: Hashable) -> None:
        """Release every block of a finished or preempted sequence, each exactly once."""
        sequence = self._get(seq_id)
        for block_id in reversed(sequence.block_table):
            self.allocator.decref(block_id)
        del self._sequences[seq_id]

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._sequences

    def sequences(self) -> list[Hashable]:
        """Ids of the sequences that currently hold blocks, in allocation order."""
        return list(self._sequences)

    def _get(self, seq_id: Hashable) -> SequenceBlocks:
        try:
            return self._sequences[seq_id]
        except KeyError:
            raise KeyError(
                f"Sequence {seq_id!r} holds no blocks: it was never allocated or has already been freed."
            ) from None


# %% [markdown]
# A sequence with a 10-token prompt and $B = 4$ needs $\lceil 10/4 \rceil = 3$ blocks.
# A second sequence takes the next free ones.
# The slot of a position is its block's first slot plus its offset.

# %%
manager = BlockManager(num_blocks=8, block_size=4)
manager.allocate("a", 10)
manager.allocate("b", 5)
print("a:", manager.block_table("a"), "| b:", manager.block_table("b"), "| free:", manager.num_free_blocks)
print("slots of a:", manager.slots("a", 0, 10))
print("position 9 of a -> block", manager.block_table("a")[9 // 4], "offset", 9 % 4, "-> slot", manager.slot("a", 9))
print("blocks == ceil(tokens / B):", all(
    len(manager.block_table(s)) == math.ceil(manager.num_tokens(s) / 4) for s in manager.sequences()))

# %% [markdown]
# ## Decoding: reserve the slot, write its KV, then sample
#
# The order of operations in a decode step is where engines most often go wrong by one.
# After the prefill, the prompt's $P$ tokens have KV and the model has sampled token $P$ (counting from 0).
# That sampled token has **no KV yet**: the next forward pass computes it.
# So one decode step is:
#
# 1. `append_slots(seq, 1)` reserves the slot for position $P$, which belongs to the last sampled token;
#    this is the only moment a new block can be needed.
# 2. The forward pass takes that token as input, writes its key and value into `slot(seq, P)`,
#    and attends over positions $0 … P$.
# 3. The sampler picks token $P + 1$, which is appended to the sequence's token list, again without KV.
#
# So between steps a sequence holds one more token than it has KV slots:
# `len(tokens) == num_tokens(seq) + 1`.
# A new block appears on the step whose input token sits at offset 0 of a new logical block,
# not earlier (when the previous block fills) and not later.

# %%
def prefill(manager: BlockManager, seq_id, prompt_len: int) -> list[str]:
    """Reserve the prompt's slots, then 'sample' the first output token (it has no KV yet)."""
    manager.allocate(seq_id, prompt_len)
    return [f"p{i}" for i in range(prompt_len)] + ["o0"]


def decode_step(manager: BlockManager, seq_id, tokens: list[str]) -> tuple[int, int]:
    """Run one decode step's block bookkeeping; return (position, slot) written for the input token."""
    manager.append_slots(seq_id, 1)  # 1. a slot for tokens[-1], the last sampled token
    position = manager.num_tokens(seq_id) - 1  # == len(tokens) - 1
    slot = manager.slot(seq_id, position)  # 2. the forward pass writes tokens[-1]'s K, V here
    tokens.append(f"o{sum(t.startswith('o') for t in tokens)}")  # 3. the new sampled token, still without KV
    return position, slot


manager = BlockManager(num_blocks=8, block_size=4)
tokens = prefill(manager, "s", prompt_len=3)
print(f"after prefill: {len(tokens)} tokens, {manager.num_tokens('s')} with KV, table {manager.block_table('s')}")
for step in range(6):
    position, slot = decode_step(manager, "s", tokens)
    table = manager.block_table("s")
    print(f"step {step}: input {tokens[-2]!r} at position {position} -> block {table[position // 4]} "
          f"offset {position % 4} (slot {slot:2d}) | table {table}")
print("len(tokens) == num_tokens + 1:", len(tokens) == manager.num_tokens("s") + 1)

# %% [markdown]
# The second block appeared on step 1, whose input `o1` is the first token at position 4.
# Step 0 wrote `o0` into offset 3 of block 0 and needed nothing new.
#
# The same check for prompts that end before, on and after a block boundary ($B = 4$; prompts 3, 4, 5 and 8; six decode steps).
# At every step, the table must hold exactly $\lceil n / B \rceil$ blocks for $n$ tokens with KV,
# and position $p$ must land in logical block $p // B$ at offset $p \bmod B$.

# %%
manager = BlockManager(num_blocks=32, block_size=4)
histories = {}
for prompt_len in (3, 4, 5, 8):
    tokens = prefill(manager, prompt_len, prompt_len)
    history = [len(manager.block_table(prompt_len))]
    exact, in_place = True, True
    for _ in range(6):
        position, slot = decode_step(manager, prompt_len, tokens)
        table = manager.block_table(prompt_len)
        history.append(len(table))
        exact &= len(table) == math.ceil(manager.num_tokens(prompt_len) / 4)
        in_place &= slot // 4 == table[position // 4] and slot % 4 == position % 4
    histories[prompt_len] = history
    print(f"prompt {prompt_len}: blocks after prefill and each step {history} | "
          f"exactly ceil(n/B): {exact} | position p at block p//B offset p%B: {in_place}")

# %% [markdown]
# ## The pool: slots index real KV tensors
#
# The block manager only hands out integers.
# Here they meet memory: one layer's key pool for SmolLM2,
# a tensor of shape `[num_blocks, B, num_kv_heads, head_dim]`.
# Viewed flat as `[num_blocks * B, num_kv_heads, head_dim]` it is indexed by slots,
# which is how a forward pass **writes** new keys.
# Indexed by a block table it returns a sequence's blocks in logical order,
# which is how attention **reads** them back.
#
# Two sequences grow in turns, so their blocks interleave in the pool.
# If any slot were shared or misplaced, one sequence's keys would overwrite the other's.

# %%
block_size, num_blocks = 4, 8
key_pool = torch.zeros(num_blocks, block_size, config.num_kv_heads, config.head_dim)  # [blocks, B, Hkv, d]
flat_keys = key_pool.view(num_blocks * block_size, config.num_kv_heads, config.head_dim)  # [slots, Hkv, d]
print("pool", tuple(key_pool.shape), "| flat view", tuple(flat_keys.shape),
      "| same memory:", flat_keys.data_ptr() == key_pool.data_ptr())

manager = BlockManager(num_blocks, block_size)
generator = torch.Generator().manual_seed(0)
true_keys = {"a": torch.randn(11, config.num_kv_heads, config.head_dim, generator=generator),  # [T, Hkv, d]
             "b": torch.randn(9, config.num_kv_heads, config.head_dim, generator=generator)}
for seq_id in true_keys:  # prefill: 3 tokens each
    manager.allocate(seq_id, 3)
    flat_keys[manager.slots(seq_id, 0, 3)] = true_keys[seq_id][:3]
for _ in range(8):  # decode: one token each, in turns, while tokens remain
    for seq_id, keys in true_keys.items():
        position = manager.num_tokens(seq_id)
        if position < len(keys):
            manager.append_slots(seq_id, 1)
            flat_keys[manager.slot(seq_id, position)] = keys[position]

for seq_id, keys in true_keys.items():
    table = manager.block_table(seq_id)
    n = manager.num_tokens(seq_id)
    by_table = key_pool[table].reshape(-1, config.num_kv_heads, config.head_dim)[:n]  # [T, Hkv, d]
    by_slots = flat_keys[manager.slots(seq_id, 0, n)]  # [T, Hkv, d]
    print(f"{seq_id}: table {table} | read by table equal: {torch.equal(by_table, keys)}"
          f" | read by slots equal: {torch.equal(by_slots, keys)}")

# %% [markdown]
# ## When the pool runs out, nothing changes
#
# A pool of 3 blocks with $B = 4$: one sequence has a 7-token prompt (2 blocks), another a 3-token prompt (1 block).
# The pool is now full.
# Both decode until one of them needs a block that does not exist.
# The failed `append_slots` must leave every table, every token count and every reference count as it was.
# The scheduler then decides whom to preempt (chapter 06),
# and that victim's `free` returns exactly the blocks it owned.

# %%
def manager_state(manager: BlockManager) -> dict:
    """Everything observable about a manager, for before/after comparisons."""
    return {"tables": {s: manager.block_table(s) for s in manager.sequences()},
            "tokens": {s: manager.num_tokens(s) for s in manager.sequences()},
            "refcounts": manager.allocator.refcounts(),
            "free": manager.num_free_blocks}


manager = BlockManager(num_blocks=3, block_size=4)
manager.allocate("long", 7)
manager.allocate("short", 3)
failed = None
for step in range(8):
    for seq_id in ("long", "short"):
        before = manager_state(manager)
        try:
            manager.append_slots(seq_id, 1)
        except NoFreeBlocksError as error:
            failed = (step, seq_id, error, before == manager_state(manager))
            break
    if failed:
        break
step, seq_id, error, unchanged = failed
print(f"decode step {step}, sequence {seq_id!r}: {error}")
print("state unchanged by the failed append:", unchanged)
print("can_append now:", manager.can_append(seq_id), "| can_allocate(1):", manager.can_allocate(1))
victim_blocks = manager.block_table("short")
manager.free("short")  # preempt the shorter sequence
print(f"after freeing 'short' ({victim_blocks}): free blocks {manager.num_free_blocks}, "
      f"refcounts {manager.allocator.refcounts()}, can_append('long'): {manager.can_append('long')}")

# %% [markdown]
# ## Measured: chapter 03's paged server, on the real manager
#
# Chapter 03 simulated a paged server by counting blocks.
# Here the same run drives a real `BlockManager`:
# 1,000 requests from `sample_workload(1000, seed=0)`, a 4 GiB budget in SmolLM2's fp32 KV, $B = 16$.
# The simulation records every allocation, append and free (preemptions included) and its count of blocks in use after each step.
# We replay those operations on the manager.
# It must never run out of blocks, must agree with the count at every step, and must end with every block free.
# Along the way we measure how full the allocated blocks are.

# %%
budget_tokens = 4 * 2**30 // bytes_per_token
workload = sample_workload(1000, seed=0)
simulated = simulate_serving(workload, budget_tokens, "paged", block_size=16, record_events=True)
manager = BlockManager(budget_tokens // 16, block_size=16)
steps_agree, fill = True, []
for event in simulated.events:
    if event[0] == "allocate":
        manager.allocate(event[1], event[2])
    elif event[0] == "append":
        manager.append_slots(event[1])
    elif event[0] == "free":
        manager.free(event[1])
    else:  # end of a step: compare with the simulation's count, measure the fill
        in_use = manager.num_blocks - manager.num_free_blocks
        steps_agree &= in_use == event[1]
        if in_use:
            fill.append(sum(manager.num_tokens(s) for s in manager.sequences()) / (in_use * 16))
print(f"{simulated.total_steps} steps, {simulated.preemptions} preemptions replayed | block counts agree: {steps_agree}")
print(f"all {manager.num_blocks} blocks free at the end: {manager.num_free_blocks == manager.num_blocks}"
      f" | refcounts all 0: {not any(manager.allocator.refcounts())}")
print(f"allocated slots holding a token's KV: mean {sum(fill) / len(fill):.1%}, lowest {min(fill):.1%} over the steps")

# %% [markdown]
# Over the whole run, almost every allocated slot holds a token:
# each running sequence leaves at most 15 slots empty, all in its last block.
# Chapter 03's count of blocks was right, so its comparison of allocators holds for the real manager too.

# %% [markdown]
# ## Drawing the state
#
# To watch the manager work we draw the physical pool, one box per block with one cell per slot.
# A cell is coloured by the sequence that owns its block when it holds a token's KV.
# Below the pool we draw each sequence's block table.
# The drawing helpers go to their own module, `nanovllm_lib.block_figures`.

# %%
#| export block_figures
from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from nanovllm_lib.block_manager import BlockManager

SEQUENCE_COLORS = plt.get_cmap("tab10").colors


def block_owners(manager: BlockManager) -> dict[int, tuple[object, int]]:
    """Map each block in use to (first owning sequence id, number of slots holding tokens)."""
    owners = {}
    for seq_id in manager.sequences():
        num_tokens = manager.num_tokens(seq_id)
        for index, block_id in enumerate(manager.block_table(seq_id)):
            filled = min(manager.block_size, num_tokens - index * manager.block_size)
            owners.setdefault(block_id, (seq_id, filled))
    return owners


def draw_pool(ax: plt.Axes, manager: BlockManager, colors: dict, blocks_per_row: int = 8) -> None:
    """Draw the physical blocks: one box per block, one cell per slot, filled cells in the owner's colour."""
    owners = block_owners(manager)
    rows = math.ceil(manager.num_blocks / blocks_per_row)
    size = manager.block_size
    for block_id in range(manager.num_blocks):
        row, column = divmod(block_id, blocks_per_row)
        x, y = column * (size + 1), (rows - 1 - row) * 1.9
        owner, filled = owners.get(block_id, (None, 0))
        for offset in range(size):
            color = colors.get(owner, "#999999") if offset < filled else "white"
            alpha = 1.0 if offset < filled else 0.0
            ax.add_patch(Rectangle((x + offset, y), 1, 1, facecolor=color, alpha=alpha, edgecolor="#bbbbbb"))
        ax.add_patch(Rectangle((x, y), size, 1, fill=False, edgecolor="#333333", linewidth=1.5))
        refcount = manager.allocator.refcount(block_id)
        label = f"#{block_id}" + (f" ×{refcount}" if refcount > 1 else "")
        ax.text(x + size / 2, y - 0.3, label, ha="center", va="center", fontsize=8)
    ax.set_xlim(-0.5, blocks_per_row * (size + 1))
    ax.set_ylim(-0.8, rows * 1.9)
    ax.axis("off")
    ax.set_title(f"physical blocks ({manager.num_free_blocks} of {manager.num_blocks} free)", fontsize=10)


def draw_tables(ax: plt.Axes, manager: BlockManager, colors: dict, max_rows: int | None = None) -> None:
    """Draw each sequence's block table as a row of physical block ids, with its number of KV tokens."""
    sequences = manager.sequences()
    rows = max(max_rows or 0, len(sequences), 1)
    widest = max([len(manager.block_table(s)) for s in sequences] + [4])
    for row, seq_id in enumerate(sequences):
        y = rows - 1 - row
        ax.text(-0.3, y + 0.4, f"{seq_id}", ha="right", va="center", fontsize=9, color=colors.get(seq_id, "black"))
        for index, block_id in enumerate(manager.block_table(seq_id)):
            ax.add_patch(Rectangle((index, y), 0.9, 0.8, facecolor=colors.get(seq_id, "#999999"), alpha=0.35))
            ax.text(index + 0.45, y + 0.4, str(block_id), ha="center", va="center", fontsize=9)
        ax.text(widest + 0.3, y + 0.4, f"{manager.num_tokens(seq_id)} tokens", va="center", fontsize=8)
    ax.set_xlim(-2.5, widest + 3)
    ax.set_ylim(-0.2, rows)
    ax.axis("off")
    ax.set_title("block tables (logical block i → physical block)", fontsize=10)


def draw_block_state(manager: BlockManager, colors: dict | None = None, title: str = "",
                     max_rows: int | None = None) -> plt.Figure:
    """Draw the pool above the block tables and return the figure."""
    if colors is None:
        colors = {s: SEQUENCE_COLORS[i % len(SEQUENCE_COLORS)] for i, s in enumerate(manager.sequences())}
    figure, (pool_ax, table_ax) = plt.subplots(2, 1, figsize=(9, 4.2), height_ratios=[1.1, 1])
    draw_pool(pool_ax, manager, colors)
    draw_tables(table_ax, manager, colors, max_rows)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    return figure


# %% [markdown]
# ## A small workload, step by step
#
# Five requests arrive over time; the pool has 10 blocks of 4 slots.
# The loop below is a toy scheduler (chapter 06 builds the real one).
# At each step it first runs one decode step for every running sequence, in the order of the previous section,
# and frees a sequence once it has produced its last token.
# If a sequence needs a block and none is free, the most recently admitted sequence is **preempted**.
# Its blocks are freed and it goes back to the front of the queue.
# When it is admitted again, its prompt and the tokens it already produced are recomputed.
# Then the loop admits waiting requests in arrival order while their tokens fit
# (a waiting request blocks the ones behind it).
# After every step it keeps a copy of the manager and a line saying what happened.

# %%
requests = {  # id: (arrival step, prompt length, output length)
    "R0": (0, 6, 9), "R1": (0, 9, 5), "R2": (1, 3, 10), "R3": (2, 14, 6), "R4": (4, 5, 7),
}
colors = {seq_id: SEQUENCE_COLORS[i] for i, seq_id in enumerate(requests)}


def run_workload(requests: dict, num_blocks: int, block_size: int) -> list[tuple[BlockManager, str]]:
    """Serve the requests with one BlockManager; return (copy of the manager, events) after each step."""
    manager = BlockManager(num_blocks, block_size)
    waiting = sorted(requests, key=lambda r: requests[r][0])
    generated = dict.fromkeys(requests, 0)  # output tokens sampled so far; kept across preemption
    history = [(copy.deepcopy(manager), "start: every block is free")]
    step = 0
    while waiting or manager.sequences():
        events = []
        for seq_id in manager.sequences():  # decode, in admission order
            if seq_id not in manager:
                continue  # preempted earlier in this step
            while not manager.can_append(seq_id):
                victim = manager.sequences()[-1]
                events.append(f"{victim} preempted, frees {manager.block_table(victim)}")
                manager.free(victim)
                waiting.insert(0, victim)
                if victim == seq_id:
                    break
            if seq_id not in manager:
                continue
            before = len(manager.block_table(seq_id))
            manager.append_slots(seq_id, 1)
            generated[seq_id] += 1
            if len(manager.block_table(seq_id)) > before:
                events.append(f"{seq_id} +block {manager.block_table(seq_id)[-1]}")
            if generated[seq_id] == requests[seq_id][2]:
                events.append(f"{seq_id} done, frees {manager.block_table(seq_id)}")
                manager.free(seq_id)
        while waiting and requests[waiting[0]][0] <= step:  # admit in arrival order while they fit
            seq_id = waiting[0]
            num_tokens = requests[seq_id][1] + generated[seq_id]  # prompt, plus output when recomputing
            if not manager.can_allocate(num_tokens):
                events.append(f"{seq_id} waits ({manager.blocks_needed(num_tokens)} blocks needed)")
                break
            manager.allocate(seq_id, num_tokens)
            generated[seq_id] += 1  # the prefill samples one token
            events.append(f"{seq_id} prefill → {manager.block_table(seq_id)}")
            waiting.pop(0)
            if generated[seq_id] == requests[seq_id][2]:
                manager.free(seq_id)
        history.append((copy.deepcopy(manager), f"step {step}: " + ("; ".join(events) or "decode")))
        step += 1
    return history


history = run_workload(requests, num_blocks=10, block_size=4)
final = history[-1][0]
print(f"{len(history) - 1} steps | all blocks free at the end: {final.num_free_blocks == final.num_blocks}"
      f" | all refcounts 0: {not any(final.allocator.refcounts())}")
for _, event in history:
    print(event)

# %% [markdown]
# Four moments of that run, drawn.
# After step 2 the pool is full.
# In step 3, R3 is preempted so that R0 and R2 can grow.
# In step 8, R3 and R4 are admitted into blocks that R0 and R3 freed earlier.
# After step 11, R4 runs alone and every other block is back in the pool.

# %%
moments = [3, 4, 9, 12]  # history[k] is the state after step k - 1
figure, axes = plt.subplots(2, len(moments), figsize=(16, 5.4), height_ratios=[1.1, 1])
for column, index in enumerate(moments):
    snapshot, event = history[index]
    draw_pool(axes[0, column], snapshot, colors, blocks_per_row=5)
    draw_tables(axes[1, column], snapshot, colors, max_rows=4)
    axes[0, column].set_title(textwrap.fill(event, 48), fontsize=8)
figure.tight_layout()
figure.savefig("../figures/04_block_tables.png", dpi=100)

# %% [markdown]
# ### Step through it yourself
#
# Drag the slider or press play.
# Watch a block appear exactly when a sequence's next token starts a new logical block,
# and watch freed blocks go to the back of the free queue.

# %% tags=["nbval-ignore-output"]
step_slider = widgets.IntSlider(value=0, min=0, max=len(history) - 1, description="step")
player = widgets.Play(value=0, min=0, max=len(history) - 1, interval=700)
widgets.jslink((player, "value"), (step_slider, "value"))
event_label = widgets.Label()
state_view = widgets.Output()


def show_step(change=None) -> None:
    snapshot, event = history[step_slider.value]
    event_label.value = event
    with state_view:
        state_view.clear_output(wait=True)
        figure = draw_block_state(snapshot, colors, max_rows=len(requests))
        display(figure)
        plt.close(figure)  # shown once, in the view, not again below the cell


step_slider.observe(show_step, names="value")
show_step()
display(widgets.VBox([widgets.HBox([player, step_slider]), event_label, state_view]))

# %% [markdown]
# ## Summary
#
# * The KV pool is a tensor of `num_blocks × B` slots; a slot is `block_id * B + offset`.
# * `BlockAllocator` keeps a first-in, first-out free queue and a reference count per block, and rejects double frees.
# * `BlockManager` keeps, per sequence, a block table and the number of tokens with KV;
#   it holds exactly $\lceil n / B \rceil$ blocks and adds one only when a position needs it.
# * A decode step reserves the slot for the last sampled token first, then the forward pass writes its KV, then the next token is sampled.
# * Every operation that can fail checks before it changes anything, so a failed allocation leaves the manager untouched.
#
# Chapter 05 makes attention read keys and values through these block tables,
# so the model runs on the paged pool instead of one contiguous cache per sequence.
#
# ## Exercises
#
# 1. In `history` from the small workload, find the step with the most reserved slots that hold no token yet.
#    Why can that number never exceed $(B - 1)$ times the number of running sequences?
# 2. A sequence has a 1,000-token prompt and produces 300 tokens with $B = 16$.
#    How many blocks does it hold after its last decode step? Check with `answer_blocks` below.
# 3. Write `fork(manager, parent, child)` that gives `child` the parent's full blocks by `incref`
#    and a fresh copy of its partial last block. Why can the full blocks be shared but not the last one?

# %%
answer_blocks = None  # exercise 2: the number of blocks

if answer_blocks is None:
    print("Exercise 2 not answered yet.")
else:
    check = BlockManager(num_blocks=200, block_size=16)
    check.allocate("x", 1000)
    check.append_slots("x", 300 - 1)  # the prefill samples the first token, each decode step one more
    correct = answer_blocks == len(check.block_table("x"))
    print("correct" if correct else "not quite: the last sampled token never gets a KV slot")
