"""Stopping rules and prompt validation of the naive generation loop, on the real model."""

from __future__ import annotations

import pytest

from nanovllm_lib import SamplingParams, finish_reason, generate_naive
from nanovllm_lib.weights import end_of_sequence_ids


def test_finish_reason_rules():
    eos = frozenset({2})
    assert finish_reason(2, 1, SamplingParams(max_tokens=5), eos) == "stop"
    assert finish_reason(2, 1, SamplingParams(max_tokens=5, ignore_eos=True), eos) is None
    assert finish_reason(7, 1, SamplingParams(max_tokens=5, stop_token_ids=[7], ignore_eos=True), eos) == "stop"
    assert finish_reason(9, 5, SamplingParams(max_tokens=5), eos) == "length"
    assert finish_reason(9, 4, SamplingParams(max_tokens=5), eos) is None


@pytest.mark.parametrize("max_tokens", [1, 2, 5])
def test_exactly_max_tokens_with_ignore_eos(lm, tokenizer, max_tokens):
    result = generate_naive(lm, tokenizer("Hi")["input_ids"], SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                               ignore_eos=True))
    assert len(result.token_ids) == max_tokens
    assert result.finish_reason == "length"


def test_chat_reply_stops_on_end_of_turn(lm, tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=True,
                                        add_generation_prompt=True, return_dict=True)["input_ids"]
    result = generate_naive(lm, ids, SamplingParams(temperature=0, max_tokens=50))
    assert result.finish_reason == "stop"
    assert result.token_ids[-1] in lm.eos_token_ids


def test_ignore_eos_runs_through_end_of_turn(lm, tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=True,
                                        add_generation_prompt=True, return_dict=True)["input_ids"]
    short = generate_naive(lm, ids, SamplingParams(temperature=0, max_tokens=50))
    long = generate_naive(lm, ids, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    assert len(long.token_ids) == 50
    assert long.token_ids[:len(short.token_ids)] == short.token_ids  # EOS kept as an ordinary token


def test_every_eos_id_stops(lm, tokenizer):
    ids = tokenizer("The weather today is")["input_ids"]
    free_run = generate_naive(lm, ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)).token_ids
    # Declaring the third greedy token an EOS id must end generation right there.
    lm_with_extra_eos = type(lm)(lm.model, lm.tokenizer, lm.config, lm.eos_token_ids | {free_run[2]}, lm.path)
    result = generate_naive(lm_with_extra_eos, ids, SamplingParams(temperature=0, max_tokens=8))
    assert result.token_ids == free_run[:3]
    assert result.finish_reason == "stop"


def test_eos_ids_are_union_of_all_sources(tmp_path, tokenizer):
    (tmp_path / "config.json").write_text('{"eos_token_id": 2}')
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0, 7]}')
    assert end_of_sequence_ids(tmp_path, tokenizer) == frozenset({0, 2, 7})


def test_empty_prompt_rejected(lm):
    with pytest.raises(ValueError, match="empty"):
        generate_naive(lm, [], SamplingParams())


def test_out_of_vocabulary_prompt_rejected(lm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate_naive(lm, [1, 10**6], SamplingParams())
