"""Shared fixtures: the embedded model (loaded once per session) and small random-weight checkpoints."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def embedded_dir():
    from nanovllm_lib import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="session")
def lm(embedded_dir):
    from nanovllm_lib import load_model

    return load_model(embedded_dir)


@pytest.fixture(scope="session")
def hf_model(embedded_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(lm):
    return lm.tokenizer
