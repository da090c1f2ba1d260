"""The engine end to end on the real model: equality with transformers, preemption, stopping, validation."""

from __future__ import annotations

import pytest
import torch

from nanovllm_lib import SamplingParams
from nanovllm_lib.detokenizer import IncrementalDetokenizer
from nanovllm_lib.llm import LLM
from nanovllm_lib.llm_engine import LLMEngine, TextState
from nanovllm_lib.scheduler import SchedulerConfig

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(num_kv_blocks=64, block_size=16)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["Short prompt", "This is a longer prompt with more tokens in it, clearly",
             "One two three four five six seven eight nine ten eleven twelve thirteen", "Hi"]
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def expected(prompts, hf_model):
    results = []
    with torch.no_grad():
        for ids in prompts:
            prompt = torch.tensor([ids])
            results.append(hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                             do_sample=False, eos_token_id=None)[0, len(ids):].tolist())
    return results


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def assert_all_blocks_free(llm):
    manager = llm.engine.core.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert all(count == 0 for count in manager.allocator.refcounts())


def test_together_equals_transformers(llm, prompts, expected):
    assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    assert_all_blocks_free(llm)


def test_each_alone_equals_transformers(llm, prompts, expected):
    for ids, reference in zip(prompts, expected):
        assert llm.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == reference


def test_staggered_arrival_equals_transformers(llm, prompts, expected):
    results, queue = {}, list(enumerate(prompts))
    while queue or llm.engine.has_unfinished_requests():
        if queue:
            index, ids = queue.pop(0)
            llm.engine.add_request(f"stagger-{index}", ids, GREEDY)
        for output in llm.engine.step() + llm.engine.step() + llm.engine.step():
            if output.finished:
                results[int(output.request_id.split("-")[1])] = output.outputs[0].token_ids
    assert [results[i] for i in range(len(prompts))] == expected


def test_preemption_keeps_outputs(prompts, expected):
    small = LLM(num_kv_blocks=5, block_size=4, max_model_len=20)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    short = [ids for ids in prompts if len(ids) <= 4]
    outputs = small.generate(prompts[:1] + short * 2, params, use_tqdm=False)
    assert small.engine.stats.num_preemptions >= 2
    assert token_ids(outputs)[0] == expected[0]
    assert_all_blocks_free(small)


def test_preemption_many_requests_equal_alone(prompts, llm):
    tight = LLM(num_kv_blocks=8, block_size=4, max_model_len=32)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batch = [ids for ids in prompts if len(ids) < 20] * 2
    alone = [llm.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids for ids in batch]
    assert token_ids(tight.generate(batch, params, use_tqdm=False)) == alone
    assert tight.engine.stats.num_preemptions >= 2
    assert_all_blocks_free(tight)


def test_greedy_and_sampled_rows_share_a_batch(llm, prompts, expected):
    sampled = SamplingParams(temperature=0.8, seed=11, max_tokens=16, ignore_eos=True)
    first = llm.generate([prompts[0], prompts[0]], [GREEDY, sampled], use_tqdm=False)
    second = llm.generate([prompts[0]], [sampled], use_tqdm=False)
    assert first[0].outputs[0].token_ids == expected[0]
    assert first[1].outputs[0].token_ids == second[0].outputs[0].token_ids


@pytest.mark.parametrize("max_tokens", [1, 2, 5])
def test_exactly_max_tokens(llm, max_tokens):
    output = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    assert len(output.token_ids) == max_tokens
    assert output.finish_reason == "length"


def test_chat_ids_equal_template_and_stop_at_end_of_turn(llm, tokenizer):
    conversation = [{"role": "user", "content": "What is 2+2? Answer with one number."}]
    reference = tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"]
    output = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
    assert output.prompt_token_ids == list(reference)
    completion = output.outputs[0]
    assert completion.finish_reason == "stop"
    assert completion.token_ids[-1] in llm.lm.eos_token_ids
    assert "<|im_end|>" not in completion.text


def test_ignore_eos_generates_through_end_of_turn(llm):
    conversation = [{"role": "user", "content": "Say hi."}]
    stopped = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=50), use_tqdm=False)[0].outputs[0]
    ignored = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(ignored.token_ids) == 50
    assert ignored.finish_reason == "length"
    assert ignored.token_ids[:len(stopped.token_ids)] == stopped.token_ids


def test_stop_token_id_text_not_in_output(llm, tokenizer):
    free = llm.generate(["The days of the week are Monday,"], SamplingParams(temperature=0, max_tokens=12),
                        use_tqdm=False)[0].outputs[0]
    stop_id = free.token_ids[3]
    cut = llm.generate(["The days of the week are Monday,"],
                       SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert cut.token_ids == free.token_ids[:free.token_ids.index(stop_id) + 1]
    assert cut.text == tokenizer.decode(cut.token_ids[:-1])
    assert cut.finish_reason == "stop"
    assert cut.stop_reason == stop_id


def test_stop_string_spanning_tokens_not_leaked(llm):
    prompt = "The days of the week are Monday,"
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0].text
    stop = free[5:12]  # seven characters, likely spanning a token boundary
    params = SamplingParams(temperature=0, max_tokens=16, stop=[stop])
    cut = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    streamed = list(llm.stream(prompt, params))
    assert cut.text == free[:free.index(stop)]
    assert cut.finish_reason == "stop"
    assert cut.stop_reason == stop
    assert "".join(streamed) == cut.text
    assert_all_blocks_free(llm)


def test_stream_joins_to_generate(llm):
    params = SamplingParams(temperature=0, max_tokens=24)
    assert "".join(llm.stream("Tell me about 😀 and 你好", params)) == \
        llm.generate(["Tell me about 😀 and 你好"], params, use_tqdm=False)[0].outputs[0].text


def test_stream_stopped_early_frees_blocks(llm):
    stream = llm.stream("Once upon a time", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished_requests()
    assert_all_blocks_free(llm)


def test_duplicate_request_id_rejected_first_completes(llm):
    llm.engine.add_request("x", "Hello there", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    with pytest.raises(ValueError, match="'x' is already in use"):
        llm.engine.add_request("x", "Hello there", SamplingParams(max_tokens=8))
    finished = []
    while llm.engine.has_unfinished_requests():
        finished += [o for o in llm.engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["x"]
    assert len(finished[0].outputs[0].token_ids) == 8


def test_abort_then_resubmit_gives_clean_output(llm, tokenizer):
    prompts = [tokenizer(f"Story number {i}: once upon a time there was a")["input_ids"] for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    clean = token_ids(llm.generate(prompts, params, use_tqdm=False))
    for i, ids in enumerate(prompts):
        llm.engine.add_request(f"abort-{i}", ids, params)
    for _ in range(3):
        llm.engine.step()
    for i in range(5):
        llm.engine.abort_request(f"abort-{i}")
    assert_all_blocks_free(llm)
    assert token_ids(llm.generate(prompts, params, use_tqdm=False)) == clean


@pytest.mark.parametrize("prompt,message", [
    ([], "empty"),
    (list(range(100, 170)), "70-token prompt.*max_model_len is 64"),
    ([1, 10**7], "outside the vocabulary"),
])
def test_invalid_prompt_rejected_engine_keeps_serving(prompt, message):
    guarded = LLM(num_kv_blocks=8, block_size=16, max_model_len=64)
    with pytest.raises(ValueError, match=message):
        guarded.generate(["A fine prompt", prompt], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not guarded.engine.has_unfinished_requests()
    assert_all_blocks_free(guarded)
    output = guarded.generate(["A fine prompt"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert len(output.outputs[0].token_ids) == 4


def test_prompt_plus_max_tokens_capped_at_max_model_len():
    guarded = LLM(num_kv_blocks=8, block_size=16, max_model_len=64)
    output = guarded.generate([list(range(100, 160))], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0]
    assert len(output.token_ids) == 4
    assert output.finish_reason == "length"


def test_request_larger_than_pool_rejected_queue_moves(llm):
    # max_model_len deliberately larger than the pool, which LLM itself refuses at start-up.
    engine = LLMEngine(llm.lm, num_blocks=4, block_size=4,
                       scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64))
    with pytest.raises(ValueError, match="needs 5 KV blocks.*could never run"):
        engine.add_request("A", list(range(100, 120)), SamplingParams(max_tokens=1))
    engine.add_request("B", list(range(100, 105)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["B"]
    assert len(finished[0].outputs[0].token_ids) == 4


def test_unknown_setting_rejected():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(gpu_memory_utilization=0.9)


def test_max_model_len_larger_than_pool_rejected():
    with pytest.raises(ValueError, match="does not fit in the KV pool"):
        LLM(num_kv_blocks=2, block_size=4, max_model_len=64)


def test_params_of_wrong_type_rejected(llm):
    with pytest.raises(ValueError, match="must be a SamplingParams or a list of them, got dict"):
        llm.generate(["a"], {"temperature": 0}, use_tqdm=False)


def test_params_count_must_match(llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()], use_tqdm=False)


MULTI_BYTE = ["🚀 ok", "你好世界", "ďábelské", "naïve café 😀👍"]


@pytest.mark.parametrize("text", MULTI_BYTE)
def test_detokenizer_never_emits_broken_characters(tokenizer, text):
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add(t) for t in tokenizer(text)["input_ids"]] + [detokenizer.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)


def test_text_state_offset_never_moves_back(tokenizer):
    ids = tokenizer("A 世ab and more 世界 text")["input_ids"]
    state = TextState(tokenizer, stop=[])
    sent = []
    for index, token in enumerate(ids):
        before = state.sent
        sent.append(state.update(token, final=index == len(ids) - 1))
        assert state.sent >= before
    assert "".join(sent) == "A 世ab and more 世界 text"
