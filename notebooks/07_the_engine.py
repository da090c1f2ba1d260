# %% [markdown]
# # 07 · The engine: an API shaped like vLLM's
#
# Chapter 06 built the core: a scheduler, a paged KV cache and a loop that runs many sequences together.
# It speaks token ids. People speak text.
# This chapter wraps the core in the API vLLM offers for offline use, so that a script written against it
# runs on vLLM by changing one import:
#
# ```python
# from nanovllm_lib import LLM, SamplingParams      # from vllm import LLM, SamplingParams
# llm = LLM()                                        # llm = LLM(model="HuggingFaceTB/SmolLM2-135M-Instruct")
# outputs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0.8, max_tokens=32))
# print(outputs[0].outputs[0].text)
# ```
#
# **In this chapter** we build text in and text out, chat through the checkpoint's own template,
# streaming with an incremental detokenizer that never splits a character, stop strings, engine counters,
# and input validation that leaves the engine serving after a bad request.

# %% [markdown]
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-github-user/nano-vllm-course/blob/main/notebooks/07_the_engine.ipynb) [![Launch on Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/your-github-user/nano-vllm-course/main?urlpath=lab/tree/notebooks/07_the_engine.ipynb)

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

import matplotlib.pyplot as plt
import torch
from transformers import AutoModelForCausalLM

from nanovllm_lib import SamplingParams, load_model
from nanovllm_lib.engine_core import EngineCore
from nanovllm_lib.scheduler import SchedulerConfig
from nanovllm_lib.sequence import Sequence

torch.manual_seed(0)
lm = load_model()
tokenizer = lm.tokenizer
print(lm.config.model_type, "| EOS ids:", sorted(lm.eos_token_ids))

# %% [markdown]
# ## Incremental detokenization
#
# A streaming engine sends text as tokens arrive. The obvious way, decoding each new token alone, is wrong:
# byte-level tokenizers split many characters (emoji, Chinese, accented letters) across several tokens,
# and a lone piece decodes to the replacement character `�`.

# %%
sample = "naïve café 😀 你好"
pieces = [tokenizer.decode([t]) for t in tokenizer(sample)["input_ids"]]
print(pieces)
print("pieces joined equal the text:", "".join(pieces) == sample)

# %% [markdown]
# The fix: decode the whole output so far, and send only what is new, **holding back** while the text ends in an incomplete character.
# What was sent is never taken back, so the offset of sent text only moves forward.
# Decoding everything each time costs $O(n)$ per token.
# Real engines, vLLM among them, decode only a short window of recent tokens to avoid that cost; we keep the simple version.

# %%
#| default_exp detokenizer

# %%
#| export
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# The character a byte-level tokenizer produces for an incomplete UTF-8 sequence.
REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    """Turn a growing list of token ids into text deltas that never split a character and never repeat."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""  # everything sent so far

    def _decode(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Add one token and return the new text it completes (often "", while a character is incomplete)."""
        self.token_ids.append(token_id)
        full = self._decode()
        if full.endswith(REPLACEMENT_CHARACTER) or not full.startswith(self.text):
            return ""  # wait for the rest of the character
        delta = full[len(self.text):]
        self.text = full
        return delta

    def flush(self) -> str:
        """Return any held-back text at the end of the request, even if it ends in an incomplete character."""
        full = self._decode()
        if not full.startswith(self.text):
            logger.warning("decoded text changed before its end; dropping %r", full[len(self.text):])
            return ""
        delta = full[len(self.text):]
        self.text = full
        return delta


# %%
from nanovllm_lib.detokenizer import IncrementalDetokenizer

for text in ["🚀 ok", "你好世界", "ďábelské", "naïve café 😀👍"]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add(t) for t in tokenizer(text)["input_ids"]] + [detokenizer.flush()]
    print(f"{text!r:22} deltas {deltas}  joined equal: {''.join(deltas) == text}  no broken character: "
          f"{all('�' not in d for d in deltas)}")

# %% [markdown]
# ## Stop strings
#
# A request may ask to stop at a string, say `"\n\n"` or `"Answer:"`. A stop string can span two tokens,
# so the engine checks the **text**, not single tokens.
# It also must not send the first half of a stop string before the second half has had a chance to arrive,
# so a streaming request holds back its last
# `len(longest stop string) - 1` characters until they are known to be safe.
# Neither the stop string nor the text of a stop token (EOS or a `stop_token_ids` entry) is part of the returned text;
# the stop token's id does appear in `token_ids`, as in vLLM.

# %%
#| export outputs
from __future__ import annotations

from dataclasses import dataclass, field


# %%
#| export outputs
@dataclass
class CompletionOutput:
    """One completion of a request, as in vLLM: text, token ids, and why it ended."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", or None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it, if any


@dataclass
class RequestMetrics:
    """Wall-clock times of a request in seconds (time.perf_counter), for latency measurements."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    """The state of one request, shaped like vLLM's RequestOutput; `delta` is the text added by this step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    delta: str = ""
    num_preemptions: int = 0


# %% [markdown]
# The engine keeps, per request, the detokenizer and the stop-string search.
# `TextState.update` takes each new token and returns the text that is safe to send.

# %%
#| export llm_engine
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from nanovllm_lib.detokenizer import IncrementalDetokenizer
from nanovllm_lib.engine_core import EngineCore
from nanovllm_lib.outputs import CompletionOutput, RequestMetrics, RequestOutput
from nanovllm_lib.sampling import SamplingParams
from nanovllm_lib.scheduler import SchedulerConfig
from nanovllm_lib.sequence import Sequence
from nanovllm_lib.weights import LoadedModel


# %%
#| export llm_engine
class TextState:
    """Text of one request: incremental detokenization plus stop strings, with a hold-back for streaming."""

    def __init__(self, tokenizer, stop: list[str]):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = stop
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # the visible text: decoded output, cut at a stop string
        self.sent = 0  # characters of self.text already returned as deltas
        self.stop_string: str | None = None

    def update(self, token_id: int | None, final: bool) -> str:
        """Add a token (None adds nothing) and return the newly safe text; `final` releases what was held back."""
        if token_id is not None and self.stop_string is None:
            self.text += self.detokenizer.add(token_id)
        if final and self.stop_string is None:
            self.text += self.detokenizer.flush()
        if self.stop_string is None:
            self._find_stop_string()
        safe = len(self.text) if (final or self.stop_string is not None) else max(self.sent, len(self.text) - self.hold_back)
        delta = self.text[self.sent:safe]
        self.sent = safe
        return delta

    def _find_stop_string(self) -> None:
        # A new match can only start in the unsent tail or the held-back characters before it.
        start = max(0, self.sent - self.hold_back)
        matches = [(self.text.find(s, start), s) for s in self.stop]
        matches = [(index, s) for index, s in matches if index >= 0]
        if matches:
            index, stop_string = min(matches)
            self.text = self.text[:index]
            self.stop_string = stop_string


# %% [markdown]
# ## The request-level engine
#
# `LLMEngine` has vLLM's shape for driving requests one step at a time:
# `add_request`, `step`, `abort_request`, `has_unfinished_requests`.
# It tokenizes text prompts, validates each request before it touches the engine
# (a bad request raises `ValueError` and the engine keeps serving the others),
# rejects a duplicate request id, and turns the core's token-level progress into `RequestOutput`s.
#
# Its length policy, stated once: a prompt must leave room for at least one new token (`prompt_len < max_model_len`);
# when `prompt_len + max_tokens` exceeds `max_model_len`, generation stops at `max_model_len` with finish reason `"length"`.

# %%
#| export llm_engine
@dataclass
class _Request:
    sequence: Sequence
    prompt: str | None
    text: TextState
    metrics: RequestMetrics


class LLMEngine:
    """Requests in, RequestOutputs out, one scheduling step at a time (vLLM's LLMEngine shape)."""

    def __init__(self, lm: LoadedModel, num_blocks: int, block_size: int, scheduler_config: SchedulerConfig,
                 core_class: type[EngineCore] = EngineCore):
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.core = core_class(lm, num_blocks, block_size, scheduler_config)
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()

    @property
    def stats(self):
        return self.core.stats

    def new_request_id(self) -> str:
        return str(next(self._ids))

    def tokenize(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        """Return (prompt text or None, prompt token ids) for a string, a list of ids, or a vLLM-style dict."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError(f"A prompt dict needs 'prompt' or 'prompt_token_ids'; got keys {sorted(prompt)}.")
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"A prompt must be a string or a list of token ids, got {type(prompt).__name__}.")

    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams) -> None:
        """Validate and queue a request; raise ValueError, changing nothing, if it is invalid."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"Request {request_id!r}: sampling params must be a SamplingParams, got {type(params).__name__}.")
        if request_id in self.requests:
            raise ValueError(f"Request id {request_id!r} is already in use by an unfinished request; choose a unique id.")
        text, token_ids = self.tokenize(prompt)
        sequence = Sequence(request_id, token_ids, params)
        self.core.add(sequence)  # raises ValueError for empty, out-of-vocabulary, too long or never-fitting prompts
        self.requests[request_id] = _Request(sequence, text, TextState(self.tokenizer, params.stop),
                                             RequestMetrics(arrival_time=time.perf_counter()))

    def abort_request(self, request_id: str) -> None:
        """Cancel a request and free its KV blocks; raise KeyError if it is not running or waiting."""
        if request_id not in self.requests:
            raise KeyError(f"No unfinished request has id {request_id!r}.")
        self.core.abort(request_id)
        del self.requests[request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Run one engine step; return an output for every request that advanced."""
        outputs = []
        now = time.perf_counter
        for sequence in self.core.step():
            request = self.requests[sequence.seq_id]
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now()
            token = sequence.output_token_ids[-1]
            is_stop_token = sequence.finish_reason == "stop" and (
                token in sequence.params.stop_token_ids or token in self.lm.eos_token_ids)
            delta = request.text.update(None if is_stop_token else token, final=sequence.is_finished)
            if request.text.stop_string is not None and not sequence.is_finished:
                self.core.scheduler.finish(sequence, "stop")  # a stop string ends the request here
            outputs.append(self._output(request, delta))
            if sequence.is_finished:
                request.metrics.finished_time = now()
                del self.requests[sequence.seq_id]
        return outputs

    def _output(self, request: _Request, delta: str) -> RequestOutput:
        sequence = request.sequence
        stop_reason = request.text.stop_string
        if stop_reason is None and sequence.finish_reason == "stop":
            stop_reason = sequence.output_token_ids[-1]
        completion = CompletionOutput(0, request.text.text, list(sequence.output_token_ids),
                                      sequence.finish_reason if sequence.is_finished else None,
                                      stop_reason if sequence.is_finished else None)
        return RequestOutput(sequence.seq_id, request.prompt, list(sequence.prompt_token_ids), [completion],
                             sequence.is_finished, request.metrics, delta, sequence.num_preemptions)


# %% [markdown]
# ## `LLM`: the offline API
#
# `LLM` owns the model and the engine and offers the three calls most scripts need:
# `generate` (prompts in, outputs in the same order), `chat` (conversations through the checkpoint's template),
# and `stream` (text deltas of one prompt as they are produced).
#
# Settings, with vLLM's names where vLLM has one: `block_size`, `num_kv_blocks` or `kv_cache_memory`
# (bytes for the KV pool), `max_num_seqs`, `max_num_batched_tokens`, `max_model_len`, `device`, `dtype`,
# and `enable_prefix_caching`, which chapter 08 builds.
# An unknown setting is rejected with the list of known ones rather than silently ignored:
# a vLLM setting such as `gpu_memory_utilization` does nothing here, and saying so beats pretending.
# By default `max_model_len` is the smaller of the model's context and what the pool holds,
# and an explicit value larger than the pool is refused at start-up.

# %%
#| export llm
from __future__ import annotations

from collections.abc import Iterator

import torch

from nanovllm_lib.engine_core import EngineCore
from nanovllm_lib.llm_engine import LLMEngine
from nanovllm_lib.outputs import RequestOutput
from nanovllm_lib.paged_attention import PagedKVCache
from nanovllm_lib.sampling import SamplingParams
from nanovllm_lib.scheduler import SchedulerConfig
from nanovllm_lib.weights import load_model

DEFAULT_KV_CACHE_MEMORY = 256 * 2**20  # bytes; about 5,800 tokens of SmolLM2-135M in fp32
KNOWN_SETTINGS = ("block_size", "num_kv_blocks", "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens",
                  "max_model_len", "device", "dtype", "enable_prefix_caching")


# %%
#| export llm
class LLM:
    """A small offline inference engine with vLLM's `LLM` interface: generate, chat and stream.

    model: None for the embedded SmolLM2-135M-Instruct, a checkpoint folder, or a Hugging Face repo id.
    """

    def __init__(self, model: str | None = None, **settings):
        unknown = sorted(set(settings) - set(KNOWN_SETTINGS))
        if unknown:
            raise ValueError(f"Unknown LLM setting(s) {unknown}. Known settings: {', '.join(KNOWN_SETTINGS)}.")
        device = settings.get("device", "cpu")
        dtype = settings.get("dtype", torch.float32)
        self.lm = load_model(model, device=device, dtype=dtype)
        config = self.lm.config
        block_size = settings.get("block_size", 16)
        num_blocks = settings.get("num_kv_blocks")
        if num_blocks is None:
            memory = settings.get("kv_cache_memory", DEFAULT_KV_CACHE_MEMORY)
            num_blocks = PagedKVCache.num_blocks_for_memory(config, block_size, memory, dtype)
        pool_tokens = num_blocks * block_size
        max_model_len = settings.get("max_model_len") or min(config.max_position_embeddings, pool_tokens)
        if max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's context of "
                             f"{config.max_position_embeddings} tokens.")
        if max_model_len - 1 > pool_tokens:
            raise ValueError(f"max_model_len={max_model_len} does not fit in the KV pool of {num_blocks} blocks x "
                             f"{block_size} tokens = {pool_tokens} tokens; lower it or enlarge the pool.")
        scheduler_config = SchedulerConfig(
            max_num_seqs=settings.get("max_num_seqs", 16),
            max_num_batched_tokens=settings.get("max_num_batched_tokens") or max(2048, max_model_len),
            max_model_len=max_model_len,
        )
        core_class = EngineCore
        if settings.get("enable_prefix_caching", False):
            # Defined in chapter 08; imported here so that LLM takes the same setting as vLLM.
            from nanovllm_lib.prefix_caching import PrefixCachingEngineCore as core_class
        self.engine = LLMEngine(self.lm, num_blocks, block_size, scheduler_config, core_class)

    def get_tokenizer(self):
        return self.lm.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for one prompt or a list (strings, token-id lists, or dicts); return outputs in input order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = self._params_per_prompt(prompts, sampling_params)
        return self._run(prompts, params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.chat_prompt_ids(c, chat_template_kwargs)} for c in conversations]
        return self._run(prompts, self._params_per_prompt(prompts, sampling_params), use_tqdm)

    def chat_prompt_ids(self, conversation: list[dict], chat_template_kwargs: dict | None = None) -> list[int]:
        """Token ids of a conversation rendered by the checkpoint's own chat template, ready for the reply."""
        rendered = self.lm.tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True,
                                                         return_dict=True, **(chat_template_kwargs or {}))
        return list(rendered["input_ids"])

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one prompt's completion in pieces as it is generated."""
        request_id = f"stream-{self.engine.new_request_id()}"
        self.engine.add_request(request_id, prompt, sampling_params or SamplingParams())
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        if output.delta:
                            yield output.delta
                        if output.finished:
                            return
        finally:
            if request_id in self.engine.requests:  # the caller stopped early
                self.engine.abort_request(request_id)

    def _params_per_prompt(self, prompts: list, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * len(prompts)
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * len(prompts)
        if not (isinstance(sampling_params, (list, tuple)) and all(isinstance(p, SamplingParams) for p in sampling_params)):
            raise ValueError(f"sampling_params must be a SamplingParams or a list of them, got "
                             f"{type(sampling_params).__name__}: {sampling_params!r}.")
        if len(sampling_params) != len(prompts):
            raise ValueError(f"Got {len(sampling_params)} SamplingParams for {len(prompts)} prompts; pass one, "
                             "or one per prompt.")
        return list(sampling_params)

    def _run(self, prompts: list, params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        ids = []
        try:
            for prompt, request_params in zip(prompts, params):
                request_id = self.engine.new_request_id()
                self.engine.add_request(request_id, prompt, request_params)
                ids.append(request_id)
        except ValueError:
            for request_id in ids:  # all or nothing: a bad prompt cancels the whole call
                self.engine.abort_request(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", unit="req")
        while len(finished) < len(ids):
            for output in self.engine.step():
                if output.finished and output.request_id in ids:
                    finished[output.request_id] = output
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [finished[request_id] for request_id in ids]


# %% [markdown]
# ## Using it
#
# The example from the top of the chapter, with greedy decoding so the output is reproducible:

# %%
from nanovllm_lib.llm import LLM

llm = LLM()
outputs = llm.generate(["Hello, my name is", "The three laws of thermodynamics are"],
                       SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
for output in outputs:
    completion = output.outputs[0]
    print(repr(output.prompt), "->", repr(completion.text), "|", completion.finish_reason, len(completion.token_ids))

# %% [markdown]
# Chat goes through the checkpoint's template. The ids the engine sends must equal transformers' rendering exactly
# (a doubled or missing special token changes the reply):

# %%
conversation = [{"role": "user", "content": "What is 2+2? Answer with one number."}]
reference_ids = tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"]
reply = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
print("prompt ids equal apply_chat_template:", reply.prompt_token_ids == list(reference_ids))
print(repr(reply.outputs[0].text), "| finish:", reply.outputs[0].finish_reason,
      "| stopped by id:", reply.outputs[0].stop_reason)

# %% [markdown]
# Streaming prints the reply as it is produced. Joined, the pieces equal the non-streamed text.

# %%
params = SamplingParams(temperature=0, max_tokens=40)
chat_prompt = {"prompt_token_ids": llm.chat_prompt_ids([{"role": "user", "content": "Describe the sea in one sentence."}])}
pieces = list(llm.stream(chat_prompt, params))
print(pieces)
print("streamed text equals generate:", "".join(pieces) == llm.generate([chat_prompt], params, use_tqdm=False)[0].outputs[0].text)

# %% [markdown]
# A stop string that spans tokens ends the request, and it is not in the text, streamed or not:

# %%
story = {"prompt_token_ids": llm.chat_prompt_ids([{"role": "user", "content": "Count from 1 to 10 in words."}])}
free = llm.generate([story], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0].text
stop_at = free[free.index("four"):free.index("four") + 4] if "four" in free else free[10:14]
cut = llm.generate([story], SamplingParams(temperature=0, max_tokens=40, stop=[stop_at]), use_tqdm=False)[0].outputs[0]
streamed = "".join(llm.stream(story, SamplingParams(temperature=0, max_tokens=40, stop=[stop_at])))
print(repr(free))
print("stop string:", repr(stop_at), "->", repr(cut.text), cut.finish_reason, repr(cut.stop_reason))
print("text is the free text cut before the stop string:", cut.text == free[:free.index(stop_at)])
print("streamed equals non-streamed:", streamed == cut.text)

# %% [markdown]
# ## The check: equal to transformers, however the requests arrive
#
# Sixteen prompts of mixed lengths, greedy, 32 new tokens each with `ignore_eos`, must give exactly
# what transformers' `generate` gives for each prompt alone, whether the engine runs them all together,
# receives them staggered (a new request every other step), or has a pool so small it must preempt.

# %%
reference = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
topics = ["the moon", "bread", "rivers", "chess", "volcanoes", "jazz", "bees", "glass", "tea", "maps",
          "clouds", "trains", "salt", "owls", "bridges", "paper"]
mixed = [tokenizer(f"Here is a short fact about {topic}:" + " Please be precise." * (i % 4))["input_ids"]
         for i, topic in enumerate(topics)]
fixed32 = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
expected = []
with torch.no_grad():
    for ids in mixed:
        prompt = torch.tensor([ids])
        expected.append(reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                           do_sample=False, eos_token_id=None)[0, len(ids):].tolist())
print("prompt lengths:", [len(ids) for ids in mixed])

# %% [markdown]
# This cell runs the three arrival patterns, about 40 s on 2 CPU cores.

# %%
def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


together = LLM()
print("all together equal transformers:", token_ids(together.generate(mixed, fixed32, use_tqdm=False)) == expected)

staggered = LLM()
waiting, results = list(enumerate(mixed)), {}
while waiting or staggered.engine.has_unfinished_requests():
    if waiting:
        index, ids = waiting.pop(0)
        staggered.engine.add_request(f"s{index}", ids, fixed32)
    for output in staggered.engine.step() + staggered.engine.step():
        if output.finished:
            results[int(output.request_id[1:])] = output.outputs[0].token_ids
print("staggered arrival equal transformers:", [results[i] for i in range(16)] == expected)

small = LLM(num_kv_blocks=12, block_size=16)
small_outputs = small.generate(mixed, fixed32, use_tqdm=False)
print("tight pool equal transformers:", token_ids(small_outputs) == expected,
      "| preemptions:", small.engine.stats.num_preemptions,
      "| every block free:", small.engine.core.block_manager.num_free_blocks == 12)

# %% [markdown]
# ## Bad input: clear errors, and the engine keeps serving

# %%
guarded = LLM(num_kv_blocks=8, block_size=16, max_model_len=64)
bad_inputs = {
    "empty prompt": ([], SamplingParams()),
    "prompt over max_model_len": (list(range(100, 170)), SamplingParams()),
    "token id outside the vocabulary": ([1, 10**7], SamplingParams()),
    "params of the wrong type": ("Hi", {"temperature": 0}),
}
for label, (prompt, params) in bad_inputs.items():
    try:
        guarded.generate([prompt], params, use_tqdm=False)
    except ValueError as error:
        print(f"{label:32s} ValueError: {error}")
try:
    SamplingParams(top_p=2.0)
except ValueError as error:
    print(f"{'invalid sampling value':32s} ValueError: {error}")
try:
    LLM(gpu_memory_utilization=0.9)
except ValueError as error:
    print(f"{'unknown setting':32s} ValueError: {error}")

guarded.engine.add_request("x", "Hello", SamplingParams(max_tokens=4))
try:
    guarded.engine.add_request("x", "Hello", SamplingParams(max_tokens=4))
except ValueError as error:
    print(f"{'duplicate request id':32s} ValueError: {error}")
while guarded.engine.has_unfinished_requests():
    guarded.engine.step()

capped = guarded.generate([list(range(100, 160))], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
print("60-token prompt, max_tokens 10, max_model_len 64 ->", len(capped.token_ids), "tokens,", capped.finish_reason)
still = guarded.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
print("still serving:", repr(still[0].outputs[0].text), "| blocks free:",
      guarded.engine.core.block_manager.num_free_blocks, "of 8")

# %% [markdown]
# ## Engine counters
#
# The engine counts what it did at every step. Here is the tight-pool run above:
# sequences and tokens per step, and KV blocks in use, with preemptions marked.

# %%
records = small.engine.stats.steps
figure, axes = plt.subplots(1, 2, figsize=(12, 3.4))
axes[0].plot([len(r.seq_ids) for r in records], label="sequences")
axes[0].plot([sum(r.num_new_tokens) for r in records], label="tokens", alpha=0.7)
axes[0].set(xlabel="step", yscale="log", title="Work per step")
axes[0].legend()
axes[1].plot([r.blocks_used for r in records], color="C2")
for step, record in enumerate(records):
    if record.preempted:
        axes[1].axvline(step, color="red", alpha=0.3)
axes[1].set(xlabel="step", ylabel="blocks in use (of 12)", title="KV blocks; red = preemption")
for ax in axes:
    ax.grid(alpha=0.3)
figure.tight_layout()
figure.savefig("../figures/07_engine_counters.png", dpi=100)
print("steps:", len(records), "| preemptions:", small.engine.stats.num_preemptions,
      "| tokens generated:", small.engine.stats.num_generated_tokens)

# %% [markdown]
# ## Summary
#
# * `LLM`, `SamplingParams`, `generate` and `chat` follow vLLM's offline API; outputs come back in input order with
#   `prompt`, `prompt_token_ids`, `outputs[0].text`, `.token_ids`, `.finish_reason`.
# * The incremental detokenizer holds back incomplete characters; stop strings are found in text and held back while streaming.
# * Greedy outputs equal transformers' for 16 mixed prompts, together, staggered, and under preemption.
# * Bad requests raise `ValueError` naming the value and the fix, and the engine keeps serving.
#
# Chapter 08 makes requests that share a prefix (a system prompt, a few-shot header) share its KV blocks too.
#
# ## Exercises
#
# 1. Stream a reply containing an emoji and print each delta's `repr`. Which steps return an empty delta, and why?
# 2. Give `LLM` a pool of 4 blocks and a request that needs 5. What happens, and where is it decided?
# 3. Run the 16 `mixed` prompts through `LLM(max_num_seqs=1)`. How many engine steps does that take? Check below.

# %%
answer_steps_one_at_a_time = None  # exercise 3: steps for the 16 `mixed` prompts with max_num_seqs=1

if answer_steps_one_at_a_time is None:
    print("Exercise 3 not answered yet.")
else:
    # Each prompt alone: one prefill step, then 31 decode steps.
    print("correct" if answer_steps_one_at_a_time == 16 * 32 else "not quite: count prefill and decode steps")
