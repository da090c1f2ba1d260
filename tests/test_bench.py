"""The benchmark helpers of chapter 09 and the batched decode attention backend: correctness only, never timing."""

from __future__ import annotations

import csv

import pytest
import torch

from nanovllm_lib import BlockManager, ModelConfig, SamplingParams, sample_workload
from nanovllm_lib.batched_attention import BatchedDecodeAttention, BatchedDecodeCausalLM, with_batched_decode
from nanovllm_lib.bench import (BenchConfig, BenchRequest, BenchResult, make_bench_requests, markdown_table,
                                run_benchmark, run_engine, run_hf_generate, run_llm_api, summary_rows, write_report)
from nanovllm_lib.model import CausalLM, rope_inverse_frequencies
from nanovllm_lib.paged_attention import PagedAttention, PagedKVCache, build_step_metadata, run_paged_step
from nanovllm_lib.weights import LoadedModel, load_weights
from random_models import random_hf_model

TOLERANCE = 1e-4


# Requests.

def test_requests_reproducible_and_follow_workload():
    first = make_bench_requests(20, seed=3, vocab_size=100, prompt_median=8, output_median=6, max_output_len=20)
    again = make_bench_requests(20, seed=3, vocab_size=100, prompt_median=8, output_median=6, max_output_len=20)
    lengths = sample_workload(20, 3, prompt_median=8, output_median=6, max_output_len=20)
    assert first == again
    assert [len(r.prompt_token_ids) for r in first] == [w.prompt_len for w in lengths]
    assert [r.output_len for r in first] == [w.output_len for w in lengths]


def test_requests_avoid_excluded_ids():
    requests = make_bench_requests(30, seed=0, vocab_size=10, excluded_token_ids=[0, 1, 2], prompt_median=20)
    tokens = {t for r in requests for t in r.prompt_token_ids}
    assert tokens <= set(range(3, 10))


def test_requests_differ_by_seed():
    assert make_bench_requests(5, 0, 1000) != make_bench_requests(5, 1, 1000)


@pytest.mark.parametrize("vocab_size", [0, 1, True, 2.5])
def test_requests_reject_bad_vocab(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        make_bench_requests(2, 0, vocab_size)


def test_requests_reject_everything_excluded():
    with pytest.raises(ValueError, match="excluded"):
        make_bench_requests(2, 0, 3, excluded_token_ids=[0, 1, 2])


# Results and reports.

def result(system, seconds, completion, tokens, batch_size=None, live=0, reserved=0):
    settings = {} if batch_size is None else {"batch_size": batch_size}
    return BenchResult(system, seconds, completion, tokens, live, reserved, reserved, settings)


def test_result_figures():
    r = result("x", 2.0, [1.0, 2.0, 3.0, 4.0], [[1, 2], [3], [4, 5, 6], [7]], live=30, reserved=40)
    assert r.generated_tokens == 7
    assert r.throughput == 3.5
    assert r.mean_latency == 2.5
    assert r.latency_percentile(50) == 2.0
    assert r.latency_percentile(90) == 4.0
    assert r.latency_percentile(100) == 4.0
    assert r.kv_utilisation == 0.75


def test_kv_utilisation_nan_when_not_measured():
    assert result("x", 1.0, [1.0], [[1]]).kv_utilisation != result("x", 1.0, [1.0], [[1]]).kv_utilisation


def test_summary_speedups_and_token_check():
    tokens = [[1, 2], [3, 4]]
    results = [result("single", 4.0, [2.0, 4.0], tokens, batch_size=1, live=5, reserved=5),
               result("static 2", 2.0, [2.0, 2.0], tokens, batch_size=2, live=5, reserved=10),
               result("static 4", 1.0, [1.0, 1.0], [[1, 2], [3, 5]], batch_size=4, live=5, reserved=20),
               result("engine", 0.5, [0.25, 0.5], tokens, live=8, reserved=10)]
    rows = summary_rows(results)
    assert [row["x one at a time"] for row in rows] == [1.0, 2.0, 4.0, 8.0]
    assert [row["x best static"] for row in rows] == [0.25, 0.5, 1.0, 2.0]
    assert [row["same tokens"] for row in rows] == ["2/2", "2/2", "1/2", "2/2"]
    assert [row["KV utilisation"] for row in rows] == ["100%", "50%", "25%", "80%"]
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1
    assert table.splitlines()[0].startswith("| system |")


def test_summary_without_baselines():
    rows = summary_rows([result("engine", 1.0, [1.0], [[1]])])
    assert rows[0]["x one at a time"] == ""
    assert rows[0]["x best static"] == ""
    assert rows[0]["KV utilisation"] == ""


# transformers generate, on a tiny random model.

@pytest.fixture(scope="module")
def tiny_hf():
    return random_hf_model("llama", num_heads=4, num_kv_heads=2, head_dim=16)


def tiny_requests():
    return [BenchRequest((5, 6, 7), 4), BenchRequest((9,), 2), BenchRequest((10, 11, 12, 13, 14), 5),
            BenchRequest((3, 4), 1), BenchRequest((20, 21, 22, 23), 3)]


def test_static_batches_equal_one_at_a_time(tiny_hf):
    requests = tiny_requests()
    single = run_hf_generate(tiny_hf, requests, 1, pad_token_id=0)
    for batch_size in (2, 5):
        batched = run_hf_generate(tiny_hf, requests, batch_size, pad_token_id=0)
        assert batched.token_ids == single.token_ids
    assert [len(t) for t in single.token_ids] == [r.output_len for r in requests]


def test_one_at_a_time_latencies_accumulate(tiny_hf):
    single = run_hf_generate(tiny_hf, tiny_requests(), 1, pad_token_id=0)
    assert single.completion_seconds == sorted(single.completion_seconds)
    assert single.completion_seconds[-1] <= single.seconds
    assert single.settings == {"batch_size": 1}


def test_static_batch_latency_is_batch_end(tiny_hf):
    batched = run_hf_generate(tiny_hf, tiny_requests(), 2, pad_token_id=0)
    times = batched.completion_seconds
    assert times[0] == times[1]
    assert times[2] == times[3]
    assert times[1] < times[2] < times[4]


def test_kv_accounting_of_generate(tiny_hf):
    requests = [BenchRequest((1, 2, 3), 2), BenchRequest((4,), 3)]
    single = run_hf_generate(tiny_hf, requests, 1, pad_token_id=0)
    assert single.kv_live_slots == single.kv_reserved_slots == (3 + 4) + (1 + 2 + 3)
    assert single.peak_kv_slots == 4
    batched = run_hf_generate(tiny_hf, requests, 2, pad_token_id=0)
    # Width 3, 3 steps: reserved 2*3 + 2*4 + 2*5; live (3 + 1) + (4 + 2) + (0 + 3).
    assert batched.kv_reserved_slots == 24
    assert batched.kv_live_slots == 13
    assert batched.peak_kv_slots == 2 * (3 + 3 - 1)


@pytest.mark.parametrize("batch_size", [0, -1, True, 1.5])
def test_generate_rejects_bad_batch_size(tiny_hf, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        run_hf_generate(tiny_hf, tiny_requests(), batch_size, pad_token_id=0)


# The batched decode backend, on the tiny model.

def ours_from_hf(hf_model) -> CausalLM:
    config = ModelConfig.from_dict(hf_model.config.to_dict())
    with torch.device("meta"):
        model = CausalLM(config)
    load_weights(model, dict(hf_model.state_dict()), dtype=torch.float32, device="cpu")
    model.inv_freq = rope_inverse_frequencies(config)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_lm(tiny_hf):
    model = ours_from_hf(tiny_hf)
    return LoadedModel(model, None, model.config, frozenset(), None)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_batched_decode_logits_match_per_sequence(tiny_lm, block_size):
    model, config = tiny_lm.model, tiny_lm.config
    fast = with_batched_decode(tiny_lm).model
    prompts = [[5, 6, 7, 8, 9], [1, 2], [30, 31, 32, 33, 34, 35, 36, 37, 38], [40, 41, 42]]
    manager = BlockManager(64, block_size)
    pool = PagedKVCache(config, 64, block_size)
    for index, prompt in enumerate(prompts[:3]):
        manager.allocate(index, len(prompt))
        run_paged_step(model, pool, build_step_metadata(manager, [(index, len(prompt))]), torch.tensor(prompt))
        manager.append_slots(index, 1)
    manager.allocate(3, len(prompts[3]))
    # Decodes of very different context lengths around a prefill: rows 0, 1, then the prefill, then row 2.
    metadata = build_step_metadata(manager, [(0, 1), (1, 1), (3, 3), (2, 1)])
    input_ids = torch.tensor([11, 12] + prompts[3] + [13])
    expected = run_paged_step(model, pool, metadata, input_ids)
    backend = BatchedDecodeAttention(pool, metadata)
    assert backend.decodes == [0, 1, 3]
    assert backend.prefills == [2]
    assert tuple(backend.decode_mask.shape) == (3, 1, 1, backend.decode_tables.shape[1] * block_size)
    assert backend.decode_mask.sum().item() == 6 + 3 + 10
    assert torch.allclose(run_paged_step(fast, pool, metadata, input_ids), expected, atol=TOLERANCE)


def test_batched_decode_model_shares_weights(tiny_lm):
    fast = with_batched_decode(tiny_lm)
    assert isinstance(fast.model, BatchedDecodeCausalLM)
    for (name, a), (_, b) in zip(tiny_lm.model.state_dict().items(), fast.model.state_dict().items()):
        assert a.data_ptr() == b.data_ptr(), name
    assert fast.model.lm_head.weight is fast.model.model.embed_tokens.weight


def test_other_backends_pass_through(tiny_lm):
    fast = with_batched_decode(tiny_lm).model
    ids = torch.tensor([[3, 4, 5]])
    positions = torch.arange(3)[None]
    from nanovllm_lib.model import CausalAttention

    assert torch.equal(fast(ids, positions, CausalAttention()), tiny_lm.model(ids, positions, CausalAttention()))


# The engine and the API runner, on the real model.

@pytest.fixture(scope="module")
def real_requests(lm):
    return make_bench_requests(5, seed=1, vocab_size=lm.config.vocab_size, excluded_token_ids=lm.tokenizer.all_special_ids,
                               prompt_median=10, output_median=8, max_output_len=12)


def test_engine_equals_generate(lm, hf_model, real_requests):
    pad = lm.tokenizer.pad_token_id
    reference = run_hf_generate(hf_model, real_requests, 1, pad)
    engine = run_engine(lm, real_requests, num_blocks=32, block_size=4, max_num_seqs=3)
    fast = run_engine(with_batched_decode(lm), real_requests, num_blocks=32, block_size=4, max_num_seqs=3)
    assert engine.token_ids == reference.token_ids
    assert fast.token_ids == reference.token_ids
    assert engine.settings["max_num_seqs"] == 3
    assert max(engine.completion_seconds) <= engine.seconds
    assert 0 < engine.kv_utilisation <= 1
    assert engine.peak_kv_slots <= 32 * 4


def test_llm_api_runner_equals_engine(lm, real_requests):
    from nanovllm_lib.llm import LLM

    engine = run_engine(lm, real_requests, num_blocks=64, block_size=16)
    api = run_llm_api(LLM(num_kv_blocks=64), real_requests, SamplingParams, "api")
    assert api.token_ids == engine.token_ids
    assert api.completion_seconds == [api.seconds] * len(real_requests)


def test_benchmark_writes_report(lm, hf_model, tmp_path):
    config = BenchConfig(num_requests=3, prompt_median=6, output_median=4, max_output_len=6, static_batch_sizes=(3,),
                         kv_cache_mib=8, max_num_seqs=4)
    results = run_benchmark(config, lm, hf_model, log=lambda line: None)
    assert [r.settings.get("batch_size") for r in results] == [1, 3, None, None]
    assert all(r.token_ids == results[0].token_ids for r in results)
    paths = write_report(results, config, tmp_path / "bench")
    assert [p.name for p in paths] == ["results.md", "results.csv", "bench.png"]
    with paths[1].open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["same tokens"] for row in rows] == ["3/3"] * 4
    assert "3 requests (seed 0" in paths[0].read_text(encoding="utf-8")
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
