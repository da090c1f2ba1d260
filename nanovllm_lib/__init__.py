"""nanovllm_lib: the inference engine built chapter by chapter in the nano-vLLM course.

Every module except this one is generated from the chapters in notebooks/ by `make export`.
"""

__version__ = "0.1.0"

# Chapter 00: where the default model comes from, and the setup of a Colab runtime.
from nanovllm_lib.embedded_model import default_cache_dir, ensure_embedded_model
from nanovllm_lib.colab import is_colab, setup_colab

# Chapter 01: our own forward pass, loading, sampling and naive generation.
from nanovllm_lib.config import ModelConfig
from nanovllm_lib.generation import Generation, finish_reason, generate_naive, validate_prompt
from nanovllm_lib.model import CausalAttention, CausalLM
from nanovllm_lib.sampling import SamplingParams, make_generator, sample_batch, sample_token
from nanovllm_lib.shapes import check_shape
from nanovllm_lib.weights import LoadedModel, load_model

# Chapter 02: the KV cache.
from nanovllm_lib.kv_cache import (ContiguousKVCache, generate_batch_cached, generate_cached, kv_bytes_per_token,
                                   validate_context_length)

# Chapter 03: a seeded workload and a simulation of KV memory under different allocators.
from nanovllm_lib.serving_sim import ServingResult, simulate_serving
from nanovllm_lib.workload import WorkloadRequest, sample_workload

# Chapter 04: block tables and the block manager.
from nanovllm_lib.block_manager import BlockAllocator, BlockManager, NoFreeBlocksError, SequenceBlocks

# Chapter 05: PagedAttention.
from nanovllm_lib.paged_attention import (PagedAttention, PagedKVCache, StepMetadata, build_step_metadata,
                                          generate_paged, kv_tokens_needed, run_paged_step)

# Chapter 06: continuous batching.
from nanovllm_lib.engine_core import EngineCore, EngineStats, StepRecord
from nanovllm_lib.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from nanovllm_lib.sequence import Sequence, SequenceStatus

# Chapter 07: the engine with vLLM's offline API.
from nanovllm_lib.detokenizer import IncrementalDetokenizer
from nanovllm_lib.llm import LLM
from nanovllm_lib.llm_engine import LLMEngine
from nanovllm_lib.outputs import CompletionOutput, RequestMetrics, RequestOutput

# Chapter 08: prefix caching.
from nanovllm_lib.prefix_caching import (CachedBlock, PrefixCachingBlockAllocator, PrefixCachingBlockManager,
                                         PrefixCachingEngineCore, PrefixCachingScheduler, block_keys, hash_block)

# Chapter 09: benchmarks and a batched decode attention backend.
from nanovllm_lib.batched_attention import BatchedDecodeAttention, BatchedDecodeCausalLM, with_batched_decode
from nanovllm_lib.bench import (BenchConfig, BenchRequest, BenchResult, make_bench_requests, run_benchmark, run_engine,
                                run_hf_generate, run_llm_api)
