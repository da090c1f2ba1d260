# %% [markdown]
# # 08 · Prefix caching: compute a shared prompt once
#
# Chat servers send the same long system message in front of every user's question,
# and agents resend the whole conversation at every turn.
# The engine of chapter 07 recomputes the keys and values of that shared prefix for every request,
# although they are exactly the same numbers each time.
# **Prefix caching** keeps the KV blocks of finished prompts in the pool, finds them again by their content,
# and lets a new request start its prefill after the part that is already there.
#
# **In this chapter** we name each full block by a hash of its tokens chained with the block before it.
# Cached blocks stay reusable after their last owner leaves, until the pool needs them (least recently used first),
# and requests share them with reference counts.
# All of it plugs into the engine behind `LLM(enable_prefix_caching=True)`, the same switch vLLM has.
#
# **At the end** you will have `PrefixCachingEngineCore`, checked to give the same tokens as the engine without the cache,
# and a measurement of what it saves on a chat workload with a shared system prompt.

# %% [markdown]
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-github-user/nano-vllm-course/blob/main/notebooks/08_prefix_caching.ipynb) [![Launch on Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/your-github-user/nano-vllm-course/main?urlpath=lab/tree/notebooks/08_prefix_caching.ipynb)

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
import time

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
from IPython.display import display
from matplotlib.patches import Rectangle

from nanovllm_lib import BlockManager, NoFreeBlocksError, SamplingParams, load_model
from nanovllm_lib.engine_core import EngineCore
from nanovllm_lib.llm import LLM
from nanovllm_lib.paged_attention import PagedKVCache, build_step_metadata, run_paged_step
from nanovllm_lib.scheduler import SchedulerConfig
from nanovllm_lib.sequence import Sequence

torch.manual_seed(0)
lm = load_model()
tokenizer = lm.tokenizer
print(lm.config.model_type, lm.config.num_layers, "layers")

# %% [markdown]
# ## Why: every request recomputes the same system prompt
#
# Here is a chat service with a fixed system message and eight users' questions.
# Each prompt is rendered by the checkpoint's chat template, so it starts with the same tokens:
# the system message and the opening of the user turn.

# %%
SYSTEM = (
    "You are Ada, the support assistant of the Riverside Public Library. Answer in at most three sentences. "
    "Opening hours: Monday to Friday 9:00 to 20:00, Saturday 10:00 to 17:00, closed on Sundays and public holidays. "
    "Members may borrow up to twelve items at a time for three weeks and renew them twice online, unless another "
    "member has reserved them. Late returns cost 20 cents per item per day, capped at 5 euros per item. "
    "Membership is free for residents; bring a photo ID and a proof of address to any desk. "
    "The library offers free Wi-Fi, printing at 10 cents a page, quiet study rooms that can be booked two weeks "
    "ahead, and a children's corner with story time every Wednesday at 16:00. If you do not know an answer, "
    "say so and suggest calling the front desk at 555-0142."
)
QUESTIONS = [
    "Can I borrow books on Sunday?",
    "How much is the fine for a book returned five days late?",
    "What do I need to become a member?",
    "How many times can I renew a loan?",
    "Is there anything for toddlers?",
    "Can I print a 30-page document, and what will it cost?",
    "How far ahead can I book a study room?",
    "Do you have the latest novel by my favourite author?",
]


def chat_prompt(question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"])


def common_prefix_length(a: list[int], b: list[int]) -> int:
    length = 0
    while length < min(len(a), len(b)) and a[length] == b[length]:
        length += 1
    return length


prompts = [chat_prompt(q) for q in QUESTIONS]
shared = min(common_prefix_length(prompts[0], p) for p in prompts[1:])
total = sum(len(p) for p in prompts)
print("prompt lengths:", [len(p) for p in prompts])
print(f"shared prefix: {shared} tokens; {len(prompts) * shared} of the {total} prompt tokens "
      f"({len(prompts) * shared / total:.0%}) are the same prefix computed again")

# %% [markdown]
# The keys and values of those shared positions are the same numbers in every request:
# a token's KV depends only on the tokens up to it.
# Let us prefill two of the prompts with the paged engine parts of chapter 05 and compare the keys they store.

# %%
def prefill_keys(prompt: list[int], block_size: int = 16) -> tuple[torch.Tensor, float]:
    """Prefill one prompt into a fresh paged cache and return layer 0's keys [len, kv_heads, head_dim] and the seconds."""
    manager = BlockManager(num_blocks=64, block_size=block_size)
    cache = PagedKVCache(lm.config, 64, block_size)
    manager.allocate("r", len(prompt))
    metadata = build_step_metadata(manager, [("r", len(prompt))])
    start = time.perf_counter()
    run_paged_step(lm.model, cache, metadata, torch.tensor(prompt))
    seconds = time.perf_counter() - start
    keys, _ = cache.read(0, metadata.block_tables[0], len(prompt))
    return keys, seconds


keys_a, seconds_a = prefill_keys(prompts[0])
keys_b, seconds_b = prefill_keys(prompts[1])
difference = (keys_a[:shared] - keys_b[:shared]).abs().max().item()
print(f"layer-0 keys of the {shared} shared positions agree within 1e-4: {difference < 1e-4}")
print(f"after the shared part they differ: {not torch.allclose(keys_a[shared], keys_b[shared], atol=1e-4)}")

# %% tags=["nbval-ignore-output"]
print(f"prefill of {len(prompts[0])} tokens took {seconds_a * 1000:.0f} ms; "
      f"{shared / len(prompts[0]):.0%} of that work repeats what the previous request computed")

# %% [markdown]
# So about nine tenths of each prefill here is wasted work.
# The fix is to keep the blocks that hold the shared prefix, recognise them when the next request arrives,
# and point its block table at them.
# Three questions decide the design: how to recognise a block, when a block may be shared, and when to drop it.

# %% [markdown]
# ## Naming a block by its content
#
# A block can be reused only if it holds the same tokens **and** the same tokens came before it,
# because a token's key and value depend on every token in front of it.
# So a full block's key is a hash of its own token ids together with the key of the block before it:
#
# $$\text{key}_0 = h(\text{root}, t_0 \dots t_{B-1}), \qquad \text{key}_i = h(\text{key}_{i-1}, t_{iB} \dots t_{iB+B-1}).$$
#
# Through the chain, block $i$'s key depends on all $(i+1)B$ tokens up to its end.
# Only **full** blocks get keys: a partly filled block will still receive tokens, so its content is not final.
#
# vLLM's design document ("Automatic Prefix Caching", docs.vllm.ai) describes the same chained block hash.
# We use Python's `hash` of a tuple of ints, which is fast and the same in every process.
# It is not collision-free, so a key is only a way to find candidates: a hit is confirmed by comparing token ids (next section).

# %%
#| default_exp prefix_caching

# %%
#| export
from __future__ import annotations

from collections.abc import Callable, Hashable
from collections.abc import Sequence as TokenSequence
from dataclasses import dataclass

from nanovllm_lib.block_manager import BlockAllocator, BlockManager, NoFreeBlocksError, SequenceBlocks, _as_count
from nanovllm_lib.engine_core import EngineCore
from nanovllm_lib.scheduler import Scheduler, SchedulerConfig
from nanovllm_lib.sequence import Sequence

ROOT_KEY = 0  # the parent key of a sequence's first block


def hash_block(parent_key: int, token_ids: tuple[int, ...]) -> int:
    """Return the key of a full block: a hash of its parent block's key and its own token ids.

    Python's hash of a tuple of ints does not change between processes. Equal keys do not prove equal
    content, so the cache confirms every hit against the stored token ids.
    """
    return hash((parent_key, token_ids))


def block_keys(token_ids: TokenSequence[int], block_size: int,
               hash_function: Callable[[int, tuple[int, ...]], int] = hash_block) -> list[int]:
    """Return the chained keys of the full blocks of `token_ids` (a partial last block gets none)."""
    keys, parent = [], ROOT_KEY
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_function(parent, tuple(token_ids[start:start + block_size]))
        keys.append(parent)
    return keys


# %% [markdown]
# The first two prompts get equal keys for exactly the blocks inside their shared prefix:

# %%
from nanovllm_lib.prefix_caching import block_keys

BLOCK_SIZE = 16
keys_0, keys_1 = block_keys(prompts[0], BLOCK_SIZE), block_keys(prompts[1], BLOCK_SIZE)
equal = [a == b for a, b in zip(keys_0, keys_1)]
print("block keys equal:", equal)
print("equal exactly for the blocks inside the shared prefix:", equal == [i < shared // BLOCK_SIZE for i in range(len(equal))])

# %% [markdown]
# The chain is what makes a key mean "these tokens *after* that prefix".
# The same 16 tokens at two places get two keys, because different blocks come before them:

# %%
repeated = [tokenizer.encode(" echo")[0]] * (3 * BLOCK_SIZE)
repeated_keys = block_keys(repeated, BLOCK_SIZE)
print("three blocks with identical tokens; distinct keys:", len(set(repeated_keys)) == 3)

# %% [markdown]
# ## Cached blocks and the evictable pool
#
# A cached block is described by a `CachedBlock`: which physical block, its key, its token ids,
# and which entry came before it.
# That last field makes hits exact even if two different prefixes ever hash to the same key.
# A block is a hit only if its stored tokens equal ours **and** its parent entry is the one we matched for the block before.
# Entries get ids that are never reused, so an entry whose parent block was evicted can never be matched again.
#
# What happens to a cached block when its last owner finishes?
# Freeing it would throw away work the next request may want.
# So its reference count drops to 0 and it joins the free queue as usual, **keeping its key and its KV**.
# A free block with a key is *evictable*:
#
# * a hit takes it back out of the free queue and gives it an owner again;
# * `allocate()` takes free blocks from the front of the queue, and if that block has a key, it **evicts** it: the key is removed, the block starts over with reference count 1 and new tokens.
#
# The free queue is ordered by when blocks were freed, so the block whose last owner left longest ago is evicted first:
# least recently used (LRU) eviction, with no extra data structure.
# A block freed before ever being cached is simply free, and it comes before newer cached blocks in the queue.
#
# We subclass chapter 04's `BlockAllocator`. Its free queue `_free` and reference counts `_refcounts` stay as they are;
# the subclass adds the table of cached blocks, bucketed by key.

# %%
#| export
@dataclass(frozen=True)
class CachedBlock:
    """A full block whose KV is kept for reuse: its place, its content, and the entry before it."""

    block_id: int
    key: int
    token_ids: tuple[int, ...]
    parent_entry: int | None  # entry_id of the previous block's entry, or None for a sequence's first block
    entry_id: int  # unique over the allocator's life, never reused


class PrefixCachingBlockAllocator(BlockAllocator):
    """A BlockAllocator whose free blocks keep their cached KV until `allocate()` reuses them.

    Free blocks wait in the base class's queue in the order they were freed. A free block that is
    cached is evictable: `share()` revives it for a new owner, and `allocate()` evicts it (removes
    its entry) when it reaches the front of the queue, so the least recently used block goes first.
    """

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self._entries: dict[int, CachedBlock] = {}  # block id -> its entry
        self._buckets: dict[int, list[int]] = {}  # key -> ids of cached blocks with that key
        self._next_entry_id = 0
        self.num_evictions = 0

    def allocate(self) -> int:
        """Take the front block of the free queue, evicting its cached content if it has any; return its id."""
        block_id = super().allocate()
        if block_id in self._entries:
            self._evict(block_id)
        return block_id

    def find(self, key: int, token_ids: tuple[int, ...], parent_entry: int | None) -> CachedBlock | None:
        """Return the cached block with this key, these token ids and this parent entry, or None."""
        for block_id in self._buckets.get(key, ()):
            entry = self._entries[block_id]
            if entry.token_ids == token_ids and entry.parent_entry == parent_entry:
                return entry
        return None

    def cache(self, block_id: int, key: int, token_ids: tuple[int, ...], parent_entry: int | None) -> CachedBlock:
        """Record a full block that is in use as cached and return its new entry."""
        block_id = self._check_block_id(block_id)
        if self._refcounts[block_id] == 0:
            raise ValueError(f"Block {block_id} is free; only a block in use, whose KV is computed, can be cached.")
        if block_id in self._entries:
            raise ValueError(f"Block {block_id} is already cached; a block has at most one entry.")
        entry = CachedBlock(block_id, key, tuple(token_ids), parent_entry, self._next_entry_id)
        self._next_entry_id += 1
        self._entries[block_id] = entry
        self._buckets.setdefault(key, []).append(block_id)
        return entry

    def share(self, block_id: int) -> None:
        """Add an owner to a cached block. An evictable block leaves the free queue first."""
        block_id = self._check_block_id(block_id)
        if block_id not in self._entries:
            raise ValueError(f"Block {block_id} is not cached, so it cannot be shared by a cache hit.")
        if self._refcounts[block_id] == 0:
            self._free.remove(block_id)  # linear in the pool size; fine for a few thousand blocks
            self._refcounts[block_id] = 1
        else:
            self.incref(block_id)

    def entry(self, block_id: int) -> CachedBlock | None:
        """Return the entry of a cached block, or None if the block is not cached."""
        return self._entries.get(self._check_block_id(block_id))

    def cached_blocks(self) -> list[CachedBlock]:
        """Return the entries of all cached blocks, in use or evictable, by block id."""
        return [self._entries[block_id] for block_id in sorted(self._entries)]

    @property
    def num_cached(self) -> int:
        return len(self._entries)

    @property
    def num_evictable(self) -> int:
        """Free blocks that still hold cached KV."""
        return sum(1 for block_id in self._entries if self._refcounts[block_id] == 0)

    def _evict(self, block_id: int) -> None:
        entry = self._entries.pop(block_id)
        bucket = self._buckets[entry.key]
        bucket.remove(block_id)
        if not bucket:
            del self._buckets[entry.key]
        self.num_evictions += 1


# %% [markdown]
# A four-block pool shows the life of a cached block.
# Block 0 is cached and freed, a hit revives it, and once it is free again and reaches the front of the queue,
# allocation evicts it: its key is gone and its new owner starts with reference count 1.

# %%
from nanovllm_lib.prefix_caching import PrefixCachingBlockAllocator

pool = PrefixCachingBlockAllocator(4)
first, second = pool.allocate(), pool.allocate()
pool.cache(first, key=123, token_ids=(5, 6, 7, 8), parent_entry=None)
pool.decref(second)  # never cached: plain free
pool.decref(first)  # cached: evictable
print("free queue (front first):", list(pool._free), "| cached:", pool.num_cached, "| evictable:", pool.num_evictable)
print("hit on block 0 finds it:", pool.find(123, (5, 6, 7, 8), None) is not None)
pool.share(first)
print("after the hit, refcount:", pool.refcount(first), "| free queue:", list(pool._free))
pool.decref(first)
allocation_order = [pool.allocate() for _ in range(4)]
print("allocation order:", allocation_order, "| evictions:", pool.num_evictions,
      "| key 123 still found:", pool.find(123, (5, 6, 7, 8), None) is not None,
      "| refcount of reused block 0:", pool.refcount(first))

# %% [markdown]
# ## The prefix-caching block manager
#
# `PrefixCachingBlockManager` extends chapter 04's `BlockManager` with three operations.
#
# **Lookup.** `match_prefix(token_ids)` walks the prompt's full blocks from the start
# and returns the cached blocks that match, stopping at the first miss.
# A later block cannot be reused when an earlier one is missing, because its KV was computed after the missing one.
#
# **Allocation.** `allocate_cached(seq_id, token_ids)` shares the matched blocks (reference count + 1),
# allocates fresh blocks for the rest, and returns how many tokens already have KV.
# One rule matters here: **the last prompt token is always computed**, because its logits give the first output token.
# With block-granular caching that means the block holding the last token is never taken from the cache.
# If the whole prompt is cached, its last block is recomputed: at most $B$ tokens.
# The alternative, reusing every block and recomputing only the last token,
# would write that token's KV into a block other sequences share.
# That needs a private copy of the block first (copy-on-write); our rule instead costs at most $B - 1$ extra prefill tokens.
#
# **Registration.** `cache_computed_blocks(seq_id, token_ids, num_computed_tokens)` gives keys to the sequence's blocks
# that are now full **and** whose KV has been computed. The engine calls it after every step.
# A block whose last slot is reserved for a token that has not been fed through the model yet stays unregistered.
# Once registered, a block's tokens never change: a sequence's token ids only grow (a stop string shortens the text, not the ids),
# and an edited conversation arrives as a new request whose blocks are looked up afresh.
# If an identical block is already cached (two requests computed the same prefix at the same time),
# the older entry stays and the new copy is simply freed with its sequence.
#
# `free` releases the table from the last block to the first, as chapter 04's does,
# so a sequence's tail enters the free queue before its head and is evicted first.

# %%
#| export
class PrefixCachingBlockManager(BlockManager):
    """A BlockManager that reuses cached full blocks for new sequences with the same token prefix.

    hash_function(parent_key, token_ids) -> int names a full block; hits are confirmed by token ids and
    parent entry, so collisions cost hits, never correctness. Counters: `num_queried_tokens` (tokens
    of every sequence allocated through `allocate_cached`) and `num_hit_tokens` (those found in the cache).
    """

    def __init__(self, num_blocks: int, block_size: int,
                 hash_function: Callable[[int, tuple[int, ...]], int] = hash_block) -> None:
        super().__init__(num_blocks, block_size)
        self.allocator = PrefixCachingBlockAllocator(self.num_blocks)
        self.hash_function = hash_function
        self._chains: dict[Hashable, list[CachedBlock]] = {}  # entries of each sequence's cached full blocks
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of queried tokens found in the cache (0 before any query)."""
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def match_prefix(self, token_ids: TokenSequence[int]) -> list[CachedBlock]:
        """Return the cached blocks that hold the leading full blocks of `token_ids`, up to the first miss."""
        matched, parent_key, parent_entry = [], ROOT_KEY, None
        size = self.block_size
        for start in range(0, len(token_ids) - size + 1, size):
            block_tokens = tuple(token_ids[start:start + size])
            key = self.hash_function(parent_key, block_tokens)
            entry = self.allocator.find(key, block_tokens, parent_entry)
            if entry is None:
                break
            matched.append(entry)
            parent_key, parent_entry = key, entry.entry_id
        return matched

    def allocate_cached(self, seq_id: Hashable, token_ids: TokenSequence[int]) -> int:
        """Reserve slots for all of `token_ids`, sharing cached leading blocks, and return how many tokens have KV.

        The block that holds the last token is never taken from the cache, so at least one token is
        left to compute. Raises ValueError if `seq_id` already holds blocks or `token_ids` is empty, and
        NoFreeBlocksError, with nothing changed, if the free blocks are too few.
        """
        num_tokens = _as_count("len(token_ids)", len(token_ids), 1)
        if seq_id in self._sequences:
            raise ValueError(f"Sequence {seq_id!r} is already allocated. Free it before allocating it again.")
        reusable_blocks = (num_tokens - 1) // self.block_size  # full blocks before the one holding the last token
        hits = self.match_prefix(token_ids[:reusable_blocks * self.block_size])
        num_new = self.blocks_needed(num_tokens) - len(hits)
        reviving = sum(1 for entry in hits if self.allocator.refcount(entry.block_id) == 0)
        if num_new > self.allocator.num_free - reviving:
            raise NoFreeBlocksError(
                f"Sequence {seq_id!r} needs {num_new} new blocks for {num_tokens} tokens ({len(hits)} cached), "
                f"but only {self.allocator.num_free - reviving} of {self.num_blocks} are free."
            )
        for entry in hits:  # before allocating, so that allocation cannot evict a block we are about to use
            self.allocator.share(entry.block_id)
        table = [entry.block_id for entry in hits] + [self.allocator.allocate() for _ in range(num_new)]
        self._sequences[seq_id] = SequenceBlocks(block_table=table, num_tokens=num_tokens)
        self._chains[seq_id] = list(hits)
        num_cached_tokens = len(hits) * self.block_size
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += num_cached_tokens
        return num_cached_tokens

    def allocate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Reserve blocks without a cache lookup, as chapter 04 does. Computed blocks can still be registered."""
        super().allocate(seq_id, num_tokens)
        self._chains[seq_id] = []

    def cache_computed_blocks(self, seq_id: Hashable, token_ids: TokenSequence[int], num_computed_tokens: int) -> int:
        """Register every full block of the sequence whose KV is now computed, and return how many became cached.

        token_ids: the sequence's tokens so far; the first `num_computed_tokens` of them have KV in the pool.
        """
        sequence = self._get(seq_id)
        num_computed_tokens = _as_count("num_computed_tokens", num_computed_tokens, 0)
        if num_computed_tokens > min(len(token_ids), sequence.num_tokens):
            raise ValueError(
                f"Sequence {seq_id!r}: num_computed_tokens={num_computed_tokens} exceeds its {len(token_ids)} token ids "
                f"or its {sequence.num_tokens} reserved slots."
            )
        chain = self._chains[seq_id]
        size, newly_cached = self.block_size, 0
        for index in range(len(chain), num_computed_tokens // size):
            block_tokens = tuple(token_ids[index * size:(index + 1) * size])
            parent = chain[-1] if chain else None
            parent_key = parent.key if parent else ROOT_KEY
            parent_entry = parent.entry_id if parent else None
            key = self.hash_function(parent_key, block_tokens)
            entry = self.allocator.find(key, block_tokens, parent_entry)
            if entry is None:
                entry = self.allocator.cache(sequence.block_table[index], key, block_tokens, parent_entry)
                newly_cached += 1
            chain.append(entry)  # describes this block's content: its own new entry, or an older identical one
        return newly_cached

    def free(self, seq_id: Hashable) -> None:
        """Release the sequence's blocks. Cached blocks stay reusable until they are evicted."""
        super().free(seq_id)
        del self._chains[seq_id]


# %% [markdown]
# A small run without the model: block size 4, a "system prompt" of 8 tokens, then questions.
# Request A is allocated, its prefill is marked computed, and its two system blocks get keys.
# Request B shares them (reference count 2) and computes only its own tail.
# Request C's prompt is *exactly* A's first 8 tokens: it is fully covered, so it reuses one block and recomputes the last.

# %%
from nanovllm_lib.prefix_caching import PrefixCachingBlockManager

system_ids, tail_a, tail_b = list(range(100, 108)), [1, 2, 3], [4, 5]
manager = PrefixCachingBlockManager(num_blocks=8, block_size=4)

computed_a = manager.allocate_cached("A", system_ids + tail_a)
manager.cache_computed_blocks("A", system_ids + tail_a, len(system_ids + tail_a))  # A's prefill ran
computed_b = manager.allocate_cached("B", system_ids + tail_b)
computed_c = manager.allocate_cached("C", system_ids)
for name, computed in [("A", computed_a), ("B", computed_b), ("C", computed_c)]:
    print(f"{name}: block table {manager.block_table(name)}, tokens with KV on admission {computed}")
print("reference counts:", manager.allocator.refcounts())
print("C recomputes its last block:", computed_c == len(system_ids) - 4)

# %% [markdown]
# When all three finish, nothing is in use, and the two system blocks stay cached and evictable:

# %%
for name in ["A", "B", "C"]:
    manager.free(name)
print("all refcounts 0:", not any(manager.allocator.refcounts()),
      "| free (including evictable):", manager.num_free_blocks, "of", manager.num_blocks,
      "| evictable:", manager.allocator.num_evictable)
print("a new request with the system prompt hits:", manager.allocate_cached("D", system_ids + [9]), "tokens")

# %% [markdown]
# ## Exact hits even when keys collide
#
# To see that the token comparison and the parent entry make hits exact, replace the hash with a constant,
# so every block gets the same key.
# Two prompts have different first blocks and identical second blocks.
# With a key that covered only the block's own tokens, the second prompt would take the first one's second block,
# whose KV was computed after different tokens.

# %%
colliding = PrefixCachingBlockManager(num_blocks=8, block_size=4, hash_function=lambda parent, tokens: 0)
first_prompt, second_prompt = [1, 2, 3, 4, 9, 9, 9, 9, 5], [7, 7, 7, 7, 9, 9, 9, 9, 5]
colliding.allocate_cached("X", first_prompt)
colliding.cache_computed_blocks("X", first_prompt, len(first_prompt))
print("X's blocks cached under one key:", len(colliding.allocator.cached_blocks()))
print("Y (different first block) reuses:", colliding.allocate_cached("Y", second_prompt), "tokens")
print("Z (X's prompt again) reuses:", colliding.allocate_cached("Z", first_prompt), "tokens")

# %% [markdown]
# ## Plugging the cache into the engine
#
# On admission, the scheduler of chapter 06 calls `self.allocate(sequence)`, which returns how many of the sequence's tokens
# already have KV, and it schedules only the rest as the prefill.
# A preempted sequence comes back through the same path, with its generated tokens as part of `token_ids`,
# so recomputation after preemption also reuses whatever of it is still cached.
# The engine core of chapter 06 has three hooks for us: the block manager, the scheduler,
# and `on_tokens_computed`, called after each step for every sequence whose new tokens now have KV.

# %%
#| export
class PrefixCachingScheduler(Scheduler):
    """A Scheduler whose admissions reuse cached prefix blocks through a PrefixCachingBlockManager."""

    def __init__(self, config: SchedulerConfig, block_manager: PrefixCachingBlockManager):
        if not isinstance(block_manager, PrefixCachingBlockManager):
            raise ValueError(f"PrefixCachingScheduler needs a PrefixCachingBlockManager, got {type(block_manager).__name__}.")
        super().__init__(config, block_manager)

    def allocate(self, sequence: Sequence) -> int:
        """Reserve slots for all of the sequence's tokens and return how many are already in the cache."""
        return self.block_manager.allocate_cached(sequence.seq_id, sequence.token_ids)


class PrefixCachingEngineCore(EngineCore):
    """EngineCore with prefix caching: full blocks are registered as their KV is computed and shared by later requests."""

    def make_block_manager(self, num_blocks: int, block_size: int) -> PrefixCachingBlockManager:
        return PrefixCachingBlockManager(num_blocks, block_size)

    def make_scheduler(self, config: SchedulerConfig, block_manager: PrefixCachingBlockManager) -> Scheduler:
        return PrefixCachingScheduler(config, block_manager)

    def on_tokens_computed(self, sequence: Sequence) -> None:
        self.block_manager.cache_computed_blocks(sequence.seq_id, sequence.token_ids, sequence.num_computed_tokens)


# %% [markdown]
# ### Check: resuming a prefill from cached KV gives the same logits
#
# The new tokens of a request with a cache hit start at position `num_computed_tokens`
# and attend to all the cached KV before them.
# Chapter 05's step metadata already handles such a prefill, so the logits must equal those of a full prefill.
# We prefill question 0, register its blocks, then prefill question 1 both ways.

# %%
def last_token_logits(manager: BlockManager, cache: PagedKVCache, seq_id: str, prompt: list[int], computed: int
                      ) -> torch.Tensor:
    metadata = build_step_metadata(manager, [(seq_id, len(prompt) - computed, computed)])
    return run_paged_step(lm.model, cache, metadata, torch.tensor(prompt[computed:]))[0]


cached_manager = PrefixCachingBlockManager(num_blocks=64, block_size=BLOCK_SIZE)
cached_pool = PagedKVCache(lm.config, 64, BLOCK_SIZE)
computed = cached_manager.allocate_cached("q0", prompts[0])
last_token_logits(cached_manager, cached_pool, "q0", prompts[0], computed)
cached_manager.cache_computed_blocks("q0", prompts[0], len(prompts[0]))
computed = cached_manager.allocate_cached("q1", prompts[1])
resumed = last_token_logits(cached_manager, cached_pool, "q1", prompts[1], computed)

plain_manager = BlockManager(num_blocks=64, block_size=BLOCK_SIZE)
plain_manager.allocate("q1", len(prompts[1]))
full = last_token_logits(plain_manager, PagedKVCache(lm.config, 64, BLOCK_SIZE), "q1", prompts[1], 0)
print(f"question 1: {computed} of {len(prompts[1])} tokens came from the cache, {len(prompts[1]) - computed} computed")
print("logits equal a full prefill within 1e-4:", torch.allclose(resumed, full, atol=1e-4),
      "| same next token:", int(resumed.argmax()) == int(full.argmax()))

# %% [markdown]
# ### Check: the same tokens with and without the cache, at every boundary
#
# Where the shared part ends relative to a block boundary is where off-by-one errors live.
# We build prompts from a 64-token prefix (four blocks of 16, the start of the system message) and vary what follows,
# run them one after another through the engine with and without the cache, and compare the generated tokens.
# The prompts cover a shared part that ends exactly on a block boundary, one token before and one after it,
# and prompts that are completely covered by the cache.

# %%
def run_sequentially(core_class: type[EngineCore], prompt_list: list[list[int]], max_tokens: int = 8):
    """Run prompts one after another through one engine and return their outputs, cached-token counts and the engine."""
    core = core_class(lm, 64, BLOCK_SIZE, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=1024,
                                                          max_model_len=1024))
    outputs, cached = [], []
    for index, prompt in enumerate(prompt_list):
        hits_before = getattr(core.block_manager, "num_hit_tokens", 0)
        sequence = Sequence(f"r{index}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        core.run([sequence])
        outputs.append(sequence.output_token_ids)
        cached.append(getattr(core.block_manager, "num_hit_tokens", 0) - hits_before)
    return outputs, cached, core


story = tokenizer(SYSTEM)["input_ids"]  # any text of 100 or more tokens will do
base = story[:4 * BLOCK_SIZE]
cases = {
    "prefix alone (warms the cache)": base,
    "shared part ends on a boundary": base + story[:5],
    "shared part ends one before": base[:-1] + [story[7]] + story[:5],
    "shared part ends one after": base + story[:1] + story[30:34],
    "fully covered, length 4B": base,
    "fully covered, length 4B - 1": base[:-1],
    "fully covered, length 3B + 1": base[:3 * BLOCK_SIZE + 1],
}
plain_outputs, _, _ = run_sequentially(EngineCore, list(cases.values()))
cached_outputs, hits, cached_core = run_sequentially(PrefixCachingEngineCore, list(cases.values()))
for (name, prompt), hit, same in zip(cases.items(), hits, [a == b for a, b in zip(plain_outputs, cached_outputs)]):
    print(f"{name:32} {len(prompt):3} tokens, {hit:3} from the cache -> same output: {same}")

# %% [markdown]
# Reading the table: the last block is never reused, so a prompt of exactly $4B$ cached tokens reuses $3B$,
# and a prompt of $3B + 1$ reuses $3B$ and computes one token.
# When the run ends, every block has reference count 0 and is free or evictable:

# %%
manager_at_end = cached_core.block_manager
print("all refcounts 0:", not any(manager_at_end.allocator.refcounts()),
      "| free or evictable:", manager_at_end.num_free_blocks, "of", manager_at_end.num_blocks,
      "| cached:", manager_at_end.allocator.num_cached)

# %% [markdown]
# ## Measurement: a chat service with a shared system prompt
#
# Now the whole engine, through `LLM`, on the library chat workload from the start of the chapter:
# the eight questions arrive one after another, as in a chat service where each user waits for the reply.
# We run them once with `enable_prefix_caching=False` and once with `True`, greedy, at most 16 new tokens each,
# and record each request's time to first token (TTFT), which is dominated by its prefill.

# %%
GREEDY = SamplingParams(temperature=0, max_tokens=16)


def serve_one_at_a_time(enable_prefix_caching: bool):
    llm = LLM(enable_prefix_caching=enable_prefix_caching, block_size=BLOCK_SIZE)
    results = [llm.generate([{"prompt_token_ids": p}], GREEDY, use_tqdm=False)[0] for p in prompts]
    return llm, results


llm_off, served_off = serve_one_at_a_time(False)
llm_on, served_on = serve_one_at_a_time(True)
same_tokens = [a.outputs[0].token_ids for a in served_off] == [b.outputs[0].token_ids for b in served_on]
cache_manager = llm_on.engine.core.block_manager
prompt_tokens = sum(len(p) for p in prompts)
computed_with_cache = cache_manager.num_queried_tokens - cache_manager.num_hit_tokens
print("same tokens with and without the cache:", same_tokens)
print(f"hit rate {cache_manager.hit_rate:.0%}: prefill computed {computed_with_cache} of {prompt_tokens} prompt tokens "
      f"({1 - computed_with_cache / prompt_tokens:.0%} saved)")

# %% tags=["nbval-ignore-output"]
ttft_off = [r.metrics.time_to_first_token * 1000 for r in served_off]
ttft_on = [r.metrics.time_to_first_token * 1000 for r in served_on]
print("TTFT ms without cache:", [round(t) for t in ttft_off])
print("TTFT ms with cache:   ", [round(t) for t in ttft_on])
later_off, later_on = sum(ttft_off[1:]) / 7, sum(ttft_on[1:]) / 7
print(f"questions 2-8: mean TTFT {later_off:.0f} ms -> {later_on:.0f} ms ({later_off / later_on:.1f}x faster)")

# %% [markdown]
# The first request finds an empty cache and pays the full prefill in both runs.
# Every later one reuses the system blocks and computes only its last, partial blocks.

# %% tags=["nbval-ignore-output"]
figure, (ttft_axes, token_axes) = plt.subplots(1, 2, figsize=(11, 3.6), width_ratios=[1.6, 1])
positions = range(1, len(prompts) + 1)
ttft_axes.bar([p - 0.2 for p in positions], ttft_off, width=0.4, label="cache off", color="#999999")
ttft_axes.bar([p + 0.2 for p in positions], ttft_on, width=0.4, label="cache on", color="#1f77b4")
ttft_axes.set_xlabel("request (in arrival order)")
ttft_axes.set_ylabel("time to first token (ms)")
ttft_axes.set_title("TTFT, requests one after another")
ttft_axes.set_ylim(0, 1.3 * max(ttft_off + ttft_on))
ttft_axes.legend(loc="upper right", ncol=2)
token_axes.bar(["cache off", "cache on"], [prompt_tokens, computed_with_cache], color=["#999999", "#1f77b4"])
token_axes.set_ylabel("prompt tokens computed")
token_axes.set_title(f"prefill work for {len(prompts)} requests (hit rate {cache_manager.hit_rate:.0%})")
figure.suptitle(f"SmolLM2-135M-Instruct, CPU fp32, B = {BLOCK_SIZE}, shared system prompt of {shared} tokens", fontsize=10)
figure.tight_layout()
figure.savefig("../figures/08_prefix_cache_ttft.png", dpi=100)

# %% [markdown]
# ### Requests that arrive together
#
# A block is registered only after its KV is computed, at the end of a step.
# So requests admitted in the **same** step cannot share anything: none of them is cached yet.
# Sent as one batch to a cold cache, the eight questions find nothing; sent again, they all hit.

# %%
llm_batch = LLM(enable_prefix_caching=True, block_size=BLOCK_SIZE)
batch_manager = llm_batch.engine.core.block_manager
batch_prompts = [{"prompt_token_ids": p} for p in prompts]
cold = llm_batch.generate(batch_prompts, GREEDY, use_tqdm=False)
cold_hits = batch_manager.num_hit_tokens
warm = llm_batch.generate(batch_prompts, GREEDY, use_tqdm=False)
print(f"cold cache, all at once: {cold_hits} cached tokens; warm cache: {batch_manager.num_hit_tokens - cold_hits}")
print("same tokens as one at a time:", [o.outputs[0].token_ids for o in cold + warm] ==
      [o.outputs[0].token_ids for o in served_off] * 2)

# %% [markdown]
# Our attention backend writes every new token's KV into the pool before any sequence reads,
# so registering blocks when they are scheduled, not when they are computed, would also be correct here
# and would let same-step requests share. We keep the simpler rule; exercise 3 asks you to measure the difference.

# %% [markdown]
# ## Two requests sharing blocks, step by step
#
# The view below replays a small scenario on a pool of 8 blocks of 4 tokens, without the model.
# Tokens `s1 … s8` are a system prompt, the others are the users' own tokens.
# Each box is a physical block: its tokens, its reference count, and its key when it is cached.
# Hatched blocks are evictable: free, but still holding cached KV.

# %%
import copy

labels = {}


def tokens(prefix: str, count: int, start: int) -> list[int]:
    ids = list(range(start, start + count))
    labels.update({token_id: f"{prefix}{i + 1}" for i, token_id in enumerate(ids)})
    return ids


system_tokens = tokens("s", 8, 100)
request_tokens = {"A": system_tokens + tokens("a", 3, 200), "B": system_tokens + tokens("b", 2, 300),
                  "C": system_tokens + tokens("c", 1, 400), "D": tokens("d", 28, 500)}
scenario = PrefixCachingBlockManager(num_blocks=8, block_size=4)
history = [(copy.deepcopy(scenario), "An empty pool of 8 blocks of 4 tokens.")]


def record(event: str) -> None:
    history.append((copy.deepcopy(scenario), event))


def admit(name: str) -> int:
    return scenario.allocate_cached(name, request_tokens[name])


def prefill(name: str) -> None:
    scenario.cache_computed_blocks(name, request_tokens[name], len(request_tokens[name]))


hits = admit("A")
record(f"A arrives (11 tokens): {hits} tokens cached, so it gets 3 new blocks.")
prefill("A")
record("A's prefill ran: its 2 full blocks get keys; the partial third block does not.")
hits = admit("B")
record(f"B arrives with the same system prompt: {hits} tokens cached, so it shares 2 blocks (refcount 2) and gets 1 new block.")
prefill("B")
scenario.free("A")
record("A finishes: its partial block is free; the shared blocks drop to refcount 1.")
scenario.free("B")
record("B finishes: the system blocks have refcount 0 but stay cached (evictable).")
hits = admit("C")
record(f"C arrives with the system prompt: {hits} tokens cached; both evictable blocks are revived.")
prefill("C")
scenario.free("C")
record("C finishes: the system blocks are evictable again, now the most recently freed.")
hits = admit("D")
record("D, an unrelated 28-token prompt, needs 7 blocks: it takes the free queue from the front and evicts the LRU cached block.")
print(f"{len(history)} snapshots; evictions at the end: {scenario.allocator.num_evictions}; "
      f"still cached: {[entry.block_id for entry in scenario.allocator.cached_blocks()]}")

# %%
SEQUENCE_COLORS = {"A": "#1f77b4", "B": "#ff7f0e", "C": "#2ca02c", "D": "#9467bd"}
SHARED_COLOR = "#d62728"


def draw_prefix_state(manager: PrefixCachingBlockManager, axes: plt.Axes, title: str = "") -> None:
    """Draw each physical block with its tokens, owner colour, reference count and (short) key."""
    size = manager.block_size
    owners: dict[int, list[str]] = {}
    contents: dict[int, list[int]] = {}
    for seq_id in manager.sequences():
        ids = request_tokens[seq_id]
        for index, block_id in enumerate(manager.block_table(seq_id)):
            owners.setdefault(block_id, []).append(seq_id)
            contents.setdefault(block_id, ids[index * size:(index + 1) * size])
    for block_id in range(manager.num_blocks):
        x = block_id * (size + 0.8)
        entry = manager.allocator.entry(block_id)
        refcount = manager.allocator.refcount(block_id)
        cells = contents.get(block_id) or (list(entry.token_ids) if entry else [])
        if refcount > 1:
            color = SHARED_COLOR
        elif refcount == 1:
            color = SEQUENCE_COLORS[owners[block_id][0]]
        else:
            color = "#dddddd" if entry else "white"
        hatch = "//" if entry and refcount == 0 else None
        axes.add_patch(Rectangle((x, 0), size, 1, facecolor=color, alpha=0.55, hatch=hatch, edgecolor="#333333"))
        for offset, token_id in enumerate(cells):
            axes.text(x + offset + 0.5, 0.5, labels[token_id], ha="center", va="center", fontsize=7)
        axes.text(x + size / 2, 1.25, f"#{block_id}  ref {refcount}", ha="center", fontsize=8)
        if entry:
            axes.text(x + size / 2, -0.3, f"key …{entry.key % 10000:04d}", ha="center", fontsize=7)
    for row, seq_id in enumerate(manager.sequences()):
        axes.text(0, -0.9 - 0.45 * row, f"{seq_id}: block table {manager.block_table(seq_id)}", fontsize=8,
                  color=SEQUENCE_COLORS[seq_id])
    axes.set_xlim(-0.3, manager.num_blocks * (size + 0.8))
    axes.set_ylim(-1.8, 1.6)
    axes.axis("off")
    axes.set_title(title, fontsize=9, loc="left")


# %% [markdown]
# The whole scenario, drawn once (also saved as `figures/08_shared_blocks.png`):

# %%
figure, axes_list = plt.subplots(len(history), 1, figsize=(11, 1.25 * len(history)))
for axes, (snapshot, event) in zip(axes_list, history):
    draw_prefix_state(snapshot, axes, event)
figure.tight_layout()
figure.savefig("../figures/08_shared_blocks.png", dpi=90)

# %% [markdown]
# ### Step through it yourself

# %% tags=["nbval-ignore-output"]
step_slider = widgets.IntSlider(value=0, min=0, max=len(history) - 1, description="step")
event_label = widgets.Label()
state_view = widgets.Output()


def show_step(change=None) -> None:
    snapshot, event = history[step_slider.value]
    event_label.value = event
    with state_view:
        state_view.clear_output(wait=True)
        figure, axes = plt.subplots(figsize=(11, 1.8))
        draw_prefix_state(snapshot, axes)
        display(figure)
        plt.close(figure)  # shown once, in the view, not again below the cell


step_slider.observe(show_step, names="value")
show_step()
display(widgets.VBox([step_slider, event_label, state_view]))

# %% [markdown]
# ## Summary
#
# * A full block's key is a hash of its token ids chained with its parent's key, so equal keys mean "same tokens after the same prefix".
#   A hit is confirmed by the stored token ids and parent entry, so even colliding keys never reuse the wrong KV.
# * A block gets a key only when all its tokens have KV. The block holding a prompt's last token is never reused, so at least that token is computed and its logits exist.
# * Shared blocks carry one reference per sequence. When the last one leaves, a cached block stays in the free queue with its KV: it is reused by a hit or evicted, least recently used first, when allocation reaches it.
# * With the cache on, the engine produces the same tokens as without it, and on a chat workload with a shared system prompt it skipped most of the prefill work.
#
# Chapter 09 measures the whole engine against Hugging Face `generate` and looks at what production engines add.
#
# ## Exercises
#
# 1. With $B = 16$, a request has a 200-token prompt whose first 150 tokens are cached.
#    How many tokens does its prefill compute? Check with `answer_tokens` below.
# 2. Delete the `entry.parent_entry == parent_entry` test in `PrefixCachingBlockAllocator.find` (in a copy),
#    use the constant hash, and find two prompts for which the cache now reuses KV computed after other tokens.
#    Do the generated tokens change?
# 3. Register blocks when they are scheduled instead of when they are computed
#    (call `cache_computed_blocks` with `num_computed_tokens + num_new_tokens` before the forward pass).
#    Run the "requests that arrive together" cell again: how many tokens hit now, and are the outputs still the same?

# %%
answer_tokens = None  # exercise 1: prompt tokens the prefill computes

if answer_tokens is None:
    print("Exercise 1 not answered yet.")
else:
    check = PrefixCachingBlockManager(num_blocks=32, block_size=16)
    cached_prompt = list(range(1000, 1200))
    check.allocate_cached("warm", cached_prompt[:150] + [0] * 10)
    check.cache_computed_blocks("warm", cached_prompt[:150] + [0] * 10, 160)
    correct = answer_tokens == 200 - check.allocate_cached("new", cached_prompt)
    print("correct" if correct else "not quite: only whole blocks are cached")
