"""nanovllm_lib: the inference engine built chapter by chapter in the nano-vLLM course.

Every module except this one is generated from the chapters in notebooks/ by `make export`.
"""

__version__ = "0.1.0"

# Chapter 00: where the default model comes from.
from nanovllm_lib.embedded_model import default_cache_dir, ensure_embedded_model

# Chapter 01: our own forward pass, loading, sampling and naive generation.
from nanovllm_lib.config import ModelConfig
from nanovllm_lib.generation import Generation, finish_reason, generate_naive, validate_prompt
from nanovllm_lib.model import CausalAttention, CausalLM
from nanovllm_lib.sampling import SamplingParams, make_generator, sample_batch, sample_token
from nanovllm_lib.shapes import check_shape
from nanovllm_lib.weights import LoadedModel, load_model
