# %% [markdown]
# # 09 · Benchmarks, and what real engines add
#
# Eight chapters built an engine: a KV cache, paged memory, a scheduler that batches continuously, an API and a prefix cache.
# This chapter measures what all that buys on real work.
# We run one seeded workload of requests with mixed prompt and output lengths through three systems:
# Hugging Face `generate` one request at a time, `generate` on static padded batches, and our engine,
# and compare throughput, latency and how much of the KV memory contains live tokens.
# Then we profile the engine, remove one bottleneck the profile shows,
# and end with the features that production engines such as vLLM add on top of what we built.
#
# **At the end** you will have `nanovllm_lib.bench` (the benchmark behind `make bench`), a batched decode attention backend,
# measured figures for this machine, and a map of where to read next.

# %% [markdown]
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-github-user/nano-vllm-course/blob/main/notebooks/09_benchmarks.ipynb) [![Launch on Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/your-github-user/nano-vllm-course/main?urlpath=lab/tree/notebooks/09_benchmarks.ipynb)

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
#
# Besides our own model we load the same checkpoint with transformers, the reference every chapter compared against.

# %%
import cProfile
import importlib.util
import pstats
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from transformers import AutoModelForCausalLM

from nanovllm_lib import SamplingParams, load_model
from nanovllm_lib.model import CausalAttention
from nanovllm_lib.paged_attention import PagedKVCache, build_step_metadata, run_paged_step
from nanovllm_lib.block_manager import BlockManager

torch.manual_seed(0)
lm = load_model()
reference = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
print(lm.config.model_type, lm.config.num_layers, "layers")

# %% [markdown]
# ## The workload
#
# A benchmark is only as honest as its workload.
# Ours comes from chapter 03's `sample_workload`: log-normal prompt and output lengths, seeded, so every run gets the same requests.
# Its default shape (median prompt 128 tokens, median output 192) would take far too long on two CPU cores,
# so the benchmark divides the median lengths by four (median prompt 32, median output 48) and caps outputs at 128 tokens.
# This chapter runs a smaller version still, so that it executes in about a minute.
#
# Prompts are random token ids and every request generates exactly its output length (`ignore_eos`),
# because what we measure is the cost of the work, not the text: vLLM's own benchmark has a "random" dataset for the same reason.
# Generation is greedy, so every system must produce **the same tokens**, and the benchmark checks that they do.

# %%
#| default_exp bench

# %%
#| export
from __future__ import annotations

import csv
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanovllm_lib.engine_core import EngineCore
from nanovllm_lib.paged_attention import PagedKVCache
from nanovllm_lib.sampling import SamplingParams
from nanovllm_lib.scheduler import SchedulerConfig
from nanovllm_lib.sequence import Sequence
from nanovllm_lib.weights import LoadedModel
from nanovllm_lib.workload import sample_workload


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark request: prompt token ids and the exact number of tokens to generate (EOS does not stop it)."""

    prompt_token_ids: tuple[int, ...]
    output_len: int


def make_bench_requests(num_requests: int, seed: int, vocab_size: int, excluded_token_ids=(), **workload
                        ) -> list[BenchRequest]:
    """Draw lengths with `sample_workload(num_requests, seed, **workload)` and fill each prompt with random token ids.

    Token ids are uniform over [0, vocab_size) minus `excluded_token_ids` (pass the special tokens), from a
    generator seeded with `seed`, so equal arguments give equal requests.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}.")
    excluded = set(excluded_token_ids)
    allowed = [token for token in range(vocab_size) if token not in excluded]
    if not allowed:
        raise ValueError(f"All {vocab_size} token ids are excluded; leave some ids to build prompts from.")
    rng = random.Random(seed)
    return [BenchRequest(tuple(rng.choice(allowed) for _ in range(item.prompt_len)), item.output_len)
            for item in sample_workload(num_requests, seed, **workload)]


# %%
from nanovllm_lib.bench import make_bench_requests

SMALL = dict(prompt_median=16, output_median=16, max_output_len=48, max_context=512)
requests = make_bench_requests(16, seed=0, vocab_size=lm.config.vocab_size,
                               excluded_token_ids=lm.tokenizer.all_special_ids, **SMALL)
print("prompt lengths:", [len(r.prompt_token_ids) for r in requests])
print("output lengths:", [r.output_len for r in requests])
print("tokens to generate:", sum(r.output_len for r in requests))

# %% [markdown]
# ## Three ways to serve it
#
# Every system gets all requests at time 0 and reports a `BenchResult`:
# the wall-clock time, each request's completion time (its latency, since all arrive at once),
# the generated tokens, and the KV memory it reserved versus what held live tokens.
#
# * **`generate`, one at a time.** The simplest server: a loop over requests. No padding and no waste in the KV cache,
#   but every decode step runs the whole model for a single token.
# * **`generate` on static batches.** Requests in arrival order, `batch_size` at a time, left-padded to the longest prompt,
#   with an attention mask. A batch runs until its longest request is done; the others' extra tokens are thrown away.
#   Its KV cache has `batch_size × (padded prompt + steps so far)` slots, and only the rows still running have live tokens in them.
# * **Our engine.** Chapter 06's `EngineCore`: paged KV cache, continuous batching, up to `max_num_seqs` sequences per step.
#   We drive the core directly on token ids, as `generate` works on token ids too.
#
# KV utilisation is measured the same way for all three, once per decode step:
# slots holding a token of a request that is still running, divided by the slots reserved at that moment.

# %%
#| export
@dataclass
class BenchResult:
    """Outcome of one system on a workload. Every request arrives at t = 0, and times are in seconds from then."""

    system: str
    seconds: float
    completion_seconds: list[float]  # per request, in request order: its latency
    token_ids: list[list[int]]  # generated tokens per request, in request order
    kv_live_slots: int = 0  # summed over steps: KV slots holding a token of a running request
    kv_reserved_slots: int = 0  # summed over steps: KV slots allocated
    peak_kv_slots: int = 0  # most KV slots allocated at one time
    settings: dict = field(default_factory=dict)
    step_rows: list[int] = field(default_factory=list)  # engine only: sequences in each step
    step_seconds: list[float] = field(default_factory=list)  # engine only: duration of each step

    @property
    def generated_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.token_ids)

    @property
    def throughput(self) -> float:
        """Generated tokens per second."""
        return self.generated_tokens / self.seconds

    @property
    def kv_utilisation(self) -> float:
        """Fraction of reserved KV slots that held live tokens, averaged over steps; NaN if not measured."""
        return self.kv_live_slots / self.kv_reserved_slots if self.kv_reserved_slots else float("nan")

    @property
    def mean_latency(self) -> float:
        return statistics.mean(self.completion_seconds)

    def latency_percentile(self, percent: float) -> float:
        """Return the latency that `percent` % of requests do not exceed (nearest rank)."""
        ordered = sorted(self.completion_seconds)
        rank = max(1, -(-len(ordered) * percent // 100))
        return ordered[int(rank) - 1]


def _left_padded(group: list[BenchRequest], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return input ids and attention mask [len(group), longest prompt], prompts aligned to the right."""
    width = max(len(r.prompt_token_ids) for r in group)
    input_ids = torch.full((len(group), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(group), width), dtype=torch.long)
    for row, request in enumerate(group):
        length = len(request.prompt_token_ids)
        input_ids[row, width - length:] = torch.tensor(request.prompt_token_ids)
        attention_mask[row, width - length:] = 1
    return input_ids, attention_mask


@torch.no_grad()
def run_hf_generate(model, requests: list[BenchRequest], batch_size: int, pad_token_id: int) -> BenchResult:
    """Serve the requests with transformers `generate`, greedy, in order, `batch_size` at a time (1: one by one).

    A batch is left-padded with an attention mask and generates until its longest request is done, and each
    request keeps its first output_len tokens. EOS does not stop generation (eos_token_id=None).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    start = time.perf_counter()
    completion, outputs = [], []
    live = reserved = peak = 0
    for first in range(0, len(requests), batch_size):
        group = requests[first:first + batch_size]
        input_ids, attention_mask = _left_padded(group, pad_token_id)
        width, new_tokens = input_ids.shape[1], max(r.output_len for r in group)
        generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                   do_sample=False, eos_token_id=None,
                                   pad_token_id=pad_token_id)
        finished_at = time.perf_counter() - start
        for row, request in enumerate(group):
            outputs.append(generated[row, width:width + request.output_len].tolist())
            completion.append(finished_at)
        # The cache keeps every row at the padded width, and rows past their own output length keep dead tokens.
        for step in range(new_tokens):
            reserved += len(group) * (width + step)
            live += sum(len(r.prompt_token_ids) + step for r in group if step < r.output_len)
        peak = max(peak, len(group) * (width + new_tokens - 1))
    name = "HF generate, one at a time" if batch_size == 1 else f"HF generate, static batches of {batch_size}"
    return BenchResult(name, time.perf_counter() - start, completion, outputs, live, reserved, peak,
                       {"batch_size": batch_size})


def run_engine(lm: LoadedModel, requests: list[BenchRequest], num_blocks: int, block_size: int = 16,
               max_num_seqs: int = 64, system: str = "engine") -> BenchResult:
    """Serve the requests with an EngineCore (greedy, ignore_eos) and record per-request completion times."""
    longest = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max(2048, longest),
                             max_model_len=longest)
    core = EngineCore(lm, num_blocks, block_size, config)
    sequences = [Sequence(str(index), list(r.prompt_token_ids),
                          SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True))
                 for index, r in enumerate(requests)]
    for sequence in sequences:
        core.add(sequence)
    manager = core.block_manager
    start = time.perf_counter()
    completion: dict[str, float] = {}
    live = reserved = peak = 0
    while core.has_unfinished():
        advanced = core.step()
        now = time.perf_counter() - start
        used_slots = (manager.num_blocks - manager.num_free_blocks) * block_size
        live += sum(manager.num_tokens(seq_id) for seq_id in manager.sequences())
        reserved += used_slots
        peak = max(peak, used_slots)
        for sequence in advanced:
            if sequence.is_finished:
                completion.setdefault(sequence.seq_id, now)
    return BenchResult(system, time.perf_counter() - start, [completion[s.seq_id] for s in sequences],
                       [list(s.output_token_ids) for s in sequences], live, reserved, peak,
                       {"num_blocks": num_blocks, "block_size": block_size, "max_num_seqs": max_num_seqs,
                        "preemptions": core.stats.num_preemptions},
                       [len(step.seq_ids) for step in core.stats.steps], [step.seconds for step in core.stats.steps])


# %% [markdown]
# Before timing anything, a correctness check on four tiny requests: all three systems must produce identical tokens.

# %%
from nanovllm_lib.bench import run_engine, run_hf_generate

PAD = lm.tokenizer.pad_token_id
KV_BLOCKS = PagedKVCache.num_blocks_for_memory(lm.config, 16, 256 * 2**20)  # the LLM default: 256 MiB of KV cache
tiny = requests[:4]
checks = [run_hf_generate(reference, tiny, 1, PAD), run_hf_generate(reference, tiny, 4, PAD),
          run_engine(lm, tiny, KV_BLOCKS)]
print("output lengths:", [[len(t) for t in c.token_ids] for c in checks])
print("all three produce the same tokens:", checks[0].token_ids == checks[1].token_ids == checks[2].token_ids)

# %% [markdown]
# ## A first measurement
#
# Now the 16 requests through each system: one at a time, static batches of 4 and of 16, and the engine.
# The timings in this chapter depend on the machine and on what else runs on it.
# The tables show the numbers of the run stored with the notebook.

# %% tags=["nbval-ignore-output"]
print("torch threads:", torch.get_num_threads())
first_results = [run_hf_generate(reference, requests, 1, PAD)]
for batch_size in (4, 16):
    first_results.append(run_hf_generate(reference, requests, batch_size, PAD))
first_results.append(run_engine(lm, requests, KV_BLOCKS, max_num_seqs=16, system="engine (chapters 04-07)"))
for result in first_results:
    print(f"{result.system:38} {result.throughput:6.1f} tokens/s  mean latency {result.mean_latency:5.1f} s  "
          f"KV utilisation {result.kv_utilisation:4.0%}")

# %%
same_tokens = [r.token_ids == first_results[0].token_ids for r in first_results]
print("every system produced the same tokens:", all(same_tokens))

# %% [markdown]
# A table and three plots make the comparison easier to read; `make bench` writes the same table and figure.

# %%
#| export
def summary_rows(results: list[BenchResult]) -> list[dict]:
    """Return one row per result, with speedups over the one-at-a-time run and over the best static batch, if present."""
    single = next((r for r in results if r.settings.get("batch_size") == 1), None)
    static = [r for r in results if r.settings.get("batch_size", 0) > 1]
    best_static = max(static, key=lambda r: r.throughput) if static else None
    reference_tokens = single.token_ids if single else results[0].token_ids
    rows = []
    for result in results:
        rows.append({
            "system": result.system,
            "requests": len(result.token_ids),
            "generated tokens": result.generated_tokens,
            "seconds": round(result.seconds, 1),
            "tokens/s": round(result.throughput, 1),
            "x one at a time": round(result.throughput / single.throughput, 2) if single else "",
            "x best static": round(result.throughput / best_static.throughput, 2) if best_static else "",
            "mean latency s": round(result.mean_latency, 1),
            "p90 latency s": round(result.latency_percentile(90), 1),
            "KV utilisation": "" if result.kv_reserved_slots == 0 else f"{result.kv_utilisation:.0%}",
            "same tokens": f"{sum(a == b for a, b in zip(result.token_ids, reference_tokens))}/{len(reference_tokens)}",
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Format rows (dicts with the same keys) as a markdown table."""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def plot_results(results: list[BenchResult], title: str = ""):
    """Draw throughput, latency (mean and p90) and KV utilisation of each result; return the figure."""
    import matplotlib.pyplot as plt

    names = [r.system.replace(", ", "\n") for r in results]
    colors = ["#999999" if r.settings.get("batch_size") else "#1f77b4" for r in results]
    figure, (throughput_axes, latency_axes, kv_axes) = plt.subplots(1, 3, figsize=(15, 4.2))
    throughput_axes.barh(names, [r.throughput for r in results], color=colors)
    throughput_axes.set_xlabel("generated tokens per second")
    throughput_axes.set_title("throughput (higher is better)")
    positions = range(len(results))
    latency_axes.barh([p + 0.2 for p in positions], [r.mean_latency for r in results], height=0.4, label="mean",
                      color=colors)
    latency_axes.barh([p - 0.2 for p in positions], [r.latency_percentile(90) for r in results], height=0.4,
                      label="p90", color=colors, alpha=0.5)
    latency_axes.set_yticks(list(positions), names)
    latency_axes.set_xlabel("seconds from arrival to last token")
    latency_axes.set_title("latency: mean (dark) and p90 (light)")
    kv_axes.barh(names, [100 * r.kv_utilisation for r in results], color=colors)
    kv_axes.set_xlim(0, 100)
    kv_axes.set_xlabel("% of reserved KV slots holding live tokens")
    kv_axes.set_title("KV memory utilisation")
    for axes in (throughput_axes, latency_axes, kv_axes):
        axes.invert_yaxis()
    for axes in (latency_axes, kv_axes):
        axes.tick_params(labelleft=False)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


# %% tags=["nbval-ignore-output"]
from nanovllm_lib.bench import markdown_table, plot_results, summary_rows

print(markdown_table(summary_rows(first_results)))
figure = plot_results(first_results, "16 requests, SmolLM2-135M-Instruct fp32 on this CPU")

# %% [markdown]
# What the run shows, in the terms of the earlier chapters:
#
# * One at a time has perfect KV utilisation and the worst throughput: each decode step reads all 135 M weights for one token.
# * Static batches share each weight read among many rows, but pad every prompt to the longest and keep finished rows in the batch.
#   So a large part of their KV memory (and of their compute) goes to dead tokens, and every request waits for its whole batch.
# * The engine packs sequences without padding and replaces a finished request at the next step.
#
# How far ahead the engine is depends on the machine. The next two sections find where its time goes.

# %% [markdown]
# One more thing the engine's step records show: all requests arrive at once, so once the queue is empty the batch only shrinks.
# The last steps run a few long requests, and a step with a few rows costs almost as much as a full one.

# %% tags=["nbval-ignore-output"]
engine_result = first_results[-1]
small = [(rows, seconds) for rows, seconds in zip(engine_result.step_rows, engine_result.step_seconds) if rows <= 4]
print(f"steps with at most 4 sequences: {len(small)} of {len(engine_result.step_rows)}, "
      f"{sum(s for _, s in small) / engine_result.seconds:.0%} of the engine's time, "
      f"{sum(r for r, _ in small) / engine_result.generated_tokens:.0%} of its tokens")

# %% [markdown]
# ## How much can batching gain on this CPU?
#
# A decode step of a single sequence is bound by reading the weights from memory.
# With more rows per step the same read serves more tokens, until the arithmetic itself is the limit.
# The time per token of a forward pass with $b$ rows (no attention context, so only the weights matter)
# tells us the most that batching can give on this machine.

# %% tags=["nbval-ignore-output"]
@torch.no_grad()
def seconds_per_token(rows: int, repeats: int = 3) -> float:
    input_ids = torch.randint(100, 10_000, (rows, 1))
    positions = torch.zeros((rows, 1), dtype=torch.long)
    lm.model.compute_logits(lm.model(input_ids, positions, CausalAttention()))  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        lm.model.compute_logits(lm.model(input_ids, positions, CausalAttention()))
    return (time.perf_counter() - start) / repeats / rows


row_counts = [1, 4, 16, 64]
per_token = [seconds_per_token(rows) for rows in row_counts]
for rows, seconds in zip(row_counts, per_token):
    print(f"{rows:3} rows: {seconds * 1000:6.2f} ms per token, {per_token[0] / seconds:4.1f}x the tokens per second of 1 row")

# %% [markdown]
# A GPU has far more arithmetic per byte of memory bandwidth than a CPU core, so there the gain keeps growing to much larger batches.
# Here the curve flattens early, and that caps what any batching scheme can gain on this machine.
#
# The cap can be put in numbers for our workload. Suppose a perfect engine computed every prompt and output token
# at the cost per token of the 64-row pass, with no attention cost at all.
# It could still beat one-at-a-time `generate` only by this factor:

# %% tags=["nbval-ignore-output"]
workload_tokens = sum(len(r.prompt_token_ids) + r.output_len for r in requests)
ideal_seconds = workload_tokens * per_token[-1]
print(f"{workload_tokens} prompt and output tokens x {per_token[-1] * 1000:.2f} ms = {ideal_seconds:.1f} s, "
      f"against {first_results[0].seconds:.1f} s one at a time: at most {first_results[0].seconds / ideal_seconds:.1f}x")

# %% [markdown]
# ## Where the engine's time goes
#
# `cProfile` records the time spent in every Python function and every PyTorch operator called from Python.
# We group the operators into the model's linear layers (the matrix multiplications), attention, and everything else.
# The profiler adds overhead to each call, so small operators look a little more expensive than they are.

# %%
ATTENTION_NAMES = ("einsum", "repeat_interleave", "softmax", "masked_fill", "scaled_dot_product", "index_copy_",
                   "attend", "read")


def time_by_part(stats: pstats.Stats) -> dict[str, float]:
    """Split the profile's own time per function into linear layers, attention and the rest (seconds)."""
    parts = {"linear layers": 0.0, "attention": 0.0, "everything else": 0.0}
    for (filename, _, name), (_, _, own_seconds, _, _) in stats.stats.items():
        if "_nn.linear" in name:
            parts["linear layers"] += own_seconds
        elif any(key in name for key in ATTENTION_NAMES) or filename.endswith("paged_attention.py"):
            parts["attention"] += own_seconds
        else:
            parts["everything else"] += own_seconds
    return parts


def profile_engine(model_lm) -> tuple[dict[str, float], pstats.Stats]:
    profiler = cProfile.Profile()
    profiler.enable()
    run_engine(model_lm, requests, KV_BLOCKS, max_num_seqs=16)
    profiler.disable()
    stats = pstats.Stats(profiler)
    return time_by_part(stats), stats


# %% tags=["nbval-ignore-output"]
parts_before, stats_before = profile_engine(lm)
total_before = sum(parts_before.values())
for part, seconds in parts_before.items():
    print(f"{part:16} {seconds:5.1f} s  {seconds / total_before:4.0%}")
stats_before.sort_stats("tottime").print_stats(8)
print("(own time per function; cProfile's overhead inflates the many small calls)")

# %% [markdown]
# The linear layers are the model's real work, and batching already makes them as cheap per token as this CPU allows.
# Attention is the surprise: it costs a large share although it is a small part of the arithmetic.
# Chapter 05's `PagedAttention.attend` loops over the sequences of a step in Python, and for each one,
# in each of the 30 layers, gathers its keys and values, repeats the KV heads, and runs six small operators.
# With 16 sequences that is hundreds of tiny operator calls per layer, each with fixed overhead.

# %% [markdown]
# ## A batched decode attention backend
#
# In a decode step every sequence has exactly one new token.
# Those rows can be attended to **together**.
# We gather the block tables of all decoding sequences into one padded tensor and read their keys and values with one indexing operation.
# Then one call of PyTorch's fused `scaled_dot_product_attention` serves all of them, with a mask that hides each sequence's padding.
# `enable_gqa=True` lets the fused operator map query head $h$ to KV head $h / 3$ itself, as chapter 01's `expand_kv_heads` did.
# Prefill chunks, with many rows of different lengths, keep chapter 05's per-sequence path.
#
# The engine of chapter 06 builds its `PagedAttention` inside `run_paged_step` and hands it to the model,
# and it has no setting to choose another backend.
# Since the model receives the backend as an argument, a `CausalLM` subclass can swap it on the way in.
# A real engine makes the backend a setting instead: vLLM chooses among several attention backends at start-up.

# %%
#| export batched_attention
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from nanovllm_lib.model import CausalLM, scaled_dot_product
from nanovllm_lib.paged_attention import PagedAttention, PagedKVCache, StepMetadata
from nanovllm_lib.weights import LoadedModel


# %%
#| export batched_attention
class BatchedDecodeAttention(PagedAttention):
    """PagedAttention that attends all decode rows (one new token each) of a step in one fused, padded call.

    Sequences with more than one new token (prefill chunks) go through PagedAttention's per-sequence path.
    """

    def __init__(self, cache: PagedKVCache, metadata: StepMetadata):
        super().__init__(cache, metadata)
        m = metadata
        device = m.positions.device
        self.decodes = [i for i in range(m.num_seqs) if m.query_lens[i] == 1]
        self.prefills = [i for i in range(m.num_seqs) if m.query_lens[i] > 1]
        if self.decodes:
            self.decode_rows = torch.tensor([m.query_start[i] for i in self.decodes], device=device)  # [D]
            width = max(len(m.block_tables[i]) for i in self.decodes)
            tables = torch.zeros((len(self.decodes), width), dtype=torch.long, device=device)  # padding: block 0
            for row, i in enumerate(self.decodes):
                tables[row, :len(m.block_tables[i])] = m.block_tables[i]
            self.decode_tables = tables  # [D, width]
            lengths = torch.tensor([m.context_lens[i] for i in self.decodes], device=device)
            key_positions = torch.arange(width * m.block_size, device=device)
            self.decode_mask = (key_positions[None, :] < lengths[:, None])[:, None, None, :]  # [D, 1, 1, width * B]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's k, v into the pool, then return attention outputs [N, heads, head_dim]."""
        m = self.metadata
        self.cache.write(layer, m.slot_mapping, k, v)
        out = torch.empty_like(q)
        if self.decodes:
            keys = self.cache.keys[layer][self.decode_tables].flatten(1, 2).transpose(1, 2)  # [D, Hkv, width * B, d]
            values = self.cache.values[layer][self.decode_tables].flatten(1, 2).transpose(1, 2)
            queries = q[self.decode_rows].unsqueeze(2)  # [D, H, 1, d]
            attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=self.decode_mask,
                                                      enable_gqa=True)  # [D, H, 1, d]
            out[self.decode_rows] = attended.squeeze(2).to(q.dtype)
        for i in self.prefills:
            rows = slice(m.query_start[i], m.query_start[i + 1])
            keys, values = self.cache.read(layer, m.block_tables[i], m.context_lens[i])
            out[rows] = scaled_dot_product(q[None, rows], keys[None], values[None], self.masks[i][None])[0]
        return out


class BatchedDecodeCausalLM(CausalLM):
    """A CausalLM that replaces each PagedAttention backend it is given by a BatchedDecodeAttention."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, backend) -> torch.Tensor:
        if type(backend) is PagedAttention:
            backend = BatchedDecodeAttention(backend.cache, backend.metadata)
        return super().forward(input_ids, positions, backend)


def with_batched_decode(lm: LoadedModel) -> LoadedModel:
    """Return a LoadedModel whose model attends with BatchedDecodeAttention; it shares lm's weights, copying none."""
    with torch.device("meta"):
        model = BatchedDecodeCausalLM(lm.config)
    model.load_state_dict(lm.model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.inv_freq = lm.model.inv_freq  # a buffer outside the state dict
    return dataclasses.replace(lm, model=model.eval())


# %% [markdown]
# First the check that matters: on a step that mixes prefills and decodes, the new backend must give the same logits.

# %%
from nanovllm_lib.batched_attention import with_batched_decode

fast_lm = with_batched_decode(lm)
print("weights shared, not copied:", fast_lm.model.lm_head.weight.data_ptr() == lm.model.lm_head.weight.data_ptr())

manager = BlockManager(num_blocks=32, block_size=16)
pool = PagedKVCache(lm.config, 32, 16)
prompts = [list(r.prompt_token_ids) for r in requests[:3]]
for index, prompt in enumerate(prompts[:2]):
    manager.allocate(index, len(prompt))
    run_paged_step(lm.model, pool, build_step_metadata(manager, [(index, len(prompt))]), torch.tensor(prompt))
manager.allocate(2, len(prompts[2]))
for index in (0, 1):
    manager.append_slots(index, 1)
mixed = build_step_metadata(manager, [(0, 1), (2, len(prompts[2])), (1, 1)])
step_ids = torch.tensor([7] + prompts[2] + [9])
slow_logits = run_paged_step(lm.model, pool, mixed, step_ids)
fast_logits = run_paged_step(fast_lm.model, pool, mixed, step_ids)
print("query lengths of the step:", mixed.query_lens,
      "| logits equal within 1e-4:", torch.allclose(slow_logits, fast_logits, atol=1e-4))

# %% [markdown]
# Now the same profile with the batched backend:

# %% tags=["nbval-ignore-output"]
parts_after, stats_after = profile_engine(fast_lm)
figure, axes = plt.subplots(figsize=(8, 3))
for row, (label, parts) in enumerate([("chapter 05 attention", parts_before), ("batched decode attention", parts_after)]):
    left = 0.0
    for part, color in zip(parts, ["#1f77b4", "#d62728", "#999999"]):
        axes.barh(row, parts[part], left=left, color=color, label=part if row == 0 else None)
        axes.text(left + parts[part] / 2, row, f"{parts[part]:.1f} s", ha="center", va="center", fontsize=8, color="white")
        left += parts[part]
axes.set_yticks([0, 1], ["chapter 05 attention", "batched decode attention"])
axes.invert_yaxis()
axes.set_xlabel("seconds in the profiled engine run (16 requests)")
axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, fontsize=8)
axes.set_title("Where the engine's time goes")
figure.tight_layout()
figure.savefig("../figures/09_engine_profile.png", dpi=100)
for part in parts_before:
    print(f"{part:16} {parts_before[part]:5.1f} s -> {parts_after[part]:5.1f} s")

# %% [markdown]
# The gather of every sequence's keys and values remains: a real paged attention kernel reads the blocks where they lie
# instead of copying them, and fuses the whole loop over sequences into one kernel launch.

# %% [markdown]
# ## The benchmark: `make bench`
#
# `make bench` runs `tools/bench.py`, which calls `run_benchmark` below with the full workload:
# 64 requests, median prompt 32 and median output 48 tokens (sample_workload's default medians divided by four), at most 128 new tokens.
# It runs `generate` one at a time, `generate` on static batches of several sizes, and the engine with and without the batched decode backend,
# all in one process on the same model weights, and writes `artifacts/bench/results.md`, `results.csv` and `bench.png`.
# On two quiet CPU cores it takes about ten minutes, most of it in the one-at-a-time baseline.

# %%
#| export
@dataclass(frozen=True)
class BenchConfig:
    """Settings of one benchmark run; the defaults are `make bench`'s.

    Median lengths are sample_workload's defaults divided by four and outputs are capped at 128 tokens (an eighth
    of its default cap), so that the run fits in about ten minutes on two CPU cores.
    kv_cache_mib: the engine's KV pool. static_batch_sizes: the batch sizes tried for static batching.
    """

    num_requests: int = 64
    seed: int = 0
    prompt_median: float = 32.0
    output_median: float = 48.0
    max_output_len: int = 128
    max_context: int = 2048
    block_size: int = 16
    kv_cache_mib: int = 256
    max_num_seqs: int = 64
    static_batch_sizes: tuple[int, ...] = (16, 32, 64)
    one_at_a_time: bool = True

    def requests(self, lm: LoadedModel) -> list[BenchRequest]:
        return make_bench_requests(self.num_requests, self.seed, lm.config.vocab_size, lm.tokenizer.all_special_ids,
                                   prompt_median=self.prompt_median, output_median=self.output_median,
                                   max_output_len=self.max_output_len, max_context=self.max_context)


def run_benchmark(config: BenchConfig, lm: LoadedModel, hf_model, log=print) -> list[BenchResult]:
    """Run every system of the benchmark on the same requests; return their results, baselines first."""
    from nanovllm_lib.batched_attention import with_batched_decode

    requests = config.requests(lm)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    num_blocks = PagedKVCache.num_blocks_for_memory(lm.config, config.block_size, config.kv_cache_mib * 2**20,
                                                    lm.model.lm_head.weight.dtype)
    log(f"{len(requests)} requests, {sum(len(r.prompt_token_ids) for r in requests)} prompt tokens, "
        f"{sum(r.output_len for r in requests)} tokens to generate")
    batch_sizes = ([1] if config.one_at_a_time else []) + list(config.static_batch_sizes)
    runs = [(f"HF generate, batch size {size}", lambda size=size: run_hf_generate(hf_model, requests, size, pad))
            for size in batch_sizes]
    runs.append(("engine", lambda: run_engine(lm, requests, num_blocks, config.block_size, config.max_num_seqs,
                                              "engine (chapters 04-07)")))
    fast_lm = with_batched_decode(lm)
    runs.append(("engine, batched decode attention",
                 lambda: run_engine(fast_lm, requests, num_blocks, config.block_size, config.max_num_seqs,
                                    "engine + batched decode attention")))
    results = []
    for label, run in runs:
        result = run()
        log(f"{label}: {result.throughput:.1f} tokens/s in {result.seconds:.1f} s")
        results.append(result)
    return results


def write_report(results: list[BenchResult], config: BenchConfig, folder: Path | str) -> list[Path]:
    """Write results.md, results.csv and bench.png into `folder`; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(results)
    settings = (f"{config.num_requests} requests (seed {config.seed}; median prompt {config.prompt_median:g}, "
                f"median output {config.output_median:g}, at most {config.max_output_len} new tokens), greedy, ignore_eos; "
                f"engine: block size {config.block_size}, {config.kv_cache_mib} MiB KV pool, max_num_seqs "
                f"{config.max_num_seqs}; torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")
    markdown = folder / "results.md"
    markdown.write_text(f"# Benchmark results\n\n{settings}\n\n{markdown_table(rows)}\n", encoding="utf-8")
    table = folder / "results.csv"
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib.pyplot as plt

    picture = folder / "bench.png"
    figure = plot_results(results, settings)
    figure.savefig(picture, dpi=100)
    plt.close(figure)
    return [markdown, table, picture]


# %% [markdown]
# If you have run `make bench`, this cell shows its stored table. Otherwise it prints how to produce it.

# %% tags=["nbval-ignore-output"]
stored = Path("../artifacts/bench/results.md")
if stored.exists():
    print(stored.read_text(encoding="utf-8"))
else:
    print("No stored benchmark yet: run `make bench` in the repository root (about ten minutes).")

# %% [markdown]
# ## The same script on vLLM
#
# Our `LLM` has vLLM's interface, so a benchmark written against that interface runs on both.
# `run_llm_api` sends all requests in one `generate` call, with one `SamplingParams` each, as token-id prompts,
# and times the call. It measures throughput only: the per-request times it records are all the end of the call.

# %%
#| export
def run_llm_api(llm, requests: list[BenchRequest], sampling_params_class, system: str) -> BenchResult:
    """Serve the requests through an `LLM` object with vLLM's generate() interface (ours or vLLM's), greedy."""
    prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in requests]
    params = [sampling_params_class(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return BenchResult(system, seconds, [seconds] * len(requests), [list(o.outputs[0].token_ids) for o in outputs])


# %% tags=["nbval-ignore-output"]
from nanovllm_lib import SamplingParams  # with vLLM: from vllm import SamplingParams
from nanovllm_lib.bench import run_llm_api
from nanovllm_lib.llm import LLM  # with vLLM: from vllm import LLM

ours = run_llm_api(LLM(max_num_seqs=16), requests, SamplingParams, "nano-vLLM LLM.generate")
print(f"{ours.system}: {ours.throughput:.1f} tokens/s; same tokens as generate: "
      f"{ours.token_ids == first_results[0].token_ids}")

# %% [markdown]
# The cell below runs the same function against vLLM when it is installed.
# vLLM is not part of this course's requirements, and it needs a GPU or its CPU build.

# %% tags=["nbval-skip"]
if importlib.util.find_spec("vllm") is None:
    print("vLLM is not installed here, so this comparison is skipped.")
else:
    from vllm import LLM as VllmLLM
    from vllm import SamplingParams as VllmSamplingParams

    theirs = run_llm_api(VllmLLM(model=str(lm.path), max_num_seqs=16), requests, VllmSamplingParams, "vLLM")
    matching = sum(a == b for a, b in zip(theirs.token_ids, first_results[0].token_ids))
    print(f"vLLM: {theirs.throughput:.1f} tokens/s; {matching}/{len(requests)} requests with the same tokens as generate")

# %% [markdown]
# ## What real engines add
#
# Our engine has the core ideas of vLLM.
# Paged KV memory comes from Kwon et al., *Efficient Memory Management for Large Language Model Serving with PagedAttention* (SOSP 2023, arXiv:2309.06180),
# iteration-level scheduling from Yu et al., *Orca* (OSDI 2022), and we added prefix caching by chained block hashes.
# Production engines add, among much else:
#
# * **Chunked prefill.** Our scheduler runs a whole prompt in one step, so a long prompt stalls every decode in the batch for that step.
#   Splitting prefills into chunks that fill a fixed token budget next to the decodes keeps steps short and even
#   (Agrawal et al., *SARATHI*, arXiv:2308.16369; vLLM's `max_num_batched_tokens` is that budget).
# * **CUDA graphs.** The profile above showed the cost of many small operator calls, and on a GPU each of them is a kernel launch.
#   Recording a decode step once as a CUDA graph and replaying it removes most of that overhead (vLLM's `enforce_eager=True` turns it off).
# * **Fused attention kernels.** FlashAttention (Dao et al., arXiv:2205.14135, and FlashAttention-2, arXiv:2307.08691)
#   computes attention in tiles without writing the score matrix to memory.
#   Paged variants read the KV blocks in place, so they avoid the gather that our batched backend still does.
# * **Tensor parallelism.** Models too large for one device split every weight matrix across devices and combine partial results
#   with an all-reduce per layer (Shoeybi et al., *Megatron-LM*, arXiv:1909.08053).
# * **Speculative decoding.** A small draft model proposes several tokens and the large model checks them in one batched step,
#   with a rejection rule that keeps the output distribution exact (Leviathan et al., arXiv:2211.17192; Chen et al., arXiv:2302.01318).
# * **Quantisation.** Single-sequence decoding is bound by reading the weights, as the batching measurement showed.
#   Storing them in 8 or 4 bits (for example GPTQ, arXiv:2210.17323, or AWQ, arXiv:2306.00978) reads two to eight times fewer bytes per token;
#   the course's own checkpoint ships as 4-bit GGUF and we widened it to fp32 for clarity.
# * **Radix-tree prefix caching.** SGLang keeps the KV of all requests in a radix tree with LRU eviction
#   (Zheng et al., *Efficiently Programming Large Language Models using SGLang*, arXiv:2312.07104),
#   so that multi-turn chats and programs that branch from one prompt reuse every prefix they share.
#
# vLLM's documentation (docs.vllm.ai) describes each of these as it is implemented there.

# %% [markdown]
# ## Summary
#
# * `make bench` serves one seeded workload with `generate` one at a time, `generate` on static batches, and our engine,
#   checks that all produce the same tokens, and reports throughput, latency and KV memory utilisation.
# * Static batches waste KV memory and compute on padding and finished rows, and make every request wait for its batch.
#   The engine packs sequences and refills its batch every step.
# * On a CPU, what batching can gain is capped by how soon the matrix multiplications become compute-bound, which we measured directly.
#   On a GPU the cap is far higher.
# * Two things keep the engine further from that cap: the last long requests run in small batches once the queue is empty,
#   and attention copies every sequence's keys and values in every layer.
# * The profile showed chapter 05's per-sequence attention loop as the engine's largest cost after the matrix multiplications.
#   Batching all decode rows into one fused call removed much of it without changing a single token.
#   The copy of the keys and values remains, and a paged attention kernel that reads blocks in place removes it.
#
# ## Exercises
#
# 1. Which static batch size gave the highest throughput in the first measurement? Set `answer_batch_size` below and run the cell.
# 2. Run the first measurement with `max_num_seqs` 4, 8 and 16 for the engine. How do throughput and mean latency move, and why?
# 3. Make the prompts four times longer (`prompt_median=64`). Does the engine's lead over one-at-a-time grow or shrink? Use the batching measurement to explain.
# 4. Extend `BatchedDecodeAttention` so that prefill rows are batched too (pad queries as well as keys). When does the padding cost more than it saves?

# %%
answer_batch_size = None  # exercise 1: 4 or 16

if answer_batch_size is None:
    print("Exercise 1 not answered yet.")
else:
    best = max((r for r in first_results if r.settings.get("batch_size", 0) > 1), key=lambda r: r.throughput)
    print("correct" if answer_batch_size == best.settings["batch_size"] else "not quite: compare the tokens/s column")
