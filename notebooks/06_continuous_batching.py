# %% [markdown]
# # 06 · Continuous batching: a scheduler that keeps the memory busy
#
# Chapter 05 gave us attention that reads keys and values through block tables,
# so a batch can hold sequences of any lengths with no padding and no reserved-but-unused memory.
# Paging pays off only when something decides, at every step, which sequences run and who gets the freed blocks.
# That is the **scheduler**, and deciding again at every step is called *continuous batching*
# (or iteration-level scheduling, from the Orca paper, OSDI 2022).
#
# **In this chapter** we measure static batching, then build a sequence state machine,
# a scheduler with admission limits and preemption by recompute, and a small engine loop;
# we check that its outputs equal one-by-one generation, even under memory pressure,
# and measure it against static batching on the same work and the same KV budget.

# %% [markdown]
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-github-user/nano-vllm-course/blob/main/notebooks/06_continuous_batching.ipynb) [![Launch on Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/your-github-user/nano-vllm-course/main?urlpath=lab/tree/notebooks/06_continuous_batching.ipynb)

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

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

from nanovllm_lib import SamplingParams, load_model
from nanovllm_lib.block_manager import BlockManager
from nanovllm_lib.kv_cache import generate_cached
from nanovllm_lib.paged_attention import PagedKVCache, build_step_metadata, run_paged_step
from nanovllm_lib.workload import sample_workload

torch.manual_seed(0)
lm = load_model()
tokenizer, config = lm.tokenizer, lm.config
print(config.model_type, config.num_layers, "layers")

# %% [markdown]
# ## A request's life: the sequence state machine
#
# The scheduler tracks each request as a `Sequence`: its prompt, the tokens generated so far,
# how many tokens already have keys and values in the cache, and its state:
#
# ```
#            admitted              finished (EOS, stop id, max_tokens, max_model_len)
#  WAITING ───────────▶ RUNNING ─────────────────────────────────────────▶ FINISHED
#     ▲                    │
#     │   re-admitted      │ preempted: pool full, blocks freed
#  PREEMPTED ◀─────────────┘
# ```
#
# A preempted sequence loses its KV blocks and waits at the **front** of the queue.
# When it is admitted again, its prompt *and every token it generated* are recomputed in one prefill,
# and it continues exactly where it stopped. This is *preemption by recompute*;
# vLLM also supports swapping blocks to CPU memory, which we skip because recompute is simpler and, for short sequences, cheap.
#
# One detail matters for correctness: the boundary between prompt and output is fixed at submission.
# After a recompute, generated tokens are still output tokens (they count towards `max_tokens`,
# and penalties that look only at output tokens must still see them).

# %%
#| default_exp scheduler

# %%
#| export sequence
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from nanovllm_lib.sampling import SamplingParams


# %%
#| export sequence
class SequenceStatus(enum.Enum):
    """Lifecycle state of a request."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # lost its KV blocks; waits to be recomputed
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request in the scheduler: its tokens, its progress through the cache, and its state."""

    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" or "length" once finished, "abort" if cancelled
    num_computed_tokens: int = 0  # tokens whose keys and values are in the cache
    num_preemptions: int = 0
    generator: torch.Generator | None = None  # per-request randomness, kept across preemptions

    @property
    def token_ids(self) -> list[int]:
        """Prompt followed by output: what a recompute prefill processes."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


# %% [markdown]
# ## The scheduler
#
# Every step, the scheduler builds one batch under three limits, the same ones vLLM exposes:
#
# * `max_num_seqs`: how many sequences may run at once;
# * `max_num_batched_tokens`: how many tokens one forward pass may process (prefill tokens count in full, a decode counts one);
# * the free KV blocks of the `BlockManager`.
#
# Its policy, in order:
#
# 1. **Running sequences decode first**, oldest first. Each needs one KV slot for its newest token
#    (the token sampled last step, whose keys and values this step computes). Reserving that slot *before* the step
#    is the "make room" half; appending the sampled token *after* the step is the other half.
# 2. If a running sequence cannot get its slot, the **newest running sequence is preempted** (its blocks freed)
#    until the slot fits. Preempting the newest keeps the oldest requests moving, so no request starves.
# 3. If nothing was preempted, **waiting sequences are admitted**, oldest first, while the limits allow.
#    A preempted sequence is readmitted with all its tokens as a prefill.
#
# Admission also rejects, at submission, any request that could **never** fit: one whose prompt and tokens
# to generate need more blocks than the whole pool. Without that check such a request sits at the head
# of the queue forever and blocks everyone behind it.

# %%
#| export
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from nanovllm_lib.block_manager import BlockManager
from nanovllm_lib.sequence import Sequence, SequenceStatus


# %%
#| export
@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduling step; names as in vLLM.

    max_num_seqs: sequences running at once. max_num_batched_tokens: tokens in one forward pass.
    max_model_len: prompt plus generated tokens of one sequence. Without chunked prefill a whole
    sequence must fit in one step, so max_num_batched_tokens must be >= max_model_len.
    """

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is smaller than max_model_len={self.max_model_len}: "
                "a preempted sequence of max_model_len tokens could never be recomputed. Raise it or lower max_model_len."
            )


@dataclass
class ScheduledBatch:
    """The work of one step: sequences and the number of new tokens each computes (1 for a decode)."""

    sequences: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_prefills: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, sequence: Sequence, num_new_tokens: int, prefill: bool) -> None:
        self.sequences.append(sequence)
        self.num_new_tokens.append(num_new_tokens)
        self.num_prefills += prefill

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.sequences


# %%
#| export
class Scheduler:
    """Decide, every step, which sequences run, admitting, preempting and finishing them in a BlockManager."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def kv_tokens_needed(self, sequence: Sequence) -> int:
        """KV slots the sequence needs at its longest: every token but the last one generated."""
        final_length = min(len(sequence.prompt_token_ids) + sequence.params.max_tokens, self.config.max_model_len)
        return final_length - 1

    def add(self, sequence: Sequence) -> None:
        """Queue a new sequence; raise ValueError if it is empty, too long, or can never fit in the pool."""
        prompt_len = len(sequence.prompt_token_ids)
        if prompt_len == 0:
            raise ValueError(f"Request {sequence.seq_id!r} has an empty prompt; pass at least one token.")
        if prompt_len >= self.config.max_model_len:
            raise ValueError(
                f"Request {sequence.seq_id!r} has a {prompt_len}-token prompt, but max_model_len is "
                f"{self.config.max_model_len} and at least one new token must fit. Shorten the prompt."
            )
        needed = self.block_manager.blocks_needed(self.kv_tokens_needed(sequence))
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"Request {sequence.seq_id!r} needs {needed} KV blocks at its longest, but the whole pool has "
                f"{self.block_manager.num_blocks}: it could never run. Lower max_tokens or enlarge the KV cache."
            )
        sequence.status = SequenceStatus.WAITING
        self.waiting.append(sequence)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """Build the next step: decodes for running sequences (preempting if needed), then admissions."""
        batch = ScheduledBatch()
        self._schedule_decodes(batch)
        if not batch.preempted:
            self._admit_waiting(batch)
        return batch

    def _schedule_decodes(self, batch: ScheduledBatch) -> None:
        queue = deque(self.running)  # oldest first
        kept = []
        while queue:
            sequence = queue.popleft()
            while not self.block_manager.can_append(sequence.seq_id, 1):
                victim = queue.pop() if queue else sequence  # the newest running sequence
                self.preempt(victim)
                batch.preempted.append(victim)
                if victim is sequence:
                    break
            else:
                self.block_manager.append_slots(sequence.seq_id, 1)  # room for the newest token's KV
                kept.append(sequence)
                batch.add(sequence, 1, prefill=False)
        self.running = kept

    def _admit_waiting(self, batch: ScheduledBatch) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            sequence = self.waiting[0]
            num_tokens = sequence.num_tokens  # the prompt, plus generated tokens after a preemption
            fits_budget = batch.num_tokens + num_tokens <= self.config.max_num_batched_tokens
            if not fits_budget or not self.block_manager.can_allocate(num_tokens):
                break  # first come, first served: no request overtakes the head of the queue
            self.waiting.popleft()
            sequence.num_computed_tokens = self.allocate(sequence)
            sequence.status = SequenceStatus.RUNNING
            self.running.append(sequence)
            batch.add(sequence, num_tokens - sequence.num_computed_tokens, prefill=True)

    def allocate(self, sequence: Sequence) -> int:
        """Reserve KV slots for all of a sequence's tokens; return how many already have KV in the cache.

        Always 0 here. A prefix cache (chapter 08) overrides this to reuse blocks other sequences computed.
        """
        self.block_manager.allocate(sequence.seq_id, sequence.num_tokens)
        return 0

    def preempt(self, sequence: Sequence) -> None:
        """Free a running sequence's blocks and put it at the front of the queue, to be recomputed."""
        self.block_manager.free(sequence.seq_id)
        sequence.num_computed_tokens = 0
        sequence.status = SequenceStatus.PREEMPTED
        sequence.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(sequence)

    def finish(self, sequence: Sequence, reason: str) -> None:
        """Mark a running sequence finished and return its blocks."""
        self.running.remove(sequence)
        self.block_manager.free(sequence.seq_id)
        sequence.status = SequenceStatus.FINISHED
        sequence.finish_reason = reason

    def abort(self, seq_id: str) -> Sequence:
        """Remove a waiting or running sequence, freeing its blocks; raise KeyError if it is unknown."""
        for sequence in list(self.waiting) + self.running:
            if sequence.seq_id == seq_id:
                if sequence in self.running:
                    self.running.remove(sequence)
                else:
                    self.waiting.remove(sequence)
                if seq_id in self.block_manager:
                    self.block_manager.free(seq_id)
                sequence.status = SequenceStatus.FINISHED
                sequence.finish_reason = "abort"
                return sequence
        raise KeyError(f"No waiting or running request has id {seq_id!r}.")


# %% [markdown]
# A first look without the model: three requests and a pool of 6 blocks of 4 tokens.
# We play the engine's part by hand, marking each scheduled token as computed and "generating" token 0.
# All three prompts fit at first and fill the pool. When a sequence crosses into a new block at step 2,
# no block is free, so the newest running request, C, is preempted and waits until memory returns.

# %%
from nanovllm_lib.scheduler import Scheduler, SchedulerConfig
from nanovllm_lib.sequence import Sequence

toy = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32), BlockManager(6, 4))
for name, length in [("A", 7), ("B", 5), ("C", 6)]:
    toy.add(Sequence(name, list(range(1, length + 1)), SamplingParams(max_tokens=8, ignore_eos=True)))
for step in range(6):
    batch = toy.schedule()
    for sequence, count in zip(batch.sequences, batch.num_new_tokens):
        sequence.num_computed_tokens += count
        sequence.output_token_ids.append(0)
    ran = ", ".join(f"{s.seq_id}+{n}" for s, n in zip(batch.sequences, batch.num_new_tokens))
    preempted = ", ".join(s.seq_id for s in batch.preempted) or "-"
    print(f"step {step}: ran [{ran}]  preempted [{preempted}]  free blocks {toy.block_manager.num_free_blocks}")

# %% [markdown]
# ## The engine loop
#
# `EngineCore` ties the pieces together. One `step()`:
#
# 1. asks the scheduler for a batch;
# 2. builds the step metadata of chapter 05 (positions, slot mapping, block tables) for exactly the tokens scheduled;
# 3. runs the model once on all of them, packed into one row with no padding;
# 4. samples one token per sequence with its own parameters and generator;
# 5. appends it, checks the stopping rules, and finishes sequences, returning their blocks at once.
#
# It also keeps the counters later chapters plot: steps, preemptions, tokens per step, blocks in use.

# %%
#| export engine_core
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from nanovllm_lib.block_manager import BlockManager
from nanovllm_lib.generation import finish_reason, validate_prompt
from nanovllm_lib.paged_attention import PagedKVCache, build_step_metadata, run_paged_step
from nanovllm_lib.sampling import make_generator, sample_batch
from nanovllm_lib.scheduler import Scheduler, SchedulerConfig
from nanovllm_lib.sequence import Sequence
from nanovllm_lib.weights import LoadedModel


# %%
#| export engine_core
@dataclass
class StepRecord:
    """What one engine step did, for plots and timelines."""

    seq_ids: list[str]
    num_new_tokens: list[int]
    num_prefills: int
    preempted: list[str]
    blocks_used: int
    seconds: float


@dataclass
class EngineStats:
    """Counters over an engine's life."""

    steps: list[StepRecord] = field(default_factory=list)
    num_preemptions: int = 0
    num_generated_tokens: int = 0

    @property
    def num_steps(self) -> int:
        return len(self.steps)


# %%
#| export engine_core
class EngineCore:
    """Scheduler + paged KV cache + model: runs many sequences together, one token each per step.

    num_blocks blocks of block_size tokens form the KV pool of every layer.
    """

    def __init__(self, lm: LoadedModel, num_blocks: int, block_size: int, scheduler_config: SchedulerConfig):
        self.lm = lm
        self.block_manager = self.make_block_manager(num_blocks, block_size)
        self.cache = PagedKVCache(lm.config, num_blocks, block_size, dtype=lm.model.lm_head.weight.dtype,
                                  device=lm.device)
        self.scheduler = self.make_scheduler(scheduler_config, self.block_manager)
        self.stats = EngineStats()

    # Chapter 08 overrides these two to add a prefix cache.
    def make_block_manager(self, num_blocks: int, block_size: int) -> BlockManager:
        return BlockManager(num_blocks, block_size)

    def make_scheduler(self, config: SchedulerConfig, block_manager: BlockManager) -> Scheduler:
        return Scheduler(config, block_manager)

    def on_tokens_computed(self, sequence: Sequence) -> None:
        """Called after a step computed KV for a sequence's new tokens; a prefix cache registers full blocks here."""

    def add(self, sequence: Sequence) -> None:
        """Validate and queue a sequence; raises ValueError without changing the engine if it is invalid."""
        validate_prompt(sequence.prompt_token_ids, self.lm.config.vocab_size)
        if sequence.generator is None:
            sequence.generator = make_generator(sequence.params.seed, self.lm.device)
        self.scheduler.add(sequence)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Sequence]:
        """Run one scheduling step and one forward pass; return the sequences that advanced."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        self.stats.num_preemptions += len(batch.preempted)
        if batch.is_empty:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("The scheduler admitted nothing although the pool is empty; this is a bug.")
            return []

        entries = [(s.seq_id, n, s.num_computed_tokens) for s, n in zip(batch.sequences, batch.num_new_tokens)]
        metadata = build_step_metadata(self.block_manager, entries, device=self.lm.device)
        new_ids = [t for s, n in zip(batch.sequences, batch.num_new_tokens)
                   for t in s.token_ids[s.num_computed_tokens:s.num_computed_tokens + n]]
        logits = run_paged_step(self.lm.model, self.cache, metadata, torch.tensor(new_ids, device=self.lm.device))
        tokens = sample_batch(logits, [s.params for s in batch.sequences], [s.generator for s in batch.sequences])

        for sequence, count, token in zip(batch.sequences, batch.num_new_tokens, tokens):
            sequence.num_computed_tokens += count
            self.on_tokens_computed(sequence)
            sequence.output_token_ids.append(token)
            reason = finish_reason(token, len(sequence.output_token_ids), sequence.params, self.lm.eos_token_ids)
            if reason is None and sequence.num_tokens >= self.scheduler.config.max_model_len:
                reason = "length"
            if reason is not None:
                self.scheduler.finish(sequence, reason)
        self.stats.num_generated_tokens += len(tokens)
        self.stats.steps.append(StepRecord(
            seq_ids=[s.seq_id for s in batch.sequences], num_new_tokens=list(batch.num_new_tokens),
            num_prefills=batch.num_prefills, preempted=[s.seq_id for s in batch.preempted],
            blocks_used=self.block_manager.num_blocks - self.block_manager.num_free_blocks,
            seconds=time.perf_counter() - start,
        ))
        return list(batch.sequences)

    def abort(self, seq_id: str) -> Sequence:
        """Cancel a waiting or running sequence and free its blocks."""
        return self.scheduler.abort(seq_id)

    def run(self, sequences: list[Sequence], progress: bool = False) -> list[Sequence]:
        """Add the sequences, step until all finish, and return them in the order given."""
        for sequence in sequences:
            self.add(sequence)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(sequences), desc="requests", unit="req")
        while self.has_unfinished():
            advanced = self.step()
            if bar is not None:
                bar.update(sum(s.is_finished for s in advanced))
        if bar is not None:
            bar.close()
        return sequences


# %% [markdown]
# ## Check: the engine equals one-by-one generation
#
# Sixteen prompts of different lengths, greedy, run through the engine together,
# must give exactly the tokens chapter 02's cached loop gives for each prompt alone.
# We use chat prompts from real questions and let EOS end them, so requests finish at different steps.

# %%
from nanovllm_lib.engine_core import EngineCore

questions = [
    "What is the capital of France?", "Name three primary colours.", "Write a haiku about autumn.",
    "How many legs does a spider have?", "Explain photosynthesis in one sentence.", "What is 12 times 7?",
    "Give me a synonym for happy.", "What does a KV cache store?", "Translate 'good morning' to Spanish.",
    "List two uses of copper.", "Why is the sky blue?", "What is the boiling point of water in Celsius?",
    "Suggest a name for a cat.", "What is the largest planet?", "Say hello in French.", "What is a prime number?",
]
prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                         add_generation_prompt=True, return_dict=True)["input_ids"] for q in questions]
greedy = SamplingParams(temperature=0, max_tokens=48)

alone = [generate_cached(lm, p, greedy).token_ids for p in prompts]


def run_engine(num_blocks, block_size=16, max_num_seqs=16):
    engine = EngineCore(lm, num_blocks, block_size, SchedulerConfig(max_num_seqs, 2048, 2048))
    sequences = [Sequence(f"q{i}", p, greedy) for i, p in enumerate(prompts)]
    engine.run(sequences)
    return engine, sequences


engine, together = run_engine(num_blocks=128)
print("all 16 equal to one-by-one:", [s.output_token_ids for s in together] == alone)
print("steps:", engine.stats.num_steps, "| preemptions:", engine.stats.num_preemptions,
      "| free blocks after:", engine.block_manager.num_free_blocks, "of", engine.block_manager.num_blocks)

# %% [markdown]
# Now the same work in a pool too small for all sixteen at once, so the scheduler must preempt and recompute.
# The outputs must not change by a single token, and every block must come back.

# %%
tight, squeezed = run_engine(num_blocks=24)
print("preemptions:", tight.stats.num_preemptions, "| steps:", tight.stats.num_steps)
print("outputs unchanged under memory pressure:", [s.output_token_ids for s in squeezed] == alone)
print("every block free again:", tight.block_manager.num_free_blocks == 24)

# %% [markdown]
# ## Static batching, measured
#
# The alternative is **static batching**: take a group of requests, run them until the *longest* one ends,
# then take the next group. A request that finishes early leaves its row idle, and no waiting request may take its place.
# A server with a contiguous cache must also reserve each request's maximum length up front.
#
# We implement it with the same model, the same paged step and the same KV budget,
# which flatters static batching in one way: its finished rows cost no compute here, whereas a padded implementation computes them.
# What remains is the scheduling difference alone.

# %%
#| export batching
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from nanovllm_lib.engine_core import EngineCore
from nanovllm_lib.scheduler import SchedulerConfig
from nanovllm_lib.sequence import Sequence
from nanovllm_lib.weights import LoadedModel


# %%
#| export batching
@dataclass
class BatchingResult:
    """Outcome of running one workload: tokens, time, and per-request completion times (all arrive at t = 0)."""

    policy: str
    generated_tokens: int
    seconds: float
    steps: int
    completion_seconds: list[float]
    concurrency: list[int]  # sequences in each step

    @property
    def throughput(self) -> float:
        """Generated tokens per second."""
        return self.generated_tokens / self.seconds

    @property
    def mean_latency(self) -> float:
        return statistics.mean(self.completion_seconds)

    def latency_percentile(self, percent: float) -> float:
        ordered = sorted(self.completion_seconds)
        return ordered[min(len(ordered) - 1, int(round(percent / 100 * (len(ordered) - 1))))]


def run_continuous(lm: LoadedModel, sequences: list[Sequence], num_blocks: int, block_size: int,
                   max_num_seqs: int, max_model_len: int) -> BatchingResult:
    """Run all sequences through the continuous-batching engine; every request arrives at t = 0."""
    engine = EngineCore(lm, num_blocks, block_size, SchedulerConfig(max_num_seqs, max(2048, max_model_len), max_model_len))
    for sequence in sequences:
        engine.add(sequence)
    start = time.perf_counter()
    done_at = {}
    while engine.has_unfinished():
        for sequence in engine.step():
            if sequence.is_finished and sequence.seq_id not in done_at:
                done_at[sequence.seq_id] = time.perf_counter() - start
    seconds = time.perf_counter() - start
    return BatchingResult("continuous", engine.stats.num_generated_tokens, seconds, engine.stats.num_steps,
                          [done_at[s.seq_id] for s in sequences], [len(r.seq_ids) for r in engine.stats.steps])


def run_static(lm: LoadedModel, sequences: list[Sequence], num_blocks: int, block_size: int,
               max_num_seqs: int, max_model_len: int) -> BatchingResult:
    """Run sequences in static batches: each batch reserves every member's full length and runs until its longest ends."""
    start = time.perf_counter()
    done_at, steps, concurrency, generated = {}, 0, [], 0
    queue = list(sequences)
    while queue:
        group, reserved = [], 0
        while queue and len(group) < max_num_seqs:
            full_length = len(queue[0].prompt_token_ids) + queue[0].params.max_tokens - 1
            need = -(-full_length // block_size)  # blocks for the request's whole life, reserved up front
            if reserved + need > num_blocks:
                break
            reserved += need
            group.append(queue.pop(0))
        if not group:
            raise ValueError("A request needs more KV blocks than the whole pool; it can never run.")
        # The group runs alone in an engine whose admission limit is the group itself: nobody joins until all end.
        engine = EngineCore(lm, num_blocks, block_size,
                            SchedulerConfig(len(group), max(2048, max_model_len), max_model_len))
        for sequence in group:
            engine.add(sequence)
        while engine.has_unfinished():
            for sequence in engine.step():
                if sequence.is_finished and sequence.seq_id not in done_at:
                    done_at[sequence.seq_id] = time.perf_counter() - start
            concurrency.append(len(engine.stats.steps[-1].seq_ids))  # finished rows idle until the group ends
        steps += engine.stats.num_steps
        generated += engine.stats.num_generated_tokens
    seconds = time.perf_counter() - start
    return BatchingResult("static", generated, seconds, steps, [done_at[s.seq_id] for s in sequences], concurrency)


# %% [markdown]
# The workload: 24 requests with log-normal prompt and output lengths from chapter 03's generator
# (scaled down so the chapter runs in about a minute), random prompt tokens, `ignore_eos` so each request
# generates exactly its drawn length. Both policies get the same KV budget of 96 blocks of 16 tokens and at most 12 sequences at once.

# %%
from nanovllm_lib.batching import run_continuous, run_static

workload = sample_workload(24, seed=6, prompt_median=48, prompt_sigma=0.6, output_median=40, output_sigma=0.7,
                           max_output_len=120, max_context=256)
rng = random.Random(0)
token_lists = [[rng.randrange(1000, 20000) for _ in range(r.prompt_len)] for r in workload]


def fresh_sequences():
    return [Sequence(f"r{i}", ids, SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True))
            for i, (ids, r) in enumerate(zip(token_lists, workload))]


budget = dict(num_blocks=96, block_size=16, max_num_seqs=12, max_model_len=256)
print("prompt lengths:", [r.prompt_len for r in workload])
print("output lengths:", [r.output_len for r in workload])

# %% [markdown]
# This cell runs both policies, about a minute in total on 2 CPU cores.

# %%
static_sequences, continuous_sequences = fresh_sequences(), fresh_sequences()
static = run_static(lm, static_sequences, **budget)
continuous = run_continuous(lm, continuous_sequences, **budget)
same = [s.output_token_ids for s in static_sequences] == [s.output_token_ids for s in continuous_sequences]
print("same tokens under both policies:", same)
print("steps: static", static.steps, "| continuous", continuous.steps)
print("mean sequences per step: static", round(sum(static.concurrency) / len(static.concurrency), 1),
      "| continuous", round(sum(continuous.concurrency) / len(continuous.concurrency), 1))

# %% tags=["nbval-ignore-output"]
print(f"{'policy':>10} {'tokens/s':>9} {'mean latency s':>15} {'p90 latency s':>14} {'steps':>6}")
for result in (static, continuous):
    print(f"{result.policy:>10} {result.throughput:9.1f} {result.mean_latency:15.2f} "
          f"{result.latency_percentile(90):14.2f} {result.steps:6d}")
print(f"continuous / static throughput: {continuous.throughput / static.throughput:.2f}x")

# %%
figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
axes[0].bar(["static", "continuous"], [static.throughput, continuous.throughput], color=["C1", "C0"])
axes[0].set(ylabel="generated tokens / s", title="Throughput")
for index, result in enumerate((static, continuous)):
    axes[1].plot(sorted(result.completion_seconds), range(1, len(result.completion_seconds) + 1),
                 label=result.policy, color=f"C{1 - index}")
axes[1].set(xlabel="seconds since start", ylabel="requests finished", title="Completion over time")
axes[1].legend()
axes[2].plot(static.concurrency, label="static", color="C1")
axes[2].plot(continuous.concurrency, label="continuous", color="C0")
axes[2].set(xlabel="step", ylabel="sequences in the batch", title="Batch occupancy")
axes[2].legend()
for ax in axes:
    ax.grid(alpha=0.3)
figure.tight_layout()
figure.savefig("../figures/06_static_vs_continuous.png", dpi=100)

# %% [markdown]
# Static batching holds a batch together until its longest request ends,
# so late in each group most rows are finished and idle, and the next requests wait outside.
# It also reserves every request's full length up front, so fewer requests fit in the same memory.
# The continuous scheduler refills the batch as soon as a request ends and reserves blocks only as tokens arrive.
# Its advantage in the table above comes from both: fewer steps for the same tokens and more sequences sharing each step's weight reads.

# %% [markdown]
# ## A timeline of the scheduler
#
# Which sequence ran at each step, as prefill or decode, and where preemptions happened.
# The run with the small pool (24 blocks) shows the scheduler at work.

# %%
def draw_timeline(engine_stats, sequence_ids, title):
    """Draw one row per sequence: blue for a prefill step, grey for decode, red cross for a preemption."""
    row = {seq_id: index for index, seq_id in enumerate(sequence_ids)}
    figure, axes = plt.subplots(figsize=(12, 0.28 * len(sequence_ids) + 1.2))
    for step, record in enumerate(engine_stats.steps):
        for seq_id, count in zip(record.seq_ids, record.num_new_tokens):
            axes.broken_barh([(step, 1)], (row[seq_id] - 0.4, 0.8), color="C0" if count > 1 else "0.75")
        for seq_id in record.preempted:
            axes.plot(step + 0.5, row[seq_id], "rx", markersize=6)
    axes.set(xlabel="step", yticks=range(len(sequence_ids)), yticklabels=sequence_ids, title=title)
    axes.invert_yaxis()
    figure.tight_layout()
    return figure


timeline = draw_timeline(tight.stats, [s.seq_id for s in squeezed],
                         "16 chat requests, 24 blocks: blue = prefill, grey = decode, x = preempted")
timeline.savefig("../figures/06_timeline.png", dpi=100)

# %% [markdown]
# Step through the same run: the slider picks a step, and the text shows what the scheduler decided.

# %%
step_slider = widgets.IntSlider(value=0, min=0, max=tight.stats.num_steps - 1, description="step")
step_text = widgets.HTML()


def describe_step(change=None):
    record = tight.stats.steps[step_slider.value]
    prefills = [f"{s}(+{n})" for s, n in zip(record.seq_ids, record.num_new_tokens) if n > 1]
    decodes = [s for s, n in zip(record.seq_ids, record.num_new_tokens) if n == 1]
    step_text.value = (f"<b>step {step_slider.value}</b>: {len(record.seq_ids)} sequences, "
                       f"{sum(record.num_new_tokens)} tokens, {record.blocks_used}/24 blocks in use<br>"
                       f"prefill: {', '.join(prefills) or '-'}<br>decode: {', '.join(decodes) or '-'}<br>"
                       f"preempted: {', '.join(record.preempted) or '-'}")


step_slider.observe(describe_step, names="value")
describe_step()

# %% tags=["nbval-ignore-output"]
widgets.VBox([step_slider, step_text])

# %% [markdown]
# ## Summary
#
# * A `Sequence` moves between waiting, running, preempted and finished; the prompt/output boundary never moves.
# * The `Scheduler` decodes running sequences first, preempts the newest when blocks run out, admits waiting ones
#   in order within `max_num_seqs`, `max_num_batched_tokens` and free blocks, and rejects requests that could never fit.
# * `EngineCore.step` runs one packed forward pass for every scheduled token, samples, stops and frees.
# * Outputs equal one-by-one generation, with and without preemptions, and all blocks return.
# * Continuous batching beat static batching on the same work and budget, measured above.
#
# Chapter 07 wraps this core in an API shaped like vLLM's: `LLM`, `SamplingParams`, text in and out, chat and streaming.
#
# ## Exercises
#
# 1. Change the preemption victim to the *oldest* running sequence. What happens to the p90 latency?
# 2. Shrink the pool in `run_engine` until preemptions exceed 20. Do the outputs still match `alone`?
# 3. How many blocks does the whole 16-request chat workload need at its peak without preemption? Check below.

# %%
answer_peak_blocks = None  # exercise 3: peak blocks in use with num_blocks=128

if answer_peak_blocks is None:
    print("Exercise 3 not answered yet.")
else:
    peak = max(record.blocks_used for record in engine.stats.steps)
    print("correct" if answer_peak_blocks == peak else "not quite: look at StepRecord.blocks_used")
