# %% [markdown]
# # 02 · The KV cache: decode in linear time
#
# Chapter 01 generated text by running the model over the whole sequence at every step,
# so the time per new token grew with the length of the text.
# In this chapter we keep each token's keys and values once they are computed, in a **KV cache**.
# Generation then splits into a **prefill**, which runs the whole prompt in one pass and fills the cache,
# and **decode** steps, which run one new token per sequence and read the cache.
#
# **At the end** you will have `ContiguousKVCache`, an attention backend that stores keys and values per sequence;
# `generate_cached`, which reproduces chapter 01 and transformers token for token at a fraction of the cost;
# `generate_batch_cached`, which runs prompts of different lengths in one batch;
# and two measurements: what the cache costs in memory, and how much of it a static batch wastes.

# %% [markdown]
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-github-user/nano-vllm-course/blob/main/notebooks/02_kv_cache.ipynb) [![Launch on Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/your-github-user/nano-vllm-course/main?urlpath=lab/tree/notebooks/02_kv_cache.ipynb)

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
import random
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from transformers import AutoModelForCausalLM

from nanovllm_lib import CausalAttention, SamplingParams, finish_reason, generate_naive, load_model

torch.manual_seed(0)
lm = load_model()  # the embedded SmolLM2-135M-Instruct, fp32 on the CPU
config, tokenizer = lm.config, lm.tokenizer
reference = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
print(f"{config.num_layers} layers, {config.num_heads} query heads, {config.num_kv_heads} KV heads, head_dim {config.head_dim}")

# %% [markdown]
# The prompts we check against: three plain ones of different lengths and a chat-templated one.

# %%
texts = [
    "The capital of France is",
    "def fibonacci(n):",
    "Paged memory lets an operating system run programs larger than physical memory because",
]


def chat(message: str) -> list[int]:
    """Token ids of a one-message chat, ready for the assistant's reply."""
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=True,
                                         add_generation_prompt=True, return_dict=True)["input_ids"]


chat_prompt = chat("Give me three tips for sleeping well.")
prompt_id_lists = [tokenizer(text)["input_ids"] for text in texts] + [chat_prompt]
print("prompt lengths:", [len(ids) for ids in prompt_id_lists])

# %% [markdown]
# ## Why: the naive loop recomputes what it already computed
#
# At every step, chapter 01's loop runs all $t$ tokens so far through all 30 layers.
# But in a causal model a token's keys and values depend only on that token and the ones before it,
# so the keys and values of tokens $0 \dots t-1$ come out the same at step $t+1$ as at step $t$.
#
# We can see that directly. A backend that records what each layer is given lets us compare
# the keys of layer 0 from a pass over 12 tokens and a pass over the same 12 plus one more.

# %%
class RecordingAttention(CausalAttention):
    """Causal attention without a cache that also keeps each layer's keys and values."""

    def __init__(self):
        super().__init__()
        self.keys, self.values = {}, {}

    def attend(self, layer, q, k, v):
        self.keys[layer], self.values[layer] = k, v
        return super().attend(layer, q, k, v)


ids = prompt_id_lists[2][:13]
short, longer = RecordingAttention(), RecordingAttention()
with torch.no_grad():
    lm.model(torch.tensor([ids[:12]]), torch.arange(12)[None], short)
    lm.model(torch.tensor([ids]), torch.arange(13)[None], longer)
same_keys = all(torch.allclose(short.keys[layer][0], longer.keys[layer][0, :12], atol=1e-5) for layer in range(config.num_layers))
same_values = all(torch.allclose(short.values[layer][0], longer.values[layer][0, :12], atol=1e-5) for layer in range(config.num_layers))
print("keys shape per layer:", tuple(short.keys[0].shape), "= [batch, tokens, KV heads, head_dim]")
print("the first 12 tokens' keys are unchanged by a 13th token, in every layer:", same_keys)
print("... and their values too:", same_values)

# %% [markdown]
# So step $t$ repeats $t-1$ tokens' worth of work whose result it already had.
# Here is what that costs: the time of one naive step, which is one forward pass over the whole sequence,
# at a few sequence lengths (best of 2, on this machine's CPU cores).

# %%
def time_it(function, repeats: int = 2) -> float:
    """Return the best wall time of `repeats` calls, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def naive_step(length: int) -> None:
    ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        lm.model.compute_logits(lm.model(ids, torch.arange(length)[None], CausalAttention())[0, -1])


step_lengths = [8, 64, 128, 192, 264]
naive_step(8)  # warm-up
naive_step_s = [time_it(lambda: naive_step(n)) for n in step_lengths]

# %% tags=["nbval-ignore-output"]
for n, seconds in zip(step_lengths, naive_step_s):
    print(f"naive step at length {n:3d}: {seconds * 1e3:6.1f} ms")

# %% [markdown]
# The cost grows with the length: a 256-token reply pays for about $256^2/2 \approx 33{,}000$ token-passes
# through the network where 256 would do.
# The fix is to keep the keys and values: the **KV cache**.

# %% [markdown]
# ## Step 1: where each token goes
#
# The cache is contiguous per sequence. For each layer it holds one tensor of keys and one of values,
# shaped `[batch, max_len, num_kv_heads, head_dim]`. Slot $p$ of row $b$ stores the token at position $p$ of sequence $b$.
# Only the 3 KV heads are stored, not the 9 query heads: grouped-query attention shares each KV head among 3 query heads,
# and the sharing happens when attention reads the cache.
#
# Each row keeps its own **length**, the number of tokens it holds.
# A forward pass adds a chunk of $T$ tokens to every row: the whole prompt in the prefill, one token per decode step.
# The chunk's tokens go to slots `length, length + 1, ..., length + T - 1`, and those are also their **positions**,
# the numbers RoPE rotates by. Positions come from the cache length, never from the start of the chunk:
# the one new token of a decode step at length 40 sits at position 40, not 0.

# %%
#| default_exp kv_cache

# %%
#| export
from __future__ import annotations

from collections.abc import Sequence

import torch

from nanovllm_lib.config import ModelConfig
from nanovllm_lib.generation import Generation, finish_reason, validate_prompt
from nanovllm_lib.model import scaled_dot_product
from nanovllm_lib.sampling import SamplingParams, make_generator, sample_batch, sample_token
from nanovllm_lib.weights import LoadedModel


# %%
#| export
def chunk_slots(lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Return the slots (which are also the positions) [B, num_tokens] of a chunk appended to rows of `lengths` [B]."""
    return lengths[:, None] + torch.arange(num_tokens, device=lengths.device)


# %%
from nanovllm_lib.kv_cache import chunk_slots

print("two rows holding 0 and 3 tokens, a chunk of 2 each:", chunk_slots(torch.tensor([0, 3]), 2).tolist())
print("one decode token for rows holding 5 and 9 tokens:  ", chunk_slots(torch.tensor([5, 9]), 1).tolist())

# %% [markdown]
# ## Step 2: what each query may see
#
# After the chunk is written, query $i$ of row $b$ sits at slot $s = \text{length}_b + i$.
# It may attend to every slot up to and including $s$: all cached tokens, and the chunk's tokens up to itself.
# That one rule is causal attention inside the chunk and full attention over the past.
# It also hides whatever sits beyond a row's length, which matters once rows of different lengths share a batch.

# %%
#| export
def visible_slots(slots: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Return the attention mask [B, T, num_keys], True where key slot j <= the query's slot in `slots` [B, T]."""
    key_slots = torch.arange(num_keys, device=slots.device)
    return key_slots[None, None, :] <= slots[:, :, None]


# %%
from nanovllm_lib.kv_cache import visible_slots

mask = visible_slots(chunk_slots(torch.tensor([0, 3]), 2), num_keys=5)
print("row 0 (empty, chunk of 2):\n", mask[0].int().numpy())
print("row 1 (3 cached, chunk of 2):\n", mask[1].int().numpy())

# %% [markdown]
# ## Step 3: the cache as an attention backend
#
# The model calls `backend.attend(layer, q, k, v)` in each of its 30 layers.
# Our cache implements that call: it stores this chunk's `k` and `v` at the chunk's slots,
# then runs attention of `q` over every slot the row holds.
#
# The row lengths must stay put while the 30 layers run, because every layer writes the same slots.
# So `attend` never moves them. After the forward pass, `advance(n)` **commits** the chunk:
# each row's length grows by the number of tokens it really added.
# That is also where padding is dropped: a row padded from 3 to 5 tokens commits 3,
# so its padding slots count as empty and the next tokens overwrite them.
# The cache checks the protocol, too: a layer written twice before `advance`, or `advance` after a partial pass, raises.
#
# A row that would outgrow `max_len` raises a `ValueError` that gives the numbers and the fix,
# before anything is written: never a silent overwrite of another token's slot.

# %%
#| export
def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, element_bytes: int) -> int:
    """Return the cache bytes one token occupies: a key and a value vector per KV head, in every layer."""
    return 2 * num_layers * num_kv_heads * head_dim * element_bytes


class ContiguousKVCache:
    """A KV cache with one contiguous slab of `max_len` slots per sequence; also the attention backend that reads it.

    keys[layer], values[layer]: [batch_size, max_len, num_kv_heads, head_dim]. Slot p of row b stores position p.
    lengths: [batch_size] int64, the tokens committed in each row.
    Protocol: one forward pass calls `attend` once per layer with the same chunk of T tokens per row,
    then `advance` commits how many of those T tokens each row keeps.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1.")
        if not (isinstance(max_len, int) and max_len >= 1):
            raise ValueError(f"max_len={max_len!r} must be an integer >= 1 (the slots per sequence).")
        self.config = config
        self.batch_size, self.max_len = batch_size, max_len
        shape = (batch_size, max_len, config.num_kv_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._chunk_len: int | None = None  # tokens per row written since the last advance()
        self._layers_written: set[int] = set()

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value tensors of all layers."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def check_room(self, num_tokens: int) -> None:
        """Raise ValueError if appending num_tokens to any row would pass max_len."""
        needed = self.lengths + num_tokens
        if bool((needed > self.max_len).any()):
            row = int(torch.argmax(needed))
            raise ValueError(
                f"KV cache is full: row {row} contains {int(self.lengths[row])} tokens and this step adds {num_tokens}, "
                f"{int(needed[row])} in all, but max_len is {self.max_len}. "
                "Allocate the cache with max_len >= prompt length + max_tokens - 1, or shorten the request."
            )

    def positions(self, num_tokens: int) -> torch.Tensor:
        """Return the positions [batch_size, num_tokens] of the next chunk: each row continues from its length."""
        self.check_room(num_tokens)
        return chunk_slots(self.lengths, num_tokens)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v [B, T, Hkv, d] after each row's cached tokens; return q [B, T, H, d] attended over the row so far.

        Query i of row b attends to slots 0 .. lengths[b] + i. Nothing is written if a check fails.
        """
        c = self.config
        if q.dim() != 4 or q.shape[0] != self.batch_size or q.shape[2:] != (c.num_heads, c.head_dim):
            raise ValueError(f"q has shape {tuple(q.shape)}, expected ({self.batch_size}, T, {c.num_heads}, {c.head_dim}).")
        chunk = q.shape[1]
        expected = (self.batch_size, chunk, c.num_kv_heads, c.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both have shape {expected}.")
        if not 0 <= layer < c.num_layers:
            raise ValueError(f"layer={layer} is outside [0, {c.num_layers}).")
        if layer in self._layers_written or self._chunk_len not in (None, chunk):
            raise RuntimeError(
                f"Layer {layer} got a chunk of {chunk} tokens, but the cache contains an uncommitted chunk of "
                f"{self._chunk_len} tokens written to layers {sorted(self._layers_written)}. "
                "Call advance() once after each forward pass."
            )
        self.check_room(chunk)

        slots = chunk_slots(self.lengths, chunk)  # [B, T]
        rows = torch.arange(self.batch_size, device=slots.device)[:, None]  # [B, 1]
        self.keys[layer][rows, slots] = k.to(self.keys[layer].dtype)
        self.values[layer][rows, slots] = v.to(self.values[layer].dtype)
        self._chunk_len = chunk
        self._layers_written.add(layer)

        num_keys = int(self.lengths.max()) + chunk  # no row may see a slot beyond this
        mask = visible_slots(slots, num_keys)  # [B, T, num_keys]
        return scaled_dot_product(q, self.keys[layer][:, :num_keys], self.values[layer][:, :num_keys], mask)

    def advance(self, num_tokens: int | Sequence[int] | torch.Tensor) -> None:
        """Commit the chunk just written: row b keeps its first num_tokens[b] tokens (an int applies to every row).

        Call once after each forward pass. A right-padded row commits only its real tokens, a finished row 0.
        """
        if self._chunk_len is None:
            raise RuntimeError("advance() was called, but no forward pass has written to the cache since the last one.")
        if len(self._layers_written) != self.config.num_layers:
            raise RuntimeError(
                f"Only layers {sorted(self._layers_written)} of {self.config.num_layers} were written; "
                "call advance() after the whole forward pass."
            )
        counts = torch.as_tensor(num_tokens, dtype=torch.long, device=self.lengths.device)
        if counts.dim() == 0:
            counts = counts.expand(self.batch_size)
        if tuple(counts.shape) != (self.batch_size,):
            raise ValueError(f"num_tokens has {counts.numel()} entries; pass one int, or one per row ({self.batch_size}).")
        if bool(((counts < 0) | (counts > self._chunk_len)).any()):
            raise ValueError(f"num_tokens {counts.tolist()} must each be in [0, {self._chunk_len}], the chunk just written.")
        self.lengths += counts
        self._chunk_len = None
        self._layers_written.clear()


# %% [markdown]
# A self-check on a tiny config, with keys we can read: each token's key is filled with its global index.
# Row 0 gets 3 tokens, row 1 gets 2 (its third is padding), then each row gets one more.
# The keys must land at slots 0, 1, 2 and then 3 for row 0, and at 0, 1 and then 2 for row 1,
# where the decode token overwrites row 1's padding.

# %%
from dataclasses import replace

from nanovllm_lib.kv_cache import ContiguousKVCache

tiny = replace(config, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)


def marked(values: list[list[float]]) -> torch.Tensor:
    """Keys whose every entry is the given number: [B, T] numbers -> [B, T, 1, 4]."""
    return torch.tensor(values, dtype=torch.float32)[:, :, None, None].expand(-1, -1, 1, 4)


cache = ContiguousKVCache(tiny, batch_size=2, max_len=6)
k = marked([[1, 2, 3], [11, 12, 99]])  # 99: row 1's padding
q = torch.randn(2, 3, 2, 4)
print("positions of the prompt chunk:", cache.positions(3).tolist())
cache.attend(0, q, k, k)
cache.advance([3, 2])
print("lengths after the prompt:", cache.lengths.tolist())
cache.attend(0, q[:, :1], marked([[4], [13]]), marked([[4], [13]]))
cache.advance(1)
print("lengths after one decode step:", cache.lengths.tolist())
print("row 0, slot by slot:", cache.keys[0][0, :, 0, 0].tolist())
print("row 1, slot by slot:", cache.keys[0][1, :, 0, 0].tolist())

# %% [markdown]
# Writing past the end raises, names the numbers, and leaves the cache untouched:

# %%
before = cache.keys[0].clone()
try:
    cache.attend(0, torch.randn(2, 3, 2, 4), marked([[5, 6, 7], [14, 15, 16]]), marked([[5, 6, 7], [14, 15, 16]]))
except ValueError as error:
    print("ValueError:", error)
print("nothing written:", torch.equal(before, cache.keys[0]), "| lengths still", cache.lengths.tolist())

# %% [markdown]
# The check that matters for attention: feeding a sequence in pieces through the cache
# must give the same outputs as causal attention over the whole sequence at once.
# We split 9 random tokens into chunks of 4, 1, 3 and 1 (with 9 query heads and 3 KV heads, as in the real model).

# %%
from nanovllm_lib.model import scaled_dot_product

gqa = replace(config, num_layers=1)
generator = torch.Generator().manual_seed(0)
q = torch.randn(1, 9, config.num_heads, config.head_dim, generator=generator)
k = torch.randn(1, 9, config.num_kv_heads, config.head_dim, generator=generator)
v = torch.randn(1, 9, config.num_kv_heads, config.head_dim, generator=generator)
whole = scaled_dot_product(q, k, v, torch.ones(9, 9, dtype=torch.bool).tril()[None])

cache = ContiguousKVCache(gqa, batch_size=1, max_len=9)
pieces, start = [], 0
for size in [4, 1, 3, 1]:
    pieces.append(cache.attend(0, q[:, start:start + size], k[:, start:start + size], v[:, start:start + size]))
    cache.advance(size)
    start += size
print("chunked through the cache == whole sequence at once:", torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-6))

# %% [markdown]
# ## Step 4: prefill and decode on the real model
#
# Two functions drive the model with the cache.
# `prefill` runs each row's prompt in one forward pass and returns the logits of each row's last prompt token.
# `decode_step` feeds one token per row. Both take their positions from `cache.positions`, and both call `advance`.
#
# Prompts of different lengths are **right-padded** to the longest.
# Right padding suits a cache with per-row lengths. Every row starts at slot 0 and position 0,
# and its padding sits after its real tokens, where causal attention never looks.
# Committing only the real tokens then turns the padding slots back into free space for the reply.
# (Hugging Face pads on the left because its cache has one write index for the whole batch;
# then every row needs a position offset and a mask over its leading padding.)

# %%
#| export
def model_dtype(lm: LoadedModel) -> torch.dtype:
    """Return the dtype of the model's weights, which its keys and values share."""
    return lm.model.model.embed_tokens.weight.dtype


@torch.no_grad()
def prefill(lm: LoadedModel, cache: ContiguousKVCache, prompts: list[list[int]]) -> torch.Tensor:
    """Run one prompt per cache row through the model, filling the cache; return next-token logits [B, vocab].

    Prompts are right-padded to the longest; each row commits only its real tokens.
    Positions continue from each row's cache length, so a prompt can also extend a row that already contains tokens.
    """
    if len(prompts) != cache.batch_size:
        raise ValueError(f"{len(prompts)} prompts for a cache of {cache.batch_size} rows; pass one prompt per row.")
    lengths = [len(prompt) for prompt in prompts]
    if min(lengths) == 0:
        raise ValueError(f"Prompt {lengths.index(0)} is empty; pass at least one token id per row.")
    chunk = max(lengths)
    ids = torch.zeros(len(prompts), chunk, dtype=torch.long, device=lm.device)  # [B, T], padding id 0
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = torch.tensor(prompt, device=lm.device)
    positions = cache.positions(chunk)  # [B, T]
    hidden = lm.model(ids, positions, cache)  # [B, T, hidden]
    cache.advance(lengths)
    last = torch.tensor(lengths, device=lm.device) - 1
    return lm.model.compute_logits(hidden[torch.arange(len(prompts), device=lm.device), last])  # [B, vocab]


@torch.no_grad()
def decode_step(lm: LoadedModel, cache: ContiguousKVCache, tokens: list[int],
                active: Sequence[bool] | None = None) -> torch.Tensor:
    """Feed one token per row and return next-token logits [B, vocab].

    Rows whose `active` entry is False are computed but not committed, so their length stays put.
    """
    if len(tokens) != cache.batch_size:
        raise ValueError(f"{len(tokens)} tokens for a cache of {cache.batch_size} rows; pass one token per row.")
    ids = torch.tensor(tokens, device=lm.device)[:, None]  # [B, 1]
    positions = cache.positions(1)  # [B, 1]
    hidden = lm.model(ids, positions, cache)  # [B, 1, hidden]
    cache.advance(1 if active is None else [int(bool(a)) for a in active])
    return lm.model.compute_logits(hidden[:, 0])  # [B, vocab]


# %% [markdown]
# Self-check: prefill a prompt, then decode 5 tokens of it one at a time.
# After each step, the logits must match a forward pass without a cache over the whole sequence so far.

# %%
from nanovllm_lib.kv_cache import decode_step, prefill


def uncached_logits(ids: list[int]) -> torch.Tensor:
    """Next-token logits [vocab] from one forward pass over all of `ids`, without a cache."""
    with torch.no_grad():
        hidden = lm.model(torch.tensor([ids]), torch.arange(len(ids))[None], CausalAttention())
        return lm.model.compute_logits(hidden[0, -1])


ids = prompt_id_lists[2]
cache = ContiguousKVCache(config, batch_size=1, max_len=len(ids))
logits = prefill(lm, cache, [ids[:-5]])[0]
differences = [(logits - uncached_logits(ids[:-5])).abs().max().item()]
for n in range(len(ids) - 5, len(ids)):
    logits = decode_step(lm, cache, [ids[n]])[0]
    differences.append((logits - uncached_logits(ids[:n + 1])).abs().max().item())
print("cache length:", cache.lengths.tolist(), "of max_len", cache.max_len)
print("prefill + 5 decode steps, every max |Δlogit| < 1e-4:", max(differences) < 1e-4)

# %% [markdown]
# What if the decode token took its position from the start of its chunk, that is 0, instead of from the cache length?
# The model would see the token's keys rotated as if it were the first token of the text.
# We run the same 5 steps with that bug:

# %%
cache = ContiguousKVCache(config, batch_size=1, max_len=len(ids))
prefill(lm, cache, [ids[:-5]])
wrong = []
with torch.no_grad():
    for n in range(len(ids) - 5, len(ids)):
        hidden = lm.model(torch.tensor([[ids[n]]]), torch.zeros(1, 1, dtype=torch.long), cache)  # position 0: the bug
        cache.advance(1)
        wrong.append((lm.model.compute_logits(hidden[0, -1]) - uncached_logits(ids[:n + 1])).abs().max().item())
print("max |Δlogit| per step with positions from the chunk start:", [round(d, 1) for d in wrong])

# %% [markdown]
# Errors of several logits, enough to change which token wins.
# Nothing raises an error, which is what makes this bug dangerous: only a comparison like this one reveals it.

# %% [markdown]
# ## Step 5: generation with the cache
#
# `generate_cached` is chapter 01's loop with the model call split in two:
# one `prefill` over the prompt, then one `decode_step` per new token.
# It reuses chapter 01's prompt validation, sampling and stopping rules unchanged.
#
# The cache needs `prompt + max_tokens - 1` slots: the last generated token is returned but never fed back.
# A request longer than the model's context window (`max_position_embeddings`, 8,192 here) is rejected up front.

# %%
#| export
def validate_context_length(prompt_len: int, max_tokens: int, config: ModelConfig) -> None:
    """Raise ValueError if prompt_len + max_tokens passes the model's context window."""
    total = prompt_len + max_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"The prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is {total} tokens, more than the "
            f"model's context window of {config.max_position_embeddings}. Shorten the prompt or lower max_tokens."
        )


@torch.no_grad()
def generate_cached(lm: LoadedModel, prompt_ids: list[int], params: SamplingParams) -> Generation:
    """Generate for one prompt with a KV cache: one prefill pass, then one decode pass per new token."""
    validate_prompt(prompt_ids, lm.config.vocab_size)
    validate_context_length(len(prompt_ids), params.max_tokens, lm.config)
    cache = ContiguousKVCache(lm.config, 1, len(prompt_ids) + params.max_tokens - 1, model_dtype(lm), lm.device)
    generator = make_generator(params.seed, lm.device)
    logits = prefill(lm, cache, [list(prompt_ids)])[0]  # [vocab]
    generated: list[int] = []
    while True:
        token = sample_token(logits, params, generator)
        generated.append(token)
        reason = finish_reason(token, len(generated), params, lm.eos_token_ids)
        if reason is not None:
            return Generation(generated, reason)
        logits = decode_step(lm, cache, [token])[0]


# %% [markdown]
# Self-check: greedy ids identical to chapter 01's `generate_naive` and to transformers' `generate`
# (which has its own KV cache), for every prompt and several lengths.
# We ignore EOS so each comparison runs its full length.

# %%
from nanovllm_lib.kv_cache import generate_cached


def hf_greedy(ids: list[int], max_new_tokens: int) -> list[int]:
    # The explicit mask matters: the pad id is also <|im_end|>, which chat prompts contain,
    # and without a mask generate would infer one that hides those prompt tokens.
    with torch.no_grad():
        output = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=None, pad_token_id=tokenizer.eos_token_id)
    return output[0, len(ids):].tolist()


for ids in prompt_id_lists:
    naive = generate_naive(lm, ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)).token_ids
    hf = hf_greedy(ids, 12)
    for max_tokens in [1, 5, 12]:
        # Greedy decoding is prefix-consistent, so the first max_tokens ids of the 12-token runs are the references.
        ours = generate_cached(lm, ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)).token_ids
        print(f"{len(ids):3d}-token prompt, {max_tokens:2d} tokens: == naive {ours == naive[:max_tokens]}, "
              f"== transformers {ours == hf[:max_tokens]}")

# %% [markdown]
# With EOS honoured, a chat reply stops on `<|im_end|>` exactly where the naive loop stops, with the same finish reason.

# %%
params = SamplingParams(temperature=0, max_tokens=60)
say_hi = chat("Say hi.")
cached_reply = generate_cached(lm, say_hi, params)
print("same Generation as naive:", cached_reply == generate_naive(lm, say_hi, params))
print(cached_reply.finish_reason, len(cached_reply.token_ids), "tokens")
print(tokenizer.decode(cached_reply.token_ids, skip_special_tokens=True))

# %% [markdown]
# Token equality can hide small errors that happen not to change the argmax.
# The stricter check compares logits: at every step of a 20-token greedy run from a 10-token prompt,
# the cached logits must be within 1e-4 of a forward pass without a cache over the whole sequence.

# %%
ids = tokenizer("The three most important inventions in history are")["input_ids"][:10]
cache = ContiguousKVCache(config, batch_size=1, max_len=len(ids) + 20)
logits = prefill(lm, cache, [ids])[0]
sequence, step_differences, same_choice = list(ids), [], []
for _ in range(20):
    expected = uncached_logits(sequence)
    step_differences.append((logits - expected).abs().max().item())
    same_choice.append(int(logits.argmax()) == int(expected.argmax()))
    sequence.append(int(logits.argmax()))
    logits = decode_step(lm, cache, [sequence[-1]])[0]
print("prompt tokens:", len(ids), "| steps compared:", len(step_differences))
print("max |Δlogit| < 1e-4 at every step:", max(step_differences) < 1e-4)
print("same greedy token at every step:", all(same_choice))

# %% tags=["nbval-ignore-output"]
print("largest difference over the 20 steps:", f"{max(step_differences):.1e}")

# %% [markdown]
# ## Step 6: a batch of prompts
#
# Serving several requests at once shares each weight read among them.
# `generate_batch_cached` puts prompts of different lengths in one cache, one row each:
#
# * the prefill right-pads the prompts, and each row commits only its real tokens;
# * every decode step feeds one token per row at that row's own position, the cache length of the row;
# * a row that finishes stops being counted: its tokens are no longer kept and its length no longer advances,
#   but it is still computed, because a static batch runs until its longest request ends.
#
# Each row samples with its own generator, seeded from its own params,
# so a row's output does not depend on which other rows share the batch.
# `params` is one `SamplingParams` for every prompt, or a list with one per prompt.

# %%
#| export
def cache_length_for(prompt_lens: list[int], max_tokens: list[int]) -> int:
    """Return the slots per row a static batch needs: the longest prompt, or the longest prompt + max_tokens - 1."""
    return max(max(prompt_lens), max(p + m - 1 for p, m in zip(prompt_lens, max_tokens)))


@torch.no_grad()
def generate_batch_cached(lm: LoadedModel, prompts: list[list[int]],
                          params: SamplingParams | list[SamplingParams]) -> list[Generation]:
    """Generate for several prompts in one static batch with a contiguous KV cache; one Generation per prompt."""
    if len(prompts) == 0:
        raise ValueError("No prompts given; pass at least one list of token ids.")
    params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(params_list) != len(prompts):
        raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts; pass one, or one per prompt.")
    for prompt, row_params in zip(prompts, params_list):
        validate_prompt(prompt, lm.config.vocab_size)
        validate_context_length(len(prompt), row_params.max_tokens, lm.config)

    max_len = cache_length_for([len(p) for p in prompts], [p.max_tokens for p in params_list])
    cache = ContiguousKVCache(lm.config, len(prompts), max_len, model_dtype(lm), lm.device)
    generators = [make_generator(p.seed, lm.device) for p in params_list]
    outputs: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)

    logits = prefill(lm, cache, [list(p) for p in prompts])  # [B, vocab]
    while True:
        tokens = sample_batch(logits, params_list, generators)
        for row, token in enumerate(tokens):
            if reasons[row] is None:
                outputs[row].append(token)
                reasons[row] = finish_reason(token, len(outputs[row]), params_list[row], lm.eos_token_ids)
        if all(reason is not None for reason in reasons):
            return [Generation(tokens, reason) for tokens, reason in zip(outputs, reasons)]
        logits = decode_step(lm, cache, tokens, active=[reason is None for reason in reasons])


# %% [markdown]
# Self-check on positions first: two prompts whose lengths differ by more than 5 tokens.
# Each row's positions must start at 0 at its first real token, whatever the other row contains.

# %%
from nanovllm_lib.kv_cache import cache_length_for, generate_batch_cached

pair = [tokenizer("Short prompt")["input_ids"], tokenizer("This is a longer prompt with more tokens in it")["input_ids"]]
cache = ContiguousKVCache(config, batch_size=2, max_len=20)
print("prompt lengths:", [len(p) for p in pair])
print("prefill positions:", cache.positions(max(len(p) for p in pair)).tolist())
prefill(lm, cache, pair)
print("after prefill, lengths:", cache.lengths.tolist(), "| next decode positions:", cache.positions(1).tolist())

# %% [markdown]
# Row 0 writes all 10 slots during the prefill, 8 of them padding, but commits only its 2 real tokens,
# so its first decode token goes to slot 2 at position 2.
#
# Now the batch against one-by-one generation, greedy, in fp32 on the CPU: the ids must be identical.
# First with EOS ignored, so every row runs its full length.
# Then with EOS honoured on chat prompts, so rows finish at different steps while the batch keeps running.

# %%
greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
batch = generate_batch_cached(lm, prompt_id_lists, greedy)
one_by_one = [generate_cached(lm, ids, greedy) for ids in prompt_id_lists]
print("prompt lengths:", [len(ids) for ids in prompt_id_lists])
print("batch == one by one:", batch == one_by_one)

# %%
questions = ["Say hi.", "What is 2+2? Answer with one number.", "Name three colours.", "Write a haiku about the sea."]
chats = [chat(question) for question in questions]
chat_params = SamplingParams(temperature=0, max_tokens=30)
chat_batch = generate_batch_cached(lm, chats, chat_params)
print("reply lengths:", [len(g.token_ids) for g in chat_batch], "| finish reasons:", [g.finish_reason for g in chat_batch])
print("batch == one by one:", chat_batch == [generate_cached(lm, ids, chat_params) for ids in chats])

# %% [markdown]
# Sampling is batch-invariant too, because each row draws from its own seeded generator:

# %%
sampled = [SamplingParams(temperature=0.8, seed=row, max_tokens=12, ignore_eos=True) for row in range(len(chats))]
batch = generate_batch_cached(lm, chats, sampled)
print("sampled batch == one by one:", batch == [generate_cached(lm, ids, p) for ids, p in zip(chats, sampled)])

# %% [markdown]
# ## Measured: time per token, with and without the cache
#
# With the cache, a decode step runs one token through the network and reads the cache in attention.
# We time one decode step at the same lengths as the naive steps above (best of 2):
# each measurement prefills a cache to the length, then times decode steps committed one after another.

# %%
def cached_step_time(length: int, repeats: int = 2) -> float:
    """Best time of `repeats` decode steps into a cache that contains `length` tokens, in seconds."""
    ids = torch.randint(0, config.vocab_size, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    cache = ContiguousKVCache(config, batch_size=1, max_len=length + repeats)
    prefill(lm, cache, [ids])
    return time_it(lambda: decode_step(lm, cache, [ids[-1]]), repeats)


cached_step_s = [cached_step_time(n) for n in step_lengths]

# %% tags=["nbval-ignore-output"]
print(f"{'length':>6} {'naive ms':>9} {'cached ms':>10} {'ratio':>6}")
for n, naive_s, cached_s in zip(step_lengths, naive_step_s, cached_step_s):
    print(f"{n:6d} {naive_s * 1e3:9.1f} {cached_s * 1e3:10.1f} {naive_s / cached_s:6.1f}")

# %% [markdown]
# Now the end-to-end figure: 256 new tokens from the 5-token prompt, greedy, EOS ignored.
# The cached run is timed directly. A naive run of 256 tokens would take longer than this whole chapter should,
# so we **estimate** its time from the sampled step times above.
# We interpolate a time for each of the 256 sequence lengths the loop passes through, and add them up.
# To check the estimate, we time a real naive run of 32 tokens and compare it with the same estimate for 32 tokens.

# %%
def estimated_naive_seconds(prompt_len: int, new_tokens: int) -> float:
    """Sum of the interpolated naive step times at lengths prompt_len .. prompt_len + new_tokens - 1."""
    lengths = np.arange(prompt_len, prompt_len + new_tokens)
    return float(np.interp(lengths, step_lengths, naive_step_s).sum())


prompt = prompt_id_lists[0]
start = time.perf_counter()
generate_naive(lm, prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
naive_32_s = time.perf_counter() - start
start = time.perf_counter()
cached_256 = generate_cached(lm, prompt, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True))
cached_256_s = time.perf_counter() - start
naive_256_s = estimated_naive_seconds(len(prompt), 256)
print("cached run generated", len(cached_256.token_ids), "tokens")

# %% tags=["nbval-ignore-output"]
print(f"naive, 32 tokens:  measured {naive_32_s:5.2f} s, estimated {estimated_naive_seconds(len(prompt), 32):5.2f} s")
print(f"naive, 256 tokens: estimated {naive_256_s:5.1f} s ({naive_256_s / 256 * 1e3:5.1f} ms per token)")
print(f"cached, 256 tokens: measured {cached_256_s:5.1f} s ({cached_256_s / 256 * 1e3:5.1f} ms per token)")
print(f"speed-up for 256 tokens: {naive_256_s / cached_256_s:.1f}x")

# %%
figure, axes = plt.subplots(figsize=(6.5, 3.6))
axes.plot(step_lengths, [s * 1e3 for s in naive_step_s], "o-", label="naive: recompute everything")
axes.plot(step_lengths, [s * 1e3 for s in cached_step_s], "o-", label="KV cache: one token per step")
axes.set(xlabel="tokens in the sequence", ylabel="ms per new token", title="Time per generated token, SmolLM2-135M, CPU")
axes.set_ylim(bottom=0)
axes.grid(alpha=0.3)
axes.legend()
figure.tight_layout()
figure.savefig("../figures/02_time_per_token.png", dpi=100)

# %% [markdown]
# The naive step grows with the sequence; the cached step stays nearly flat.
# It still grows a little, because attention reads every cached key and value,
# but at these lengths the fixed cost of the weight matrices dominates.
# The speed-up therefore grows with the reply: the longer the text, the more the naive loop recomputes.
# (All timings depend on the machine and on what else runs on it; the figures above are from the run stored in this notebook.)

# %% [markdown]
# ## The memory bill
#
# The speed is paid for in memory. Each token keeps, in every layer, a key and a value vector for each KV head:
#
# $$\text{bytes per token} = 2 \times \text{layers} \times \text{KV heads} \times \text{head\_dim} \times \text{bytes per element}.$$
#
# We compute it from the config, then check it against the bytes of the tensors a cache really allocates.

# %%
from nanovllm_lib.kv_cache import kv_bytes_per_token

fp32_per_token = kv_bytes_per_token(config.num_layers, config.num_kv_heads, config.head_dim, element_bytes=4)
cache = ContiguousKVCache(config, batch_size=2, max_len=100)
print(f"formula: 2 x {config.num_layers} x {config.num_kv_heads} x {config.head_dim} x 4 bytes = {fp32_per_token:,} bytes per token (fp32)")
print(f"a cache of 2 x 100 slots allocates {cache.nbytes:,} bytes = 200 x {cache.nbytes // 200:,}:",
      cache.nbytes == 2 * 100 * fp32_per_token)
half = ContiguousKVCache(config, batch_size=1, max_len=10, dtype=torch.bfloat16)
print("bf16 cache, 10 slots:", half.nbytes == 10 * kv_bytes_per_token(config.num_layers, config.num_kv_heads, config.head_dim, 2))

# %% [markdown]
# Grouped-query attention is what keeps this small: storing all 9 heads, as plain multi-head attention would,
# costs 3 times as much. And at the model's full context of 8,192 tokens, one sequence costs:

# %%
mha_per_token = kv_bytes_per_token(config.num_layers, config.num_heads, config.head_dim, element_bytes=4)
context = config.max_position_embeddings
weights_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
print(f"multi-head (9 KV heads) would need {mha_per_token:,} bytes per token: {mha_per_token // fp32_per_token}x more")
print(f"one sequence at {context:,} tokens: {context * fp32_per_token / 2**20:,.0f} MiB fp32, "
      f"{context * fp32_per_token / 2 / 2**20:,.0f} MiB in bf16")
print(f"the model's weights: {weights_bytes / 2**20:,.0f} MiB fp32; "
      f"one full-length sequence needs {context * fp32_per_token / weights_bytes:.0%} of that")

# %% [markdown]
# A single full-length sequence costs a large fraction of the weights themselves, and every concurrent request needs its own.
# On a GPU, the memory left after the weights, divided by this bill, caps how many requests run at once.
# The table below is **computed from published configs** (`config.json` on the Hugging Face hub:
# layers, KV heads, head_dim and `max_position_embeddings`), in fp16/bf16, 2 bytes per element.

# %%
published = [  # name, layers, query heads, KV heads, head_dim, max_position_embeddings
    ("SmolLM2-135M (ours)", config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim, context),
    ("Llama-2-7B", 32, 32, 32, 128, 4096),
    ("Llama-3-8B", 32, 32, 8, 128, 8192),
    ("Mistral-7B-v0.1", 32, 32, 8, 128, 32768),
    ("Qwen2.5-7B-Instruct", 28, 28, 4, 128, 32768),
]
print(f"{'model':<20} {'layers':>6} {'KV/q heads':>10} {'KiB/token':>9} {'GQA saves':>9} {'context':>7} {'GiB/sequence':>12}")
for name, layers, heads, kv_heads, head_dim, max_positions in published:
    per_token = kv_bytes_per_token(layers, kv_heads, head_dim, element_bytes=2)
    print(f"{name:<20} {layers:6d} {f'{kv_heads}/{heads}':>10} {per_token / 1024:9.0f} {f'{heads // kv_heads}x':>9} "
          f"{max_positions:7d} {max_positions * per_token / 2**30:12.2f}")

# %% [markdown]
# Llama-2-7B has no GQA and pays 512 KiB per token: a single 4,096-token sequence takes 2 GiB.
# Llama-3-8B fits twice the context into half the memory, 1 GiB per full sequence, because it stores 8 KV heads instead of 32.
# (Mistral-7B-v0.1 attends over a sliding window of 4,096 tokens, so a window-aware cache would stop at 0.5 GiB.)

# %% [markdown]
# ## Batching with a contiguous cache: the waste
#
# A contiguous cache must reserve a row's slots before the request runs,
# and a static batch reserves the same `max_len` for every row: its longest prompt plus the longest output it allows.
# Every slot a shorter row does not fill is memory held for nothing.
#
# We measure the fraction on a seeded workload of 32 requests with prompt lengths and output lengths
# drawn uniformly from 10 to 200 tokens, cut into static batches in arrival order, under two reservation rules:
#
# * **exact**: each batch reserves the longest output it will really produce, as if output lengths were known in advance
#   (they never are, so this is the best case for a static batch);
# * **max_tokens**: every request allows up to 200 new tokens, and the batch must reserve all of them,
#   which is what a server that cannot see the future has to do.

# %%
rng = random.Random(0)
workload = [(rng.randint(10, 200), rng.randint(10, 200)) for _ in range(32)]  # (prompt tokens, output tokens)
MAX_TOKENS = 200


def static_batch_waste(requests: list[tuple[int, int]], batch_size: int, reserved_output: int | None = None) -> float:
    """Fraction of reserved slots that hold no token, when each batch reserves max prompt + output room per row.

    The output room is the batch's longest real output, or `reserved_output` (a max_tokens) when given.
    """
    reserved = used = 0
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        room = reserved_output if reserved_output is not None else max(o for _, o in batch)
        reserved += len(batch) * (max(p for p, _ in batch) + room)
        used += sum(p + o for p, o in batch)
    return 1 - used / reserved


batch_sizes = [1, 2, 4, 8, 16, 32]
waste_exact = [static_batch_waste(workload, size) for size in batch_sizes]
waste_max_tokens = [static_batch_waste(workload, size, MAX_TOKENS) for size in batch_sizes]
print("first requests (prompt, output):", workload[:4])
print("share of the reserved cache that holds no token:")
print(f"{'batch size':>10} {'exact':>7} {'max_tokens':>11}")
for size, exact, capped in zip(batch_sizes, waste_exact, waste_max_tokens):
    print(f"{size:10d} {exact:7.1%} {capped:11.1%}")

# %% [markdown]
# The model of the waste is simple, so we check it against a real run: a batch of 4 chat prompts with `max_tokens` 30,
# where EOS ends some rows early. After the run, the cache's row lengths count the tokens it stores.
# The waste counted from them must equal the fraction computed from the prompt and reply lengths alone.
# The loop is `generate_batch_cached` written out, so that we keep the cache to inspect.

# %%
params = chat_params  # the settings of the batch in step 6
max_len = cache_length_for([len(ids) for ids in chats], [params.max_tokens] * len(chats))
cache = ContiguousKVCache(config, batch_size=len(chats), max_len=max_len)
logits = prefill(lm, cache, chats)
replies, reasons = [[] for _ in chats], [None] * len(chats)
while True:
    tokens = logits.argmax(dim=-1).tolist()
    for row, token in enumerate(tokens):
        if reasons[row] is None:
            replies[row].append(token)
            reasons[row] = finish_reason(token, len(replies[row]), params, lm.eos_token_ids)
    if all(reason is not None for reason in reasons):
        break
    logits = decode_step(lm, cache, tokens, active=[reason is None for reason in reasons])
counted = 1 - int(cache.lengths.sum()) / (cache.batch_size * cache.max_len)
# The last reply token of each row is never fed back, so it has no slot: hence the "- 1".
modelled = 1 - sum(len(p) + len(r) - 1 for p, r in zip(chats, replies)) / (len(chats) * max_len)
print("reply lengths:", [len(r) for r in replies], "| cache lengths:", cache.lengths.tolist(), "of", max_len)
print("replies == generate_batch_cached in step 6:", replies == [g.token_ids for g in chat_batch])
print(f"waste counted in the cache {counted:.1%}, from the lengths {modelled:.1%}: equal", abs(counted - modelled) < 1e-12)

# %% [markdown]
# The picture of the first static batch of 8 from the workload, row by row, and the waste for each batch size:

# %%
from matplotlib.colors import ListedColormap

SLOT_COLOURS = ListedColormap(["#eeeeee", "#f4a261", "#2a6f97"])  # empty, output, prompt


def occupancy_image(requests: list[tuple[int, int]]) -> torch.Tensor:
    """Slot map [rows, max_len] of one static batch with exact reservation: 2 prompt, 1 output, 0 reserved but empty."""
    width = max(p for p, _ in requests) + max(o for _, o in requests)
    image = torch.zeros(len(requests), width)
    for row, (prompt, output) in enumerate(requests):
        image[row, :prompt] = 2
        image[row, prompt:prompt + output] = 1
    return image


first_batch = workload[:8]
figure, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
axes[0].imshow(occupancy_image(first_batch), aspect="auto", cmap=SLOT_COLOURS, interpolation="nearest")
axes[0].set(xlabel="cache slot", ylabel="request (row)",
            title=f"First batch of 8: blue prompt, orange output, grey empty ({static_batch_waste(first_batch, 8):.0%})")
axes[1].plot(batch_sizes, [100 * w for w in waste_max_tokens], "o-", color="C3", label=f"reserve max_tokens={MAX_TOKENS}")
axes[1].plot(batch_sizes, [100 * w for w in waste_exact], "o-", color="C0", label="reserve the exact longest output")
axes[1].set(xscale="log", xticks=batch_sizes, xticklabels=batch_sizes, xlabel="static batch size",
            ylabel="% of reserved cache unused", title="Waste on 32 seeded requests")
axes[1].set_ylim(0, 100)
axes[1].grid(alpha=0.3)
axes[1].legend()
figure.tight_layout()
figure.savefig("../figures/02_contiguous_cache_waste.png", dpi=100)

# %% [markdown]
# Even in the best case, with output lengths known in advance, a batch of 8 leaves about 4 slots in 10 empty,
# and batch size 1 is free of waste only because each request reserved exactly what it used.
# With `max_tokens` reserved, even a lone request wastes a quarter of its slots.
# Every empty slot is memory that could have held another request's tokens.

# %% [markdown]
# ## An interactive view: the batch you choose
#
# Drag the slider to cut the workload into static batches of another size and see the first batch's slot map.

# %%
import ipywidgets as widgets
from IPython.display import display

size_slider = widgets.IntSlider(value=8, min=1, max=32, description="batch size")
slot_map = widgets.Output()


def show_batch(change=None) -> None:
    size = size_slider.value
    with slot_map:
        slot_map.clear_output(wait=True)
        figure, axes = plt.subplots(figsize=(8, 0.25 * size + 1.2))
        axes.imshow(occupancy_image(workload[:size]), aspect="auto", interpolation="nearest", cmap=SLOT_COLOURS)
        axes.set(xlabel="cache slot", ylabel="row",
                 title=f"first batch of {size}: {static_batch_waste(workload[:size], size):.0%} empty; "
                       f"whole workload: {static_batch_waste(workload, size):.0%} empty")
        plt.show()


size_slider.observe(show_batch, names="value")

# %% tags=["nbval-ignore-output"]
show_batch()
display(widgets.VBox([size_slider, slot_map]))

# %% [markdown]
# ## Summary
#
# * In a causal model, earlier tokens' keys and values never change, so we compute them once and keep them.
# * Generation splits into a **prefill** over the prompt and **decode** steps of one token each.
#   Positions come from the cache length, and the cached logits match a full recomputation to 1e-4 at every step.
# * `ContiguousKVCache` is an attention backend: `attend` writes and reads, `advance` commits after each forward pass,
#   and a request that would outgrow its slots fails with a `ValueError` before anything is written.
# * Batches use right padding and per-row lengths; the batch's greedy output equals one-by-one generation exactly.
# * Measured here: the cached step stays nearly flat while the naive one grows with the sequence,
#   so the speed-up grows with the length of the reply (the figure for 256 tokens is printed above).
# * The bill: 2 × layers × KV heads × head_dim × bytes per token; GQA divides it by the group size.
# * A contiguous cache reserves memory it may never use: on our seeded workload, about 40% at batch size 8
#   even when output lengths are known in advance.
#
# **Next:** chapter 03 measures this waste on more realistic workloads and introduces **paging**:
# give the cache out in small fixed-size blocks, on demand, so a sequence holds only what it has written.
#
# ## Exercises
#
# 1. Llama-3-70B has 80 layers, 8 KV heads and head_dim 128. How many bytes of bf16 KV cache does one 8,192-token sequence need?
# 2. `generate_batch_cached` gets prompts of 5 and 12 tokens with `max_tokens=10`. How many slots per row (`max_len`) does it allocate?
# 3. Sort the 32 workload requests by prompt + output length before cutting them into batches of 8.
#    What fraction of the reserved cache is then unused? (Answer as a fraction, like 0.25.)
# 4. In the run of 4 chat prompts that checked the waste model, rows that had finished were still computed
#    until the longest reply ended. How many row-steps (one row in one decode step) went to finished rows?
#    Use the reply lengths printed there. Chapter 06 removes this waste by letting requests leave and join between steps.

# %%
answer_llama3_70b_bytes = None  # exercise 1
answer_max_len = None  # exercise 2
answer_sorted_waste = None  # exercise 3
answer_idle_row_steps = None  # exercise 4

checks = {
    "exercise 1": (answer_llama3_70b_bytes, kv_bytes_per_token(80, 8, 128, 2) * 8192, 0),
    "exercise 2": (answer_max_len, cache_length_for([5, 12], [10, 10]), 0),
    "exercise 3": (answer_sorted_waste, static_batch_waste(sorted(workload, key=sum), 8), 0.005),
    "exercise 4": (answer_idle_row_steps, sum(max(map(len, replies)) - len(reply) for reply in replies), 0),
}
for name, (answer, expected, tolerance) in checks.items():
    if answer is None:
        print(f"{name}: not answered yet")
    else:
        print(f"{name}:", "correct" if abs(answer - expected) <= tolerance else "not quite; recompute and try again")
