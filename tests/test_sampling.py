"""Sampling rules: greedy, filters, seeds, and parameter validation."""

from __future__ import annotations

import pytest
import torch

from nanovllm_lib import SamplingParams, make_generator, sample_batch, sample_token
from nanovllm_lib.sampling import filter_top_k, filter_top_p

torch.manual_seed(0)
LOGITS = torch.randn(50) * 3


def draws(params: SamplingParams, logits: torch.Tensor = LOGITS, count: int = 200) -> list[int]:
    generator = make_generator(params.seed)
    return [sample_token(logits, params, generator) for _ in range(count)]


def test_temperature_zero_is_argmax_per_row_in_mixed_batch():
    flat = torch.zeros_like(LOGITS)  # every token equally likely: sampling must spread out
    logits = torch.stack([LOGITS, flat])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=1)]
    generator = make_generator(1)
    greedy_rows, sampled_rows = [], []
    for _ in range(50):
        greedy, sampled = sample_batch(logits, params, [None, generator])
        greedy_rows.append(greedy)
        sampled_rows.append(sampled)
    assert set(greedy_rows) == {int(LOGITS.argmax())}
    assert len(set(sampled_rows)) > 10


@pytest.mark.parametrize("top_p", [0.0, 1e-9])
def test_tiny_top_p_keeps_the_top_token(top_p):
    assert set(draws(SamplingParams(temperature=1.0, top_p=top_p, seed=3))) == {int(LOGITS.argmax())}


def test_top_p_one_disables_filter():
    assert torch.equal(filter_top_p(LOGITS, 1.0), LOGITS)


@pytest.mark.parametrize("disabled", [0, -1])
def test_top_k_disabled_values_leave_distribution(disabled):
    flat = torch.zeros(8)
    assert torch.equal(filter_top_k(flat, disabled), flat)
    assert set(draws(SamplingParams(top_k=disabled, seed=5), flat, 300)) == set(range(8))


def test_top_k_one_is_greedy():
    assert set(draws(SamplingParams(top_k=1, seed=2))) == {int(LOGITS.argmax())}


def test_top_k_keeps_exactly_k():
    kept = torch.isfinite(filter_top_k(LOGITS, 5))
    assert kept.sum() == 5
    assert set(torch.topk(LOGITS, 5).indices.tolist()) == set(kept.nonzero().flatten().tolist())


def test_top_p_keeps_smallest_covering_set():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(filter_top_p(logits, 0.7)).tolist()
    assert kept == [True, True, False, False]


def test_same_seed_reproduces_and_different_seeds_differ():
    assert draws(SamplingParams(seed=7)) == draws(SamplingParams(seed=7))
    assert draws(SamplingParams(seed=7)) != draws(SamplingParams(seed=8))


@pytest.mark.parametrize("bad,rule", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=2), "n=2"),
    (dict(seed="abc"), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_invalid_params_rejected_with_rule(bad, rule):
    with pytest.raises(ValueError, match=rule):
        SamplingParams(**bad)


def test_stop_string_becomes_list():
    assert SamplingParams(stop="\n").stop == ["\n"]


def test_sample_batch_checks_lengths():
    with pytest.raises(ValueError, match="must match"):
        sample_batch(torch.zeros(2, 4), [SamplingParams()], [None, None])
