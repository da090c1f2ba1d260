"""Tests for the workload generator and the KV memory simulation of chapter 03."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm_lib.block_manager import BlockManager
from nanovllm_lib.serving_sim import CATEGORIES, POLICIES, FirstFitArena, simulate_serving
from nanovllm_lib.workload import WorkloadRequest, sample_workload

# sample_workload


def test_workload_is_reproducible_from_seed():
    assert sample_workload(200, seed=7) == sample_workload(200, seed=7)
    assert sample_workload(200, seed=7) != sample_workload(200, seed=8)


def test_workload_prefix_does_not_depend_on_size():
    assert sample_workload(300, seed=3)[:100] == sample_workload(100, seed=3)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    max_context=st.integers(2, 4096),
    max_output_len=st.integers(1, 2048),
    prompt_sigma=st.floats(0, 3),
)
def test_workload_lengths_respect_limits(seed, max_context, max_output_len, prompt_sigma):
    requests = sample_workload(50, seed, max_context=max_context, max_output_len=max_output_len,
                               prompt_sigma=prompt_sigma)
    assert len(requests) == 50
    for request in requests:
        assert 1 <= request.prompt_len <= max_context - 1
        assert 1 <= request.output_len <= max_output_len
        assert request.prompt_len + request.output_len <= max_context


def test_workload_medians_follow_arguments():
    requests = sample_workload(4000, seed=0, prompt_median=100, output_median=300)
    prompts = sorted(r.prompt_len for r in requests)
    outputs = sorted(r.output_len for r in requests)
    assert 90 <= prompts[2000] <= 110
    assert 270 <= outputs[2000] <= 330


def test_zero_sigma_gives_the_median():
    requests = sample_workload(5, seed=0, prompt_median=40, prompt_sigma=0, output_median=9, output_sigma=0)
    assert requests == [WorkloadRequest(40, 9)] * 5


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(num_requests=0, seed=0), "num_requests"),
        (dict(num_requests=2.5, seed=0), "num_requests"),
        (dict(num_requests=3, seed=-1), "seed"),
        (dict(num_requests=3, seed=None), "seed"),
        (dict(num_requests=3, seed=True), "seed"),
        (dict(num_requests=3, seed=0, prompt_median=0), "prompt_median"),
        (dict(num_requests=3, seed=0, output_median=-5.0), "output_median"),
        (dict(num_requests=3, seed=0, prompt_sigma=-0.1), "prompt_sigma"),
        (dict(num_requests=3, seed=0, output_sigma=float("nan")), "output_sigma"),
        (dict(num_requests=3, seed=0, max_output_len=0), "max_output_len"),
        (dict(num_requests=3, seed=0, max_context=1), "max_context"),
    ],
)
def test_workload_rejects_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample_workload(**kwargs)


@pytest.mark.parametrize("prompt_len,output_len", [(0, 5), (5, 0), (-1, 3), (2.0, 3)])
def test_request_rejects_invalid_lengths(prompt_len, output_len):
    with pytest.raises(ValueError):
        WorkloadRequest(prompt_len, output_len)


def test_request_is_frozen():
    request = WorkloadRequest(3, 4)
    with pytest.raises(AttributeError):
        request.prompt_len = 5


# FirstFitArena


def test_arena_places_in_first_gap():
    arena = FirstFitArena(100)
    for start in (0, 30, 60):
        assert arena.find(30) == start
        arena.insert(start, 30)
    assert arena.find(11) is None
    assert arena.find(10) == 90
    arena.remove(30, 30)
    assert arena.find(25) == 30
    assert arena.num_free == 40
    assert arena.find(31) is None  # 40 slots free, but in two gaps of 30 and 10


# simulate_serving


def test_simulation_tiny_case_by_hand():
    # Regions of 30 + 20 = 50 slots in a budget of 100: two run, the third waits 10 steps.
    result = simulate_serving([WorkloadRequest(30, 10)] * 3, budget_tokens=100, policy="max_tokens", max_tokens=20)
    assert result.running_per_step == [2] * 9 + [1] * 9 + [0]
    assert result.loaded_steps == 9
    assert result.mean_running == 2
    assert result.preemptions == 0
    # After step s (0-based) each running request has 30 + s tokens of KV (the prefill at step 0
    # stores the prompt), and each ends with 39: its 10th and last token never gets KV.
    mean_tokens = sum(2 * (30 + s) for s in range(9)) / 9
    assert result.breakdown["token states"] == pytest.approx(mean_tokens / 100)
    assert result.breakdown["reserved for later tokens"] == pytest.approx((2 * 39 - mean_tokens) / 100)
    assert result.breakdown["internal fragmentation"] == pytest.approx(2 * 11 / 100)
    assert result.breakdown["external fragmentation"] == 0


def test_simulation_measures_external_fragmentation():
    # Oracle regions in 100 slots: A = 30 at [0, 30), B = 10 at [30, 40), C = 30 at [40, 70).
    # D needs 40 and waits. B finishes at step 4, leaving gaps of 10 and 30: 40 slots free, none contiguous.
    workload = [WorkloadRequest(10, 20), WorkloadRequest(5, 5), WorkloadRequest(10, 20), WorkloadRequest(20, 20)]
    result = simulate_serving(workload, budget_tokens=100, policy="oracle")
    assert result.loaded_steps == 19  # A and C finish at step 19, and D starts then
    assert result.breakdown["free, too few for the next request"] == pytest.approx(4 * 30 / (19 * 100))
    assert result.breakdown["external fragmentation"] == pytest.approx(15 * 40 / (19 * 100))


@pytest.mark.parametrize("policy", POLICIES)
def test_breakdown_sums_to_one(policy):
    workload = sample_workload(150, seed=1, max_output_len=256, max_context=1024)
    result = simulate_serving(workload, budget_tokens=6000, policy=policy, max_context=1024, max_tokens=256)
    assert result.loaded_steps > 0
    assert sum(result.breakdown.values()) == pytest.approx(1.0)
    assert all(result.breakdown[c] >= 0 for c in CATEGORIES)
    assert result.running_per_step[-1] == 0
    assert 0 < result.token_fraction_of_reserved <= 1


def test_paging_fits_more_requests_than_reservation():
    workload = sample_workload(300, seed=2, max_output_len=512, max_context=2048)
    results = {
        policy: simulate_serving(workload, budget_tokens=20000, policy=policy, max_context=2048, max_tokens=512)
        for policy in POLICIES
    }
    running = {p: r.mean_running for p, r in results.items()}
    assert running["max_context"] < running["max_tokens"] < running["oracle"] < running["paged"]
    tokens = {p: r.breakdown["token states"] for p, r in results.items()}
    assert tokens["max_context"] < tokens["max_tokens"] < tokens["oracle"] < tokens["paged"]
    assert results["paged"].breakdown["external fragmentation"] == 0


@pytest.mark.parametrize("block_size", [1, 3, 16, 64])
def test_paged_waste_is_below_one_block_per_request(block_size):
    workload = sample_workload(200, seed=4, max_output_len=256, max_context=1024)
    result = simulate_serving(workload, budget_tokens=8000, policy="paged", block_size=block_size,
                              max_context=1024)
    empty = result.breakdown["reserved for later tokens"] + result.breakdown["internal fragmentation"]
    assert empty * result.budget_tokens <= (block_size - 1) * result.mean_running + 1e-9
    assert result.mean_table_entries >= 1


def test_paged_events_replay_on_block_manager():
    """The counted simulation and the real BlockManager agree on every step's blocks in use."""
    block_size = 8
    workload = sample_workload(120, seed=5, max_output_len=128, max_context=512)
    result = simulate_serving(workload, budget_tokens=3000, policy="paged", block_size=block_size,
                              max_context=512, record_events=True)
    assert result.preemptions > 0  # the replay covers preemption too
    manager = BlockManager(3000 // block_size, block_size)
    steps = 0
    for event in result.events:
        kind = event[0]
        if kind == "allocate":
            manager.allocate(event[1], event[2])
        elif kind == "append":
            manager.append_slots(event[1])
        elif kind == "free":
            manager.free(event[1])
        else:
            assert manager.num_blocks - manager.num_free_blocks == event[1]
            steps += 1
    assert steps == result.total_steps
    assert manager.sequences() == []
    assert manager.num_free_blocks == manager.num_blocks


def test_preempted_requests_still_finish():
    # Four requests that together outgrow 6 blocks of 4 slots; each alone fits.
    workload = [WorkloadRequest(4, 12)] * 4
    result = simulate_serving(workload, budget_tokens=24, policy="paged", block_size=4, admission_watermark=0)
    assert result.preemptions > 0
    assert result.running_per_step[-1] == 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(policy="lru"), "Unknown policy"),
        (dict(policy="paged", budget_tokens=0), "budget_tokens"),
        (dict(policy="paged", block_size=0), "block_size"),
        (dict(policy="paged", budget_tokens=10, block_size=16), "smaller than one block"),
        (dict(policy="max_tokens", max_tokens=5), "max_tokens"),
        (dict(policy="max_context", max_context=10), "max_context"),
        (dict(policy="max_context", budget_tokens=100, max_context=200), "could never run"),
        (dict(policy="paged", admission_watermark=1.0), "admission_watermark"),
    ],
)
def test_simulation_rejects_invalid_arguments(kwargs, message):
    arguments = dict(budget_tokens=1000) | kwargs
    with pytest.raises(ValueError, match=message):
        simulate_serving([WorkloadRequest(8, 8)], **arguments)


def test_simulation_rejects_empty_workload():
    with pytest.raises(ValueError, match="empty"):
        simulate_serving([], budget_tokens=100, policy="oracle")


def test_request_larger_than_pool_is_rejected_up_front():
    # 30 tokens of KV need 8 blocks of 4; the pool has 5.
    with pytest.raises(ValueError, match="could never run"):
        simulate_serving([WorkloadRequest(20, 11)], budget_tokens=20, policy="paged", block_size=4)
