"""The scheduler without a model: admission, budgets, preemption, abort and bookkeeping."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm_lib import SamplingParams
from nanovllm_lib.block_manager import BlockManager
from nanovllm_lib.scheduler import Scheduler, SchedulerConfig
from nanovllm_lib.sequence import Sequence, SequenceStatus


def make_scheduler(num_blocks=8, block_size=4, max_num_seqs=8, max_tokens_per_step=64, max_model_len=64):
    return Scheduler(SchedulerConfig(max_num_seqs, max_tokens_per_step, max_model_len), BlockManager(num_blocks, block_size))


def sequence(seq_id, prompt_len, max_tokens=8):
    return Sequence(seq_id, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def fake_step(scheduler, token=7):
    """Play the engine: mark scheduled tokens computed, append one token each, finish at max_tokens."""
    batch = scheduler.schedule()
    for seq, count in zip(batch.sequences, batch.num_new_tokens):
        assert count == seq.num_tokens - seq.num_computed_tokens  # exactly the tokens without KV
        assert scheduler.block_manager.num_tokens(seq.seq_id) == seq.num_tokens
        seq.num_computed_tokens += count
        seq.output_token_ids.append(token)
        if len(seq.output_token_ids) >= seq.params.max_tokens or seq.num_tokens >= scheduler.config.max_model_len:
            scheduler.finish(seq, "length")
    return batch


def run_to_end(scheduler, limit=10_000):
    steps = 0
    while scheduler.has_unfinished():
        fake_step(scheduler)
        steps += 1
        assert steps < limit, "the scheduler made no progress"
    return steps


def test_request_that_never_fits_rejected_and_queue_moves():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="needs 5 KV blocks.*whole pool has 4"):
        scheduler.add(sequence("A", 20, max_tokens=1))
    b = sequence("B", 5, max_tokens=4)
    scheduler.add(b)
    run_to_end(scheduler)
    assert b.finish_reason == "length"
    assert len(b.output_token_ids) == 4


def test_lone_sequence_outgrowing_pool_rejected_at_admission():
    scheduler = make_scheduler(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="could never run"):
        scheduler.add(sequence("A", 8, max_tokens=4))
    assert not scheduler.has_unfinished()


def test_prompt_at_max_model_len_rejected_with_both_numbers():
    scheduler = make_scheduler(num_blocks=64, max_model_len=64)
    for length in (64, 65, 200):
        with pytest.raises(ValueError, match=f"{length}-token prompt.*max_model_len is 64"):
            scheduler.add(sequence("A", length))


def test_prompt_plus_max_tokens_capped_at_max_model_len():
    scheduler = make_scheduler(num_blocks=64, max_model_len=64)
    seq = sequence("A", 60, max_tokens=10)
    scheduler.add(seq)
    run_to_end(scheduler)
    assert len(seq.output_token_ids) == 4


def test_empty_prompt_rejected():
    with pytest.raises(ValueError, match="empty prompt"):
        make_scheduler().add(sequence("A", 0))


def test_batched_token_budget_must_cover_max_model_len():
    with pytest.raises(ValueError, match="max_num_batched_tokens=32 is smaller than max_model_len=64"):
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64)


def test_preempts_newest_and_recomputes_everything():
    scheduler = make_scheduler(num_blocks=3, block_size=4)
    first, second = sequence("A", 7, max_tokens=6), sequence("B", 3, max_tokens=6)
    scheduler.add(first)
    scheduler.add(second)
    fake_step(scheduler)  # both prefill: A takes 2 blocks, B 1, and the pool is full
    fake_step(scheduler)  # positions 7 (A) and 3 (B) still fit in their last blocks
    batch = fake_step(scheduler)  # A's position 8 needs a third block: B, the newest, is preempted
    assert [s.seq_id for s in batch.preempted] == ["B"]
    assert second.status is SequenceStatus.PREEMPTED
    assert second.num_computed_tokens == 0
    assert "B" not in scheduler.block_manager
    assert scheduler.waiting[0] is second
    run_to_end(scheduler)
    assert len(first.output_token_ids) == 6
    assert len(second.output_token_ids) == 6
    assert second.num_preemptions >= 1
    assert scheduler.block_manager.num_free_blocks == 3


def test_preempted_sequence_keeps_prompt_output_boundary():
    scheduler = make_scheduler(num_blocks=3, block_size=4)
    a, b = sequence("A", 7, max_tokens=6), sequence("B", 3, max_tokens=6)
    scheduler.add(a)
    scheduler.add(b)
    for _ in range(3):
        fake_step(scheduler)
    assert b.num_preemptions == 1
    assert b.prompt_token_ids == [1, 2, 3]
    assert b.output_token_ids == [7, 7]


def test_max_num_seqs_limits_running():
    scheduler = make_scheduler(num_blocks=64, max_num_seqs=2)
    for name in "ABCD":
        scheduler.add(sequence(name, 3))
    batch = fake_step(scheduler)
    assert len(batch.sequences) == 2
    assert len(scheduler.running) == 2


def test_token_budget_limits_prefills():
    scheduler = make_scheduler(num_blocks=64, max_tokens_per_step=64, max_model_len=64)
    for name in "ABC":
        scheduler.add(sequence(name, 30))
    batch = fake_step(scheduler)
    assert batch.num_tokens == 60
    assert [s.seq_id for s in batch.sequences] == ["A", "B"]


def test_abort_waiting_and_running_frees_blocks_once():
    scheduler = make_scheduler(num_blocks=8, max_num_seqs=1)
    running, waiting = sequence("A", 5), sequence("B", 5)
    scheduler.add(running)
    scheduler.add(waiting)
    fake_step(scheduler)
    scheduler.abort("A")
    scheduler.abort("B")
    assert running.finish_reason == waiting.finish_reason == "abort"
    assert scheduler.block_manager.num_free_blocks == 8
    assert not scheduler.has_unfinished()
    with pytest.raises(KeyError, match="'A'"):
        scheduler.abort("A")


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 2, 4, 8]))
def test_any_workload_finishes_and_returns_every_block(seed, num_blocks, block_size):
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=num_blocks, block_size=block_size, max_num_seqs=rng.randint(1, 6),
                               max_tokens_per_step=64, max_model_len=64)
    accepted = []
    for index in range(rng.randint(1, 12)):
        seq = sequence(f"r{index}", rng.randint(1, 40), max_tokens=rng.randint(1, 30))
        try:
            scheduler.add(seq)
            accepted.append(seq)
        except ValueError:
            assert scheduler.block_manager.blocks_needed(scheduler.kv_tokens_needed(seq)) > num_blocks
        if rng.random() < 0.2 and accepted and not accepted[0].is_finished:
            scheduler.abort(accepted.pop(0).seq_id)
    run_to_end(scheduler)
    for seq in accepted:
        expected = min(seq.params.max_tokens, 64 - len(seq.prompt_token_ids))
        assert len(seq.output_token_ids) == expected
    assert scheduler.block_manager.num_free_blocks == num_blocks
    assert scheduler.block_manager.sequences() == []
    assert all(count == 0 for count in scheduler.block_manager.allocator.refcounts())
