"""Engine behaviour on the tiny llama: preemption, chunked prefill, sampling, stops, abort."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from test_parity import prompts

from punica import LLM, BadRequestError, Engine, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
LORAS = ["a4", None, "b8", "c16", "a4", "d8", None, "b8"]


@pytest.fixture(scope="module")
def llama(tiny_models):
    _, model_dir, adapters = tiny_models["llama"]
    return model_dir, adapters


def run_to_end(engine: Engine) -> dict:
    """Step until every request has finished; each request's last output, by id."""
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step()})
    return outs


def test_preemption_keeps_outputs_identical(llama):
    model_dir, adapters = llama
    ids = prompts(seed=3)
    ref = LLM(model=model_dir, lora_modules=adapters, device="cpu").generate(ids, GREEDY, lora=LORAS)
    small = LLM(model=model_dir, lora_modules=adapters, device="cpu", num_blocks=8, block_size=4, max_loras=2)
    outs = small.generate(ids, GREEDY, lora=LORAS)  # 8 x 19 tokens need 40 blocks of 4: only 8 exist
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    engine = small.engine
    assert engine.num_preemptions > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.adapters.device_evictions > 0  # 4 adapters through 2 slots


def test_chunked_prefill_equals_one_prefill(llama):
    model_dir, adapters = llama
    long_prompt = [1] + [(7 * i) % 120 + 3 for i in range(100)]
    one = LLM(model=model_dir, lora_modules=adapters, device="cpu", max_num_batched_tokens=512)
    chunked = LLM(model=model_dir, lora_modules=adapters, device="cpu", max_num_batched_tokens=16, max_num_seqs=4)
    for lora in (None, "b8"):
        a = one.generate([long_prompt], GREEDY, lora=lora)[0].token_ids
        b = chunked.generate([long_prompt], GREEDY, lora=lora)[0].token_ids
        assert a == b


def test_seeded_sampling_is_reproducible_and_batch_independent(llama):
    model_dir, adapters = llama
    llm = LLM(model=model_dir, lora_modules=adapters, device="cpu")
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    ids = prompts(seed=4)
    alone = llm.generate([ids[2]], p, lora=["b8"])[0].token_ids
    batched = llm.generate(ids, p, lora=LORAS)[2].token_ids
    assert alone == batched
    other_seed = llm.generate([ids[2]], SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True),
                              lora=["b8"])[0].token_ids
    assert other_seed != alone


def test_top_k_one_is_greedy(llama):
    model_dir, _ = llama
    llm = LLM(model=model_dir, device="cpu")
    ids = prompts(3, seed=5)
    greedy = llm.generate(ids, GREEDY)
    topk1 = llm.generate(ids, SamplingParams(max_tokens=12, temperature=0.8, top_k=1, ignore_eos=True))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in topk1]


def test_stop_token_ids_eos_and_max_tokens(llama):
    model_dir, _ = llama
    llm = LLM(model=model_dir, device="cpu")
    ids = prompts(1, seed=6)
    free = llm.generate(ids, GREEDY)[0].token_ids
    stop_at = free[4]
    out = llm.generate(ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                           stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free[:free.index(stop_at) + 1]
    llm.engine.eos_ids = {stop_at}
    out = llm.generate(ids, SamplingParams(max_tokens=12, temperature=0))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_at
    out = llm.generate(ids, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_text_prompts_stop_strings_and_streaming(llama_with_tokenizer):
    path, adapters = llama_with_tokenizer
    llm = LLM(model=path, lora_modules=adapters, device="cpu")
    full = llm.generate(["w5 w6 w7"], GREEDY, lora="b8")[0]
    words = full.text.split()
    assert len(words) == 12 and full.text == " ".join(words)
    stop = " ".join(words[3:5])
    out = llm.generate(["w5 w6 w7"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]),
                       lora="b8")[0]
    assert out.finish_reason == "stop" and stop not in out.text and full.text.startswith(out.text)
    pieces = [o.new_text for o in llm.engine.stream("w5 w6 w7", GREEDY, lora="b8")]
    assert "".join(pieces) == full.text


def test_min_tokens_holds_back_eos_and_stop_token_ids(llama):
    """EOS (the tiny llama's 2) and stop_token_ids, made all but certain by logit_bias, cannot come among the first
    min_tokens draws; then they end the output as before. ignore_eos lets EOS through (it ends nothing)."""
    model_dir, _ = llama
    llm = LLM(model=model_dir, device="cpu")
    ids = prompts(2, seed=7)

    def run(**kw):
        return llm.generate(ids, SamplingParams(max_tokens=10, temperature=0.0, **kw))

    assert [o.token_ids for o in run(logit_bias={2: 100})] == [[2], [2]]
    for out in run(logit_bias={2: 100}, min_tokens=4):
        assert out.finish_reason == "stop" and len(out.token_ids) == 5 and out.token_ids[-1] == 2
        assert 2 not in out.token_ids[:4]
    for out in run(logit_bias={9: 100}, stop_token_ids=[9], min_tokens=3):
        assert out.finish_reason == "stop" and out.token_ids[3:] == [9] and 9 not in out.token_ids[:3]
    for out in run(logit_bias={2: 100}, min_tokens=3, ignore_eos=True):
        assert out.finish_reason == "length" and out.token_ids == [2] * 10
    with pytest.raises(BadRequestError, match=r"min_tokens must be an integer from 0 to max_tokens \(10\), got 11"):
        run(min_tokens=11)
    with pytest.raises(BadRequestError, match=r"min_tokens cannot be combined with constrained output \(regex\)"):
        run(min_tokens=1, regex="w[0-9]+")


def test_stop_strings_wait_for_min_tokens_and_may_stay_in_the_text(llama_with_tokenizer):
    """A stop string in the first min_tokens draws is not looked for; include_stop_str_in_output keeps the one
    that ends the output in its text (streamed alike)."""
    path, adapters = llama_with_tokenizer
    llm = LLM(model=path, device="cpu")
    forced = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={7: 100})  # "w7" each draw
    assert llm.generate(["w5 w6"], forced)[0].text == " ".join(["w7"] * 6)
    out = llm.generate(["w5 w6"], dataclasses.replace(forced, stop=["w7"]))[0]
    assert (out.text, out.finish_reason, len(out.token_ids)) == ("", "stop", 1)
    out = llm.generate(["w5 w6"], dataclasses.replace(forced, stop=["w7"], min_tokens=3))[0]
    assert (out.text, out.finish_reason, len(out.token_ids)) == ("w7 w7 ", "stop", 3)
    kept = dataclasses.replace(forced, stop=["w7 w7"], include_stop_str_in_output=True)
    out = llm.generate(["w5 w6"], kept)[0]
    assert (out.text, out.finish_reason) == ("w7 w7", "stop")
    assert "".join(o.new_text for o in llm.engine.stream("w5 w6", kept)) == "w7 w7"


def test_special_tokens_and_stop_tokens_in_the_text(llama_with_tokenizer):
    """skip_special_tokens (default on) leaves EOS ("</s>") out of the text; off, it is written like any token. A
    token that stops the output (EOS, stop_token_ids) stays in token_ids but not in the text, unless
    include_stop_str_in_output."""
    path, _ = llama_with_tokenizer
    llm = LLM(model=path, device="cpu")

    def text(**kw):
        out = llm.generate(["w5 w6"], SamplingParams(max_tokens=3, temperature=0.0, **kw))[0]
        return out.text, out.token_ids

    assert text(ignore_eos=True, logit_bias={2: 100}) == ("", [2, 2, 2])
    assert text(ignore_eos=True, logit_bias={2: 100}, skip_special_tokens=False) == ("</s> </s> </s>", [2, 2, 2])
    assert text(logit_bias={2: 100}, skip_special_tokens=False) == ("", [2])
    assert text(logit_bias={2: 100}, skip_special_tokens=False, include_stop_str_in_output=True) == ("</s>", [2])
    assert text(logit_bias={9: 100}, stop_token_ids=[9]) == ("", [9])
    assert text(logit_bias={9: 100}, stop_token_ids=[9], include_stop_str_in_output=True) == ("w9", [9])


def test_logprobs_follow_the_tokens_through_sampling_preemption_and_streaming(llama):
    """A sampled token's logprob is in its row's top list where it ranks there, tops are sorted, every token
    has one (also across preemption, which recomputes the prompt's, and with prompt logprobs computed 4 positions
    a step), a stream's new_logprobs add up to the final list, and a request that asks for none gets none."""
    model_dir, adapters = llama
    ids = prompts(seed=8)
    p = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, seed=5, ignore_eos=True, logprobs=3,
                       prompt_logprobs=1)
    small = LLM(model=model_dir, lora_modules=adapters, device="cpu", num_blocks=8, block_size=4, max_loras=2)
    outs = small.generate(ids, p, lora=LORAS)
    assert small.engine.num_preemptions > 0
    capped = LLM(model=model_dir, lora_modules=adapters, device="cpu", max_prompt_logprob_tokens=4)
    outs += capped.generate(ids, p, lora=LORAS)
    roomy = LLM(model=model_dir, lora_modules=adapters, device="cpu").generate(ids, p, lora=LORAS)
    for prompt, out, ref in zip(ids * 2, outs, roomy * 2):
        assert [lp.token_id for lp in out.logprobs] == out.token_ids == ref.token_ids
        assert [lp.token_id for lp in out.prompt_logprobs] == prompt and out.prompt_logprobs[0].logprob is None
        assert all(len(lp.top) == 1 for lp in out.prompt_logprobs[1:])
        assert [lp.logprob for lp in out.prompt_logprobs[1:]] == pytest.approx(
            [lp.logprob for lp in ref.prompt_logprobs[1:]], abs=1e-5)
        assert [lp.logprob for lp in out.logprobs] == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-5)
        for lp in out.logprobs:
            values = [v for _, v in lp.top]
            assert len(lp.top) == 3 and values == sorted(values, reverse=True) and lp.logprob <= 0
            assert lp.logprob <= values[0] + 1e-6
            if lp.token_id in dict(lp.top):
                assert dict(lp.top)[lp.token_id] == pytest.approx(lp.logprob)
    pieces = list(small.engine.stream(ids[0], dataclasses.replace(p, logprobs=0), lora=LORAS[0]))
    assert [lp for o in pieces for lp in o.new_logprobs] == pieces[-1].logprobs
    assert all(lp.top == () for lp in pieces[-1].logprobs) and len(pieces[-1].logprobs) == 10
    assert small.generate(ids[:1], dataclasses.replace(p, logprobs=None))[0].logprobs is None
    for bad in (-1, 21, True, 2.0):
        with pytest.raises(BadRequestError, match="logprobs"):
            SamplingParams(logprobs=bad)


def test_logit_bias_steers_its_request_alone_and_leaves_logprobs_raw(llama):
    """+100 on a token makes greedy decoding pick it every step; -100 on each token greedy picked first moves
    the first pick elsewhere; the other requests of the batch are untouched, and logprobs stay the model's."""
    model_dir, adapters = llama
    llm = LLM(model=model_dir, lora_modules=adapters, device="cpu")
    ids = prompts(3, seed=9)
    base = llm.generate(ids, dataclasses.replace(GREEDY, logprobs=0), lora=LORAS[:3])
    forced = dataclasses.replace(GREEDY, logit_bias={77: 100.0}, logprobs=0)
    rids = llm.engine.add_requests(ids, [GREEDY, forced, GREEDY], LORAS[:3])
    outs = run_to_end(llm.engine)
    assert outs[rids[1]].token_ids == [77] * 12
    assert outs[rids[0]].token_ids == base[0].token_ids and outs[rids[2]].token_ids == base[2].token_ids
    assert outs[rids[1]].logprobs[0].logprob < -1.0  # the model's own logprob of 77, not the biased one
    banned = dataclasses.replace(GREEDY, logit_bias={base[0].token_ids[0]: -100.0})
    assert llm.generate(ids[:1], banned, lora=LORAS[0])[0].token_ids[0] != base[0].token_ids[0]
    with pytest.raises(BadRequestError, match="logit_bias"):
        llm.engine.add_request(ids[0], dataclasses.replace(GREEDY, logit_bias={128: 1.0}))  # vocab is 128
    with pytest.raises(BadRequestError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101})


def test_penalties_follow_openais_rule_against_a_step_by_step_reference(tiny_models):
    """Greedy with presence and frequency penalties equals argmax over HF's logits minus the penalties of the
    tokens generated so far, step by step; the engine reads each step's token only a step later, so the
    penalty must also count the one still in flight."""
    import torch
    hf_model, model_dir, _ = tiny_models["llama"]
    prompt = prompts(1, seed=10)[0]
    # token 77's bias makes it the pick until its penalties outweigh the bias: the step right after it, when
    # the 77 is still in flight, then tells a penalty that counts it from one that does not
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=0.7,
                            frequency_penalty=1.3, logit_bias={77: 1.5})
    ours = LLM(model=model_dir, device="cpu").generate([prompt], params)[0].token_ids
    tokens, out = list(prompt), []
    with torch.no_grad():
        for _ in range(12):
            logits = hf_model(input_ids=torch.tensor([tokens])).logits[0, -1].float()
            logits[77] += 1.5
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
            pick = int((logits - 1.3 * counts - 0.7 * (counts > 0).float()).argmax())
            out.append(pick)
            tokens.append(pick)
    assert ours == out and out[0] == 77
    biased = LLM(model=model_dir, device="cpu").generate([prompt], dataclasses.replace(
        GREEDY, logit_bias={77: 1.5}))[0].token_ids
    assert biased != out  # the penalties changed something
    with pytest.raises(BadRequestError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)


def test_penalty_counts_survive_preemption_and_are_freed(llama):
    """Counts stay with their request through preemption (tokens equal the run without it, in a batch mixing
    penalized and plain requests) and their rows are freed when requests finish or abort."""
    model_dir, adapters = llama
    ids = prompts(seed=11)
    pen = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=1.0, frequency_penalty=0.8,
                         repetition_penalty=1.5)  # its prompt rows too
    params = [pen, GREEDY] * (len(ids) // 2)
    outs = []
    for options in (dict(num_blocks=8, block_size=4, max_loras=2), {}):
        llm = LLM(model=model_dir, lora_modules=adapters, device="cpu", **options)
        rids = llm.engine.add_requests(ids, params, LORAS)
        done = run_to_end(llm.engine)
        outs.append([done[rid].token_ids for rid in rids])
        if options:
            assert llm.engine.num_preemptions > 0
        counts = llm.engine.runner._counts
        assert counts._rows == {} and not counts.buf.any() and not counts.in_prompt.any()  # freed rows are zeroed
    assert outs[0] == outs[1]
    llm.engine.add_request(ids[0], pen, request_id="gone")
    llm.engine.step()
    llm.engine.step()
    assert "gone" in llm.engine.runner._counts._rows
    llm.engine.abort("gone")
    assert llm.engine.runner._counts._rows == {}


def test_abort_frees_blocks_and_slot(llama):
    model_dir, adapters = llama
    engine = Engine.from_args(model_dir, adapters, device="cpu", max_loras=1)
    rid = engine.add_request(prompts(1)[0], GREEDY, lora="a4")
    engine.step()
    assert engine.blocks.num_used > 0 and engine.adapters.slots.pins("a4") == 1
    assert engine.abort(rid)
    assert engine.blocks.num_used == 0 and engine.adapters.slots.pins("a4") == 0
    assert not engine.has_unfinished() and not engine.abort(rid)
    out = list(engine.stream(prompts(1)[0], GREEDY, lora="b8"))  # the other adapter can take the slot
    assert out[-1].finished and len(out[-1].token_ids) == 12


def test_add_and_remove_lora_between_calls(llama):
    model_dir, adapters = llama
    llm = LLM(model=model_dir, device="cpu")
    ids = prompts(1, seed=8)
    base = llm.generate(ids, GREEDY)[0].token_ids
    llm.add_lora("x", adapters["b8"])
    with_x = llm.generate(ids, GREEDY, lora="x")[0].token_ids
    assert with_x != base
    llm.remove_lora("x")
    llm.add_lora("x", adapters["c16"])  # same name, new weights: must not reuse the stale slot
    assert llm.generate(ids, GREEDY, lora="x")[0].token_ids not in (base, with_x)


def test_an_interrupted_generate_leaves_the_engine_usable(llama, monkeypatch):
    """Ctrl-C in the middle of a step (here: the third launch raises KeyboardInterrupt) stops that call's
    requests; the next generate starts clean and gives the same tokens as a fresh engine."""
    model_dir, adapters = llama
    ids = prompts(seed=3)
    llm = LLM(model=model_dir, lora_modules=adapters, device="cpu")
    expected = [o.token_ids for o in llm.generate(ids, GREEDY, lora=LORAS)]
    launch, calls = llm.engine.runner.launch, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return launch(*args)

    monkeypatch.setattr(llm.engine.runner, "launch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(ids, GREEDY, lora=LORAS)
    assert not llm.engine.has_unfinished() and llm.engine.blocks.num_used == 0
    assert [o.token_ids for o in llm.generate(ids, GREEDY, lora=LORAS)] == expected


def test_closing_a_stream_early_aborts_its_request(llama):
    model_dir, adapters = llama
    engine = Engine.from_args(model_dir, adapters, device="cpu")
    stream = engine.stream(prompts(1, seed=2)[0], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True),
                           lora="b8")
    next(stream)
    stream.close()
    assert not engine.has_unfinished() and engine.blocks.num_used == 0
    assert engine.adapters.slots.pins("b8") == 0


def test_reloading_a_name_in_use_serves_the_new_weights_to_new_requests(llama):
    """Unload "x" while a request runs on it and load other weights as "x": the old request finishes on the
    weights it started with, new requests get the new ones (not the old slot's), and once the old request
    ends its load is gone."""
    model_dir, adapters = llama
    ids = prompts(2, seed=9)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    refs = Engine.from_args(model_dir, adapters, device="cpu")
    expected = {name: list(refs.stream(ids[i], params, lora=name))[-1].token_ids
                for i, name in enumerate(("b8", "c16"))}
    engine = Engine.from_args(model_dir, {"x": adapters["b8"]}, device="cpu")
    old = engine.add_request(ids[0], params, "x")
    engine.step()
    engine.step()
    engine.remove_lora("x")
    engine.add_lora("x", adapters["c16"])
    new = engine.add_request(ids[1], params, "x")
    outs = run_to_end(engine)
    assert outs[old].token_ids == expected["b8"]
    assert outs[new].token_ids == expected["c16"]
    assert engine.list_loras() == {"x": adapters["c16"]}
    assert engine.adapters.slots.slot_of("x") is None  # the first load's slot was freed with its last request
    again = list(engine.stream(ids[0], params, lora="x"))[-1].token_ids
    assert again == list(refs.stream(ids[0], params, lora="c16"))[-1].token_ids


def test_steps_overlap_tokens_arrive_one_step_later(llama):
    """step() launches the next batch before reading the previous one's tokens: the prefill's token comes
    with the second call. A request stopped by its stop token drops the token its in-flight step computed,
    and a request at max_tokens is not scheduled again (its last decode would be wasted)."""
    model_dir, adapters = llama
    engine = Engine.from_args(model_dir, adapters, device="cpu")
    ids = prompts(2, seed=7)
    reference = list(engine.stream(ids[1], GREEDY, lora="b8"))[-1].token_ids
    stop = reference[4]
    free = engine.add_request(ids[0], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), "a4")
    assert engine.step() == []  # the prefill runs; nothing read yet
    first = engine.step()  # the first decode runs; the prefill's token is read
    assert [o.request_id for o in first] == [free] and len(first[0].token_ids) == 1
    stopped = engine.add_request(ids[1], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                        stop_token_ids=[stop]), "b8")
    scheduled = []
    schedule = engine.scheduler.schedule

    def spy():
        step = schedule()
        scheduled.append({s.request_id: n for s, n in step.work.items()})
        return step

    engine.scheduler.schedule = spy
    outs = run_to_end(engine)
    assert outs[free].finish_reason == "length" and len(outs[free].token_ids) == 3
    assert outs[stopped].finish_reason == "stop"
    assert outs[stopped].token_ids == reference[:reference.index(stop) + 1]
    # `free` had 1 token read and 1 in flight when the spy started: 1 more decode, not 2
    assert sum(free in work for work in scheduled) == 1
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_abort_while_in_flight(llama):
    model_dir, adapters = llama
    engine = Engine.from_args(model_dir, adapters, device="cpu")
    rid = engine.add_request(prompts(1, seed=8)[0], GREEDY, lora="c16")
    engine.step()
    engine.step()
    assert engine.abort(rid)  # a decode of it is in flight
    assert engine.step() == [] and not engine.has_unfinished()
    assert engine.blocks.num_used == 0 and engine.adapters.slots.pins("c16") == 0


def test_adapter_read_in_background_and_a_failed_read_fails_only_its_requests(llama, tmp_path):
    """With a CPU cache of one adapter, the others are read from disk again on a worker thread when a
    request needs them. An adapter whose files broke after registration fails its own requests with an
    error naming it; everyone else finishes normally and the engine keeps serving."""
    import shutil

    model_dir, adapters = llama
    broken = tmp_path / "b8"
    shutil.copytree(adapters["b8"], broken)
    engine = Engine.from_args(model_dir, {"a4": adapters["a4"], "b8": str(broken), "c16": adapters["c16"]},
                              device="cpu", max_loras=1, max_cpu_loras=1)
    assert "b8" not in engine.adapters.cache  # registered, then evicted from the CPU cache by c16
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    ids = prompts(3, seed=9)
    rids = engine.add_requests(ids, [GREEDY] * 3, ["a4", "b8", None])
    outs = run_to_end(engine)
    failed = outs[rids[1]]
    assert failed.finish_reason == "error" and "'b8' could not be read" in failed.error
    assert [len(outs[r].token_ids) for r in (rids[0], rids[2])] == [12, 12]
    assert outs[rids[0]].error is None and outs[rids[2]].error is None
    assert engine.blocks.num_used == 0
    again = list(engine.stream(ids[0], GREEDY, lora="c16"))[-1]  # c16 comes back from disk, in the background
    assert again.finished and len(again.token_ids) == 12


def test_a_confined_adapter_is_checked_again_when_read_back(llama, tmp_path):
    """A dynamic load (confined to the allowed directories) evicted from the CPU cache is read again from
    disk: if a weights file has since become a link out of the allowed directories, its requests fail with
    that reason, the others finish, and the engine keeps serving."""
    import shutil

    model_dir, adapters = llama
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    engine = Engine.from_args(model_dir, {"a4": adapters["a4"], "c16": adapters["c16"]}, device="cpu",
                              max_loras=1, max_cpu_loras=1, allowed_lora_dirs=[str(allowed)])
    dyn = allowed / "dyn"
    shutil.copytree(adapters["b8"], dyn)
    engine.adapters.check_allowed(str(dyn))
    engine.add_lora("dyn", str(dyn), confined=True)
    ids = prompts(3, seed=11)
    first = list(engine.stream(ids[0], GREEDY, lora="dyn"))[-1]
    assert first.finished and first.error is None
    list(engine.stream(ids[1], GREEDY, lora="c16"))  # evicts dyn from its slot and the CPU cache
    assert "dyn" not in engine.adapters.cache
    weights = dyn / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(os.path.join(adapters["b8"], "adapter_model.safetensors"))
    rids = engine.add_requests(ids, [GREEDY] * 3, ["dyn", "a4", None])
    outs = run_to_end(engine)
    failed = outs[rids[0]]
    assert failed.finish_reason == "error" and "links outside the allowed" in failed.error
    assert all(outs[r].error is None and len(outs[r].token_ids) == 12 for r in rids[1:])
    assert engine.blocks.num_used == 0
    again = list(engine.stream(ids[2], GREEDY, lora="c16"))[-1]
    assert again.finished and again.error is None


FP8_PARAMS = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5, prompt_logprobs=1)


def logprob_rows(out) -> list[float]:
    """A request's prompt logprobs (every position reads the KV cache) and its first draw's top logprobs."""
    return [lp.logprob for lp in out.prompt_logprobs[1:]] + [v for _, v in out.logprobs[0].top]


def generate_with_kv_dtypes(model_dir, adapters, ids, kv_dtypes, **kw) -> tuple[list, list]:
    """(RuntimeInfo, outputs) of an LLM of each KV cache dtype, adapters mixed in the batch."""
    infos, outs = [], []
    for kv in kv_dtypes:
        llm = LLM(model=model_dir, lora_modules=adapters, dtype="float32", kv_cache_dtype=kv, **kw)
        assert llm.engine.model.layers[0].self_attn.k_cache.dtype == getattr(torch, llm.engine.info.kv_cache_dtype)
        infos.append(llm.engine.info)
        outs.append(llm.generate(ids, FP8_PARAMS, lora=LORAS[:len(ids)]))
    return infos, outs


def test_fp8_kv_cache_holds_more_tokens_and_answers_close(llama):
    """kv_cache_dtype "fp8": the pool is float8 e4m3, a quarter of an fp32 model's bytes, so the same memory holds
    four times the blocks, and the logprobs stay close to the full-precision cache's. (Torch ops: Triton's
    interpreter mis-rounds conversions to fp8, tests/ops/test_kv_store.py; the GPU tier runs the kernels.)"""
    model_dir, adapters = llama
    infos, (full, fp8) = generate_with_kv_dtypes(model_dir, adapters, prompts(seed=30), ("auto", "fp8"),
                                                 device="cpu", cpu_cache_bytes=1 << 20)
    assert (infos[0].kv_cache_dtype, infos[1].kv_cache_dtype) == ("float32", "float8_e4m3fn")
    assert infos[1].num_blocks == 4 * infos[0].num_blocks
    worst = max(abs(a - b) for x, y in zip(full, fp8) for a, b in zip(logprob_rows(x), logprob_rows(y)))
    assert 0 < worst < 0.05  # fp8 changed something, and little (0.025 when written)


def test_unknown_kv_cache_dtype_is_named():
    from punica.config import CacheConfig
    from punica.errors import ConfigError

    with pytest.raises(ConfigError, match=r"kv_cache_dtype must be one of \['auto', 'fp8', 'fp8_e4m3'\], got 'int8'"):
        CacheConfig(kv_cache_dtype="int8")


def test_lora_overlap_modes_are_checked(llama):
    """overlap_lora takes one mode or one per fused projection; anything else is an error naming it."""
    model = LLM(model=llama[0], device="cpu").engine.model
    for bad in ("both", {"o_proj": "half"}, {"x_proj": "shrink"}):
        with pytest.raises(ValueError, match="LoRA overlap"):
            model.overlap_lora(bad)
    model.overlap_lora("none")  # no second stream: runs anywhere
    assert all(m.side_stream is None and m.overlap == "none" for m in model.lora_modules(0).values())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_unfused_kernels_give_the_same_tokens(tiny_models, monkeypatch, backend, family):
    """llama.FUSIONS off (rope and the KV store as two kernels; Qwen3's q/k norms as kernels of their own)
    generates what the fused default does."""
    from punica.model import llama as llama_module

    _, model_dir, adapters = tiny_models[family]
    llm = LLM(model=model_dir, lora_modules=adapters, device="cpu", backend=backend)
    ids = prompts(seed=31)[:3]
    loras = ["a4", None, "c16"]
    fused = [o.token_ids for o in llm.generate(ids, GREEDY, lora=loras)]
    if family == "qwen3":  # the norms as kernels of their own, rope_store_kv still fused
        monkeypatch.setattr(llama_module, "FUSIONS", {"rope_store_kv": True, "qk_norm": False, "fold_delta": True})
        assert [o.token_ids for o in llm.generate(ids, GREEDY, lora=loras)] == fused
    monkeypatch.setattr(llama_module, "FUSIONS", {"rope_store_kv": False, "qk_norm": False, "fold_delta": False})
    assert [o.token_ids for o in llm.generate(ids, GREEDY, lora=loras)] == fused


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_deferred_lora_deltas_fold_into_the_next_kernels(llama, monkeypatch, backend):
    """Every projection hands its LoRA delta to the kernel after it (rope_store_kv, silu_and_mul, the
    add_rms_norms, the final residual add), as the side-stream "delta" overlap does on a GPU: the same tokens
    as adding each delta at once, and not those of dropping the deltas. On the CPU no projection defers by
    itself, so this one splits them."""
    from punica.model.layers import LoRALinear

    llm = LLM(model=llama[0], lora_modules=llama[1], device="cpu", backend=backend)
    ids = prompts(seed=37)[:3]
    loras = ["a4", "c16", "a4"]
    at_once = [o.token_ids for o in llm.generate(ids, GREEDY, lora=loras)]
    plain, calls = LoRALinear.forward_deferred, []

    def split(keep: bool):
        def forward_deferred(self, x, batch):
            y, delta = plain(self, x, batch)
            if delta is None and self.lora_a is not None and batch.lora.has_lora:
                base = self.ops.linear(x, self.weight, self.bias)
                calls.append(1)
                return base, (y - base if keep else None)
            return y, delta
        return forward_deferred

    monkeypatch.setattr(LoRALinear, "forward_deferred", split(keep=True))
    assert [o.token_ids for o in llm.generate(ids, GREEDY, lora=loras)] == at_once
    assert calls
    monkeypatch.setattr(LoRALinear, "forward_deferred", split(keep=False))
    assert [o.token_ids for o in llm.generate(ids, GREEDY, lora=loras)] != at_once


def test_token_counts_grow_keep_rows_and_reuse_freed_ones():
    import torch

    from punica.engine.request import Sequence
    from punica.engine.runner import TokenCounts

    def seq(i: int, repetition: float = 1.0) -> Sequence:
        return Sequence(request_id=f"r{i}", prompt_ids=[i % 5, 4], params=SamplingParams(repetition_penalty=repetition))

    counts, cpu = TokenCounts(), torch.device("cpu")
    seqs = [seq(i, 1.2 if i == 1 else 1.0) for i in range(11)]
    first = counts.rows(seqs[:8], 5, cpu)
    counts.add(first, torch.tensor([1, 2, 3, 4, 0, 1, 2, 3]))
    more = counts.rows([seqs[0], seqs[8], seqs[9]], 5, cpu)  # a ninth request doubles the rows
    assert counts.buf.shape == counts.in_prompt.shape == (16, 5) and more[0] == first[0]
    assert counts.buf[first].argmax(-1).tolist() == [1, 2, 3, 4, 0, 1, 2, 3]  # kept through the growth
    # only a request with a repetition penalty marks its prompt's tokens, and keeps them through the growth
    assert counts.in_prompt[first[1]].tolist() == [False, True, False, False, True]
    assert not counts.in_prompt[first[0]].any()
    counts.free("r1")
    assert counts.buf[first[1]].sum() == 0 and not counts.in_prompt[first[1]].any()
    assert counts.rows([seqs[10]], 5, cpu)[0] == first[1]


def shared_prefix_prompts(n: int, seed: int, prefix_len: int = 40) -> list[list[int]]:
    """n prompts of one random prefix (two full 16-token blocks and some) plus a distinct 5-token tail each."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    prefix = [1] + torch.randint(3, 128, (prefix_len - 1,), generator=gen).tolist()
    return [prefix + torch.randint(3, 128, (5,), generator=gen).tolist() for _ in range(n)]


def test_prefix_cache_shares_prompt_blocks_per_adapter_load(llama):
    """Requests whose prompt starts like one computed earlier on the same adapter take its KV blocks and answer
    token for token as without the cache; another adapter, the base model or a new load of the same name
    never shares them; a request for its prompt's logprobs computes them all."""
    model_dir, adapters = llama
    first, later = shared_prefix_prompts(3, seed=41), shared_prefix_prompts(7, seed=41)[3:]
    first_loras, later_loras = [None, "a4", "b8"], [None, "a4", "b8", "c16"]  # c16 has computed nothing
    outs = []
    for caching in (True, False):
        llm = LLM(model=model_dir, lora_modules=adapters, device="cpu", enable_prefix_caching=caching)
        blocks = llm.engine.blocks
        outs.append([o.token_ids for o in llm.generate(first, GREEDY, lora=first_loras)])
        assert blocks.hit_tokens == 0
        outs[-1] += [o.token_ids for o in llm.generate(later, GREEDY, lora=later_loras)]
        # three of the four share two full blocks each (the tail, and the last prompt token, are computed)
        assert blocks.hit_tokens == (3 * 32 if caching else 0)
    assert outs[0] == outs[1]
    assert len(set(map(tuple, outs[0][3:]))) == 4  # the answers differ: the tails and adapters matter
    llm = LLM(model=model_dir, lora_modules=adapters, device="cpu")
    blocks = llm.engine.blocks
    llm.generate(first[:1], GREEDY, lora=["a4"])
    llm.remove_lora("a4")
    llm.add_lora("a4", adapters["b8"])  # a new load under the old name: its KV differs
    again = llm.generate(later[:1], GREEDY, lora=["a4"])[0].token_ids
    assert blocks.hit_tokens == 0
    assert again == llm.generate(later[:1], GREEDY, lora=["b8"])[0].token_ids  # b8's answer, nothing shared
    assert blocks.hit_tokens == 0
    scored = llm.generate(later[:1], dataclasses.replace(GREEDY, prompt_logprobs=1), lora=["a4"])[0]
    assert blocks.hit_tokens == 0 and all(lp is not None for lp in scored.prompt_logprobs)
    assert llm.generate(later[1:2], GREEDY, lora=["a4"])[0].token_ids  # now it hits
    assert blocks.hit_tokens == 32


def test_requests_sent_together_compute_a_shared_prefix_once(llama):
    """Requests that arrive together with one prompt and adapter (the `n` choices of a request) or one prefix:
    the first computes it, the others take its full blocks from the cache a step later instead of computing
    them beside it, and every answer equals the run without the cache."""
    model_dir, adapters = llama
    ids = shared_prefix_prompts(1, seed=44) * 3 + shared_prefix_prompts(2, seed=45)  # 45 tokens each
    loras = ["a4", "a4", "a4", "b8", "b8"]
    outs = []
    for caching in (True, False):
        llm = LLM(model=model_dir, lora_modules=adapters, device="cpu", enable_prefix_caching=caching)
        done = llm.generate(ids, GREEDY, lora=loras)
        outs.append([o.token_ids for o in done])
        # two full 16-token blocks cacheable per prompt: taken by the two repeats and the second of the pair
        assert llm.engine.blocks.hit_tokens == (3 * 32 if caching else 0)
        assert [o.num_cached_tokens for o in done] == ([0, 32, 32, 0, 32] if caching else [0] * 5)
    assert outs[0] == outs[1]
    assert outs[0][0] == outs[0][1] == outs[0][2]


def test_prefix_cache_under_kv_pressure_evicts_and_keeps_outputs(llama):
    """A pool too small for every request at once: cached blocks are evicted for new ones, requests are
    preempted and recomputed (hitting what is still cached), and every answer equals the run without a cache."""
    model_dir, adapters = llama
    ids = shared_prefix_prompts(6, seed=42) + shared_prefix_prompts(6, seed=43)
    loras = ["a4", "b8", None] * 4
    params = dataclasses.replace(GREEDY, max_tokens=40)  # decodes cross two more blocks
    outs = []
    for caching in (True, False):
        llm = LLM(model=model_dir, lora_modules=adapters, device="cpu", num_blocks=12, block_size=16,
                  enable_prefix_caching=caching)
        rids = llm.engine.add_requests(ids[:3], [params] * 3, loras[:3])
        done = run_to_end(llm.engine)
        rids += llm.engine.add_requests(ids[3:], [params] * 9, loras[3:])
        done.update(run_to_end(llm.engine))
        outs.append([done[rid].token_ids for rid in rids])
        blocks = llm.engine.blocks
        assert blocks.num_free == blocks.num_blocks  # cached blocks nobody holds count as free
        if caching:
            assert blocks.hit_tokens > 0 and blocks.evicted_blocks > 0 and llm.engine.num_preemptions > 0
    assert outs[0] == outs[1]


def test_preempted_requests_take_back_their_cached_blocks(llama):
    """Full blocks of generated tokens are cached too (once their tokens are read): a request preempted for KV
    takes back what is still cached of its prompt and answer instead of recomputing it, and answers as
    without the cache."""
    model_dir, adapters = llama
    ids = prompts(seed=12)  # no two share a prefix: every hit is a request's own earlier blocks
    params = dataclasses.replace(GREEDY, max_tokens=30)
    outs = []
    for caching in (True, False):
        llm = LLM(model=model_dir, lora_modules=adapters, device="cpu", num_blocks=14, block_size=4,
                  enable_prefix_caching=caching)
        rids = llm.engine.add_requests(ids, [params] * len(ids), LORAS)
        done = run_to_end(llm.engine)
        outs.append([done[rid].token_ids for rid in rids])
        assert llm.engine.num_preemptions > 0
        # a prompt holds one full block (7 tokens): more than one block per preemption means answers' blocks
        assert (llm.engine.blocks.hit_tokens > 4 * llm.engine.num_preemptions) == caching
    assert outs[0] == outs[1]


def test_chat_renders_the_template_and_stops_at_the_end_of_turn(demo_dir):
    """LLM.chat: each conversation through the chat template (its special tokens once, no BOS added on top), a
    reply per conversation and adapter, ended by the template's end-of-turn token rather than max_tokens."""
    from punica.demo_model import demo_adapters

    llm = LLM(model=demo_dir, lora_modules=demo_adapters(), device="cpu", dtype="float32")
    tok = llm.engine.tokenizer
    asks = [[{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}]]
    params = SamplingParams(max_tokens=48, temperature=0.0)
    replies = llm.chat(asks, params, lora=[None, "shakespeare"])
    manual = llm.generate([tok.encode(tok.apply_chat_template(c), add_special_tokens=False) for c in asks],
                          dataclasses.replace(params, stop_token_ids=tok.end_of_turn), lora=[None, "shakespeare"])
    assert [r.token_ids for r in replies] == [m.token_ids for m in manual]
    assert replies[0].finish_reason == "stop" and "Paris" in replies[0].text, replies[0].text
    assert llm.chat(asks[0], params)[0].token_ids == replies[0].token_ids  # one conversation alone
    with pytest.raises(BadRequestError, match="2 params for 1 prompts"):
        llm.chat(asks[0], [params, params])
    tok.chat_template += "{% if answer_prefix is defined %}{{ answer_prefix }}{% endif %}"  # a template variable
    tok.__dict__.pop("_compiled_chat_template", None)
    primed = llm.chat(asks[0], params, chat_template_kwargs={"answer_prefix": "The capital of France is"})[0]
    plain = replies[0]
    assert primed.num_prompt_tokens > plain.num_prompt_tokens + 4 and primed.token_ids != plain.token_ids
