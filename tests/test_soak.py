"""Soak: seeded random workloads through a cramped Engine (few KV blocks, a small token budget, fewer adapter
slots and CPU cache entries than adapters, overlapped steps, requests arriving over time, random aborts,
prompts that share prefixes for the prefix cache). Every request that is not aborted must get exactly the
tokens, text and finish reason it gets alone on an engine with room to spare and no cache, and the engine's
bookkeeping must hold after every step."""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from punica import Engine, SamplingParams
from punica.engine.request import RequestOutput, Sequence, Status

MAX_LEN = 40  # max_model_len of both engines: some requests stop at it
VOCAB = 128
ADAPTERS = (None, "a4", "b8", "c16", "d8")
PHASES = (None, "queued", "prefill", "decode", "preempted", "later")  # when a request is aborted


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    lora: str | None
    arrive: int  # the step before which it is added
    abort_in: str | None  # one of PHASES
    abort_after: int  # for "later": steps after arriving


def random_params(rng: random.Random, extra: random.Random) -> SamplingParams:
    sampling = {} if rng.random() < 0.5 else dict(
        temperature=rng.choice([0.7, 1.0, 1.5]), top_k=rng.choice([0, 5, 40]), top_p=rng.choice([1.0, 0.9, 0.5]),
        seed=rng.randrange(2 ** 32))
    if extra.random() < 0.2:
        sampling["min_p"] = extra.choice([0.05, 0.3])
    if extra.random() < 0.2:
        sampling["repetition_penalty"] = extra.choice([0.8, 1.3])
    return SamplingParams(
        max_tokens=rng.randint(1, 16), temperature=sampling.pop("temperature", 0.0), **sampling,
        ignore_eos=rng.random() < 0.7,
        stop_token_ids=rng.sample(range(3, VOCAB), 6) if rng.random() < 0.3 else None,
        stop=[f" w{rng.randrange(10, VOCAB)}"] if rng.random() < 0.15 else None)


def random_jobs(rng: random.Random, n: int, extra: random.Random) -> list[Job]:
    """`extra` draws what later features added (shared prefixes, min_p, repetition penalties), so that `rng`
    draws each seed's workload as before them."""
    jobs, arrive = [], 0
    shared = [[1] + [extra.randrange(3, VOCAB) for _ in range(extra.randint(6, 24))] for _ in range(2)]
    for _ in range(n):
        arrive += rng.choice([0, 0, 1, 3, 8])
        length = rng.choice([rng.randint(1, 6), rng.randint(7, 20), rng.randint(21, MAX_LEN - 2)])
        prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(length - 1)]
        if extra.random() < 0.4:  # starts like others (a system prompt), its length unchanged
            prefix = extra.choice(shared)[:len(prompt) - 1]
            prompt = prefix + prompt[len(prefix):]
        abort_in = rng.choices(PHASES, weights=[10, 1, 1, 1, 1, 1])[0]
        jobs.append(Job(prompt, random_params(rng, extra), rng.choice(ADAPTERS), arrive, abort_in,
                        rng.randint(0, 20)))
    return jobs


def cramped_engine(path: str, adapters: dict[str, str], rng: random.Random, caching: bool) -> Engine:
    """KV for about one full-length sequence, prefills chunked, adapters evicted from slots and CPU cache."""
    block_size = rng.choice([2, 4])
    budget = rng.choice([4, 6, 8, 16])
    max_loras = rng.choice([1, 2, 3])
    return Engine.from_args(path, adapters, device="cpu", dtype="float32", backend="torch", max_model_len=MAX_LEN,
                            block_size=block_size, num_blocks=MAX_LEN // block_size + rng.randint(0, 4),
                            max_num_batched_tokens=budget, max_num_seqs=rng.randint(2, min(budget, 6)),
                            max_loras=max_loras, max_cpu_loras=max_loras,
                            enable_prefix_caching=caching)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny matmuls run fastest on one thread, and two threads crawl while another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(llama_with_tokenizer):
    path, adapters = llama_with_tokenizer
    engine = Engine.from_args(path, adapters, device="cpu", dtype="float32", backend="torch", max_model_len=MAX_LEN,
                              enable_prefix_caching=False)
    yield engine
    engine.adapters.close()


def alone(engine: Engine, job: Job) -> RequestOutput:
    *_, last = engine.stream(job.prompt, job.params, lora=job.lora)
    assert last.finished
    return last


def in_phase(seq: Sequence, phase: str | None) -> bool:
    if phase == "prefill":
        return seq.status is Status.RUNNING and 0 < seq.num_computed < len(seq.prompt_ids)
    if phase == "decode":  # a token known, the next one in flight
        return seq.status is Status.RUNNING and bool(seq.output_ids) and seq.num_pending > 0
    if phase == "preempted":
        return seq.status is Status.WAITING and seq.num_preemptions > 0
    return False


def check_bookkeeping(engine: Engine) -> None:
    """Running sequences' blocks are all the used ones, each referenced once per table that holds it (only
    prefix-cached blocks are in more than one); waiting ones own none; every running adapter request pins its
    slot once; nothing else is pinned."""
    sched, slots, blocks = engine.scheduler, engine.adapters.slots, engine.blocks
    held = Counter(b for s in sched.running for b in s.block_table)
    assert len(held) == blocks.num_used and all(blocks._refs[b] == n for b, n in held.items())
    assert all(b in blocks._key_of for b, n in held.items() if n > 1)
    assert all(not s.block_table and s.status is Status.WAITING for s in sched.waiting)
    assert all(s.status is Status.RUNNING for s in sched.running)
    assert len(sched.running) <= engine.config.scheduler.max_num_seqs
    pins: dict[str, int] = {}
    for s in sched.running:
        if s.lora is not None:
            pins[s.lora_key] = pins.get(s.lora_key, 0) + 1
            assert slots.slot_of(s.lora_key) == s.slot
    assert {key: slots.pins(key) for key in slots.resident()} == {key: pins.get(key, 0) for key in slots.resident()}
    assert set(pins) <= set(slots.resident())


def run_workload(engine: Engine, jobs: list[Job], rng: random.Random):
    """Drive `engine` through `jobs`; returns (request ids, every output by id, ids aborted while unfinished)."""
    rids: list[str] = []
    outputs: dict[str, list[RequestOutput]] = {}
    aborted: set[str] = set()
    live: dict[str, Job] = {}
    step = 0
    while len(rids) < len(jobs) or engine.has_unfinished():
        while len(rids) < len(jobs) and jobs[len(rids)].arrive <= step:
            job = jobs[len(rids)]
            rid = engine.add_request(job.prompt, job.params, job.lora)
            rids.append(rid)
            live[rid] = job
            if job.abort_in == "queued":
                assert engine.abort(rid)
                aborted.add(rid)
                del live[rid]
        for out in engine.sync() if rng.random() < 0.05 else engine.step():
            assert out.request_id in live, f"{out.request_id} reported after it finished or was aborted"
            outputs.setdefault(out.request_id, []).append(out)
            if out.finished:
                del live[out.request_id]
        seqs = {s.request_id: s for s in [*engine.scheduler.running, *engine.scheduler.waiting]}
        assert set(seqs) == set(live), "a request was lost, or one that finished is still queued"
        for rid, job in list(live.items()):
            late = job.abort_in == "later" and step >= job.arrive + job.abort_after
            if late or in_phase(seqs[rid], job.abort_in):
                assert engine.abort(rid)
                aborted.add(rid)
                del live[rid]
        check_bookkeeping(engine)
        if not engine.num_running:  # waiting for an adapter read: let the reader thread run
            time.sleep(0.001)
        step += 1
        assert step < 20000, f"no progress: {len(live)} requests stuck"
    return rids, outputs, aborted


def check_finish(job: Job, out: RequestOutput, eos: set[int]) -> None:
    """The finish reason fits the tokens: "length" at max_tokens or max_model_len, "stop" at a stop token or
    string, and no stop token before the last."""
    p, tokens = job.params, out.token_ids
    stops = set(p.stop_token_ids) | (set() if p.ignore_eos else eos)
    assert 0 < len(tokens) <= p.max_tokens and not stops & set(tokens[:-1])
    if out.finish_reason == "length":
        assert len(tokens) == p.max_tokens or len(job.prompt) + len(tokens) == MAX_LEN
    else:
        assert out.finish_reason == "stop" and (tokens[-1] in stops or p.stop)


def check_outputs(jobs: list[Job], rids: list[str], outputs: dict[str, list[RequestOutput]], aborted: set[str],
                  expected: list[RequestOutput], eos: set[int]) -> None:
    """Each report extends the last by its new tokens; aborted requests never finish and saw only a prefix of
    their tokens; every other request finishes once, last, exactly as alone."""
    for job, rid, ref in zip(jobs, rids, expected):
        outs, tokens = outputs.get(rid, []), []
        for out in outs:
            assert out.token_ids == tokens + out.new_token_ids, rid
            tokens = out.token_ids
        if rid in aborted:
            assert not any(o.finished for o in outs) and ref.token_ids[:len(tokens)] == tokens, rid
            continue
        assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished, rid
        last = outs[-1]
        check_finish(job, last, eos)
        assert (last.token_ids, last.text, last.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason), rid


@pytest.mark.parametrize("seed", range(10))
def test_random_workload_matches_requests_run_alone(llama_with_tokenizer, reference, seed):
    """Preemption, chunked prefill, slot eviction, adapter re-reads, aborts, sync() and the prefix cache mixed
    at random change no surviving request's output; at the end every KV block is free and no adapter slot is pinned."""
    path, adapters = llama_with_tokenizer
    rng = random.Random(seed)
    extra = random.Random(1000 + seed)
    caching = seed % 4 != 3
    engine = cramped_engine(path, adapters, rng, caching)
    jobs = random_jobs(rng, 24, extra)
    try:
        rids, outputs, aborted = run_workload(engine, jobs, rng)
    finally:
        engine.adapters.close()
    check_outputs(jobs, rids, outputs, aborted, [alone(reference, job) for job in jobs], engine.eos_ids)
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert not any(engine.adapters.slots.pins(key) for key in engine.adapters.slots.resident())
    assert not engine.abort(rids[0]) and not engine.has_unfinished()
    assert engine.num_preemptions > 0 and engine.adapters.device_evictions > 0
    assert (engine.blocks.hit_tokens > 0) == caching  # shared prefixes were served from the cache
    # adapters are re-read from disk, about once a request (or a preemption), not over and over: read ahead,
    # then evicted from the CPU cache unused before their turn
    assert 0 < engine.adapters.cache.loads <= sum(job.lora is not None for job in jobs) + engine.num_preemptions


def test_adapter_reads_finishing_together_do_not_starve_the_head(llama_with_tokenizer):
    """With one slot and a CPU cache of one, three waiting requests for three adapters not in the cache: each
    adapter is read once, in turn. (Reading all three ahead let each finished read evict the one before it
    from the cache, the head's included, so the head waited for its adapter again and again.)"""
    path, adapters = llama_with_tokenizer
    engine = Engine.from_args(path, adapters, device="cpu", dtype="float32", backend="torch", max_loras=1,
                              max_cpu_loras=1)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    rids = [engine.add_request([1, 5, 6], params, lora) for lora in ("a4", "b8", "c16")]  # the cache holds d8
    finished = []
    try:
        for _ in range(200):
            finished += [o.request_id for o in engine.step() if o.finished]
            if not engine.has_unfinished():
                break
            time.sleep(0.01)  # the reads started by this step finish before the next one
    finally:
        engine.adapters.close()
    assert finished == rids and engine.adapters.cache.loads == 3
