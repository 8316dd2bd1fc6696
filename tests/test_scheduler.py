"""Scheduler unit tests on pure-Python state (no model)."""

from __future__ import annotations

from punica.config import SchedulerConfig
from punica.engine.request import SamplingParams, Sequence, Status
from punica.engine.scheduler import Scheduler
from punica.kv.block_manager import BlockManager


class FakeAdapters:
    """Slots as the AdapterManager keeps them; adapters in `on_disk` are not ready until `finish_read`."""

    def __init__(self, slots: int = 2):
        self.slots, self.pins, self.placed = slots, {}, []
        self.on_disk, self.reading, self.errors = set(), [], {}

    def ready(self, name):
        return name not in self.on_disk

    def prefetch(self, name):
        if name not in self.reading:
            self.reading.append(name)

    def read_error(self, name):
        return self.errors.pop(name, None)

    def finish_read(self, name, error=None):
        self.reading.remove(name)
        if error is None:
            self.on_disk.discard(name)
        else:
            self.errors[name] = error

    def can_acquire(self, name):
        return name in self.placed or len(self.placed) < self.slots or any(not self.pins.get(n) for n in self.placed)

    def acquire(self, name):
        if name not in self.placed:
            if len(self.placed) >= self.slots:
                self.placed.remove(next(n for n in self.placed if not self.pins.get(n)))
            self.placed.append(name)
        self.pins[name] = self.pins.get(name, 0) + 1
        return self.placed.index(name) + 1

    def release(self, name):
        self.pins[name] -= 1

    def is_active(self, name):
        return self.pins.get(name, 0) > 0


def seq(n_prompt: int, lora=None, rid=None) -> Sequence:
    return Sequence(request_id=rid or f"r{n_prompt}-{id(object())}", prompt_ids=list(range(n_prompt)),
                    params=SamplingParams(max_tokens=100), lora=lora)


def run_step(sched: Scheduler):
    """Pretend the model ran: commit computed tokens and append one token where a chunk finished."""
    step = sched.schedule()
    for s, n in step.work.items():
        s.num_computed += n
        if s.num_computed == len(s.tokens):
            s.tokens.append(7)
    return step


def test_decodes_first_then_chunked_prefill_under_budget():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16), BlockManager(64, 16), FakeAdapters())
    a = seq(5)
    sched.add(a)
    run_step(sched)  # a prefilled
    b = seq(40)
    sched.add(b)
    step = run_step(sched)
    assert step.work[a] == 1 and step.work[b] == 15  # decode of a first, then a chunk of b
    step = run_step(sched)
    assert step.work[a] == 1 and step.work[b] == 15
    step = run_step(sched)
    assert step.work[b] == 10 and b.num_computed == 40 and len(b.tokens) == 41


def test_preempts_newest_when_kv_runs_out_and_everyone_finishes():
    blocks = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), blocks, FakeAdapters())
    seqs = [seq(5, rid=f"s{i}") for i in range(4)]
    for s in seqs:
        sched.add(s)
    finished, preempted = set(), 0
    for _ in range(200):
        step = run_step(sched)
        preempted += len(step.preempted)
        assert blocks.num_free + blocks.num_used == blocks.num_blocks
        for s in list(sched.running):
            if len(s.output_ids) >= 10:
                sched.finish(s, "length")
                finished.add(s.request_id)
        if not sched.has_work():
            break
    assert finished == {s.request_id for s in seqs}
    assert preempted > 0
    assert all(len(s.output_ids) == 10 and s.status is Status.FINISHED for s in seqs)


def test_waiting_requests_are_served_in_order_and_none_starves():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64), BlockManager(32, 16), FakeAdapters())
    seqs = [seq(3, rid=f"q{i}") for i in range(6)]
    for s in seqs:
        sched.add(s)
    started = []
    for _ in range(100):
        step = run_step(sched)
        started += [s.request_id for s in step.work if s.request_id not in started]
        for s in list(sched.running):
            if len(s.output_ids) >= 2:
                sched.finish(s, "length")
        if not sched.has_work():
            break
    assert started == [s.request_id for s in seqs]


def test_adapter_slots_gate_admission():
    adapters = FakeAdapters(slots=1)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), BlockManager(32, 16), adapters)
    a, b = seq(3, lora="x"), seq(3, lora="y")
    sched.add(a)
    sched.add(b)
    step = run_step(sched)
    assert a in step.work and b not in step.work  # one slot, pinned by a
    sched.finish(a, "stop")
    step = run_step(sched)
    assert b in step.work and b.slot == 1


def test_base_and_running_adapters_start_while_the_head_waits_for_a_slot():
    adapters = FakeAdapters(slots=1)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), BlockManager(32, 16), adapters)
    x1, y, base, x2, z = seq(3, lora="x"), seq(3, lora="y"), seq(3), seq(3, lora="x"), seq(3, lora="z")
    for s in (x1, y, base, x2, z):
        sched.add(s)
    step = run_step(sched)
    assert set(step.work) == {x1, base, x2}  # y waits for the slot x holds; base and x2 need no new slot
    assert list(sched.waiting) == [y, z] and y.num_bypassed == 2
    sched.finish(x1, "stop")
    sched.finish(x2, "stop")
    step = run_step(sched)
    assert y in step.work and z not in step.work  # the oldest gets the freed slot first


def test_bypassing_is_bounded_so_the_head_cannot_starve():
    from punica.engine.scheduler import MAX_BYPASS

    adapters = FakeAdapters(slots=1)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1000, max_num_batched_tokens=100000), BlockManager(4096, 16),
                      adapters)
    holder, head = seq(3, lora="x"), seq(3, lora="y")
    sched.add(holder)
    run_step(sched)
    sched.add(head)
    for _ in range(MAX_BYPASS + 5):
        sched.add(seq(3))
    run_step(sched)
    assert head.num_bypassed == MAX_BYPASS and len(sched.waiting) == 6  # head plus five that must wait behind it


def test_pending_tokens_finishing_sequences_and_preempted_placeholders():
    """With steps overlapped, a sequence's newest token may still be on the device (a placeholder):
    decodes of it are scheduled, a sequence whose pending token is its last is not, and a sequence
    preempted while a token is pending waits (holding back the queue) until the token is known."""
    blocks = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), blocks, FakeAdapters())
    a, b = seq(4, rid="a"), seq(4, rid="b")
    for s in (a, b):
        sched.add(s)
    step = sched.schedule()
    assert step.work == {a: 4, b: 4}
    for s in (a, b):  # what the runner does at launch: advance, then a placeholder for the sampled token
        s.num_computed += 4
        s.tokens.append(-1)
        s.num_pending = 1
    a.finishing = True
    assert sched.schedule().work == {b: 1}  # `a`'s pending token is its last: no decode for it
    b.num_computed += 1
    sched.preempt(b)
    assert b.status is Status.WAITING and b.num_pending == 1
    late = seq(2, rid="late")
    sched.add(late)
    assert sched.schedule().work == {}  # `b` heads the queue with an unknown token: nobody starts
    b.tokens[-1], b.num_pending = 9, 0  # its step finished
    assert sched.schedule().work == {b: 5, late: 2}


def test_adapters_read_from_disk_in_the_background_and_failed_reads_fail_only_their_requests():
    """A request whose adapter is not in the CPU cache waits while it is read (later requests start
    meanwhile); when the read fails, exactly the requests for that adapter leave the queue as failed."""
    adapters = FakeAdapters(slots=4)
    adapters.on_disk = {"slow", "broken"}
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), BlockManager(32, 4), adapters)
    slow, broken1, base, broken2 = seq(3, "slow", "slow"), seq(3, "broken", "b1"), seq(3, None, "base"), \
        seq(3, "broken", "b2")
    for s in (slow, broken1, base, broken2):
        sched.add(s)
    step = run_step(sched)
    assert list(step.work) == [base] and adapters.reading == ["slow", "broken"]
    assert not step.failed
    adapters.finish_read("broken", error=OSError("gone"))
    step = run_step(sched)
    assert [s.request_id for s, _ in step.failed] == ["b1", "b2"] and list(step.work) == [base]
    assert all(isinstance(e, OSError) for _, e in step.failed)
    adapters.finish_read("slow")
    step = run_step(sched)
    assert list(step.work) == [base, slow] and list(sched.waiting) == []


def test_a_preempted_sequence_gives_back_its_share_of_the_step():
    """Decodes are scheduled first; when an older prefill then needs blocks and the newest sequence (a decode
    already given a token of this step) is preempted for them, that token goes to the next sequence in line."""
    blocks = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8), blocks, FakeAdapters())
    a, c, b = seq(12, rid="a"), seq(8, rid="c"), seq(4, rid="b")  # arrival order a, c, b
    b.tokens.append(7)  # b decodes its first output
    for s, computed, held in ((a, 4, 4), (c, 4, 8), (b, 4, 8)):  # a: 1 block, c and b: 2 (one free block left)
        s.num_computed, s.status = computed, Status.RUNNING
        blocks.grow(s.block_table, held)
        sched.running.append(s)
    step = sched.schedule()
    assert step.preempted == [b]  # a's chunk of 7 needs 2 more blocks: b, the newest, made room
    assert step.work == {a: 7, c: 1}  # b's decode token went to c
    assert blocks.num_free + blocks.num_used == blocks.num_blocks


def test_prompts_that_cannot_both_fit_run_one_after_the_other_without_preemption():
    """Two long prompts whose KV does not fit together: the second starts once the first is done, instead
    of starting its chunked prefill, growing into the first's room and being preempted (recomputed) over
    and over. Both finish."""
    blocks = BlockManager(num_blocks=20, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16), blocks, FakeAdapters())
    first, second = seq(44, rid="first"), seq(44, rid="second")  # 11 blocks each, 20 in all
    for s in (first, second):
        sched.add(s)
    preempted, steps = 0, 0
    while sched.has_work():
        step = run_step(sched)
        steps += 1
        preempted += len(step.preempted)
        assert not (first in step.work and second in step.work)
        for s in list(sched.running):
            if len(s.output_ids) >= 8:
                sched.finish(s, "length")
        assert steps < 100
    assert preempted == 0
    assert [len(s.output_ids) for s in (first, second)] == [8, 8]


def test_requests_wait_for_prompt_blocks_another_is_computing_and_take_them_from_the_cache():
    """Three requests with one 30-token prompt arrive together (`n` choices): the first computes it, in
    16-token chunks; the others wait while the block they need next is being computed, then take its full
    blocks from the cache. A request with another prompt, or another adapter, starts at once."""
    blocks = BlockManager(64, 4, caching=True)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16), blocks, FakeAdapters())

    def make(prompt, lora=None):
        s = Sequence(request_id=f"r{id(object())}", prompt_ids=list(prompt), params=SamplingParams(max_tokens=9),
                     lora=lora, cache_namespace=lora)
        sched.add(s)
        return s

    def step():
        work = run_step(sched).work
        sched.launched(work)
        return work

    a, b, c = (make(range(30)) for _ in range(3))
    other, adapted = make(range(100, 104)), make(range(30), lora="x")
    work = step()
    assert work == {a: 16}  # the budget: a's first chunk only
    work = step()
    assert work == {a: 14, other: 2}  # b and c wait (their fifth block is a's, computed now); other starts
    assert not blocks.hit_tokens
    work = step()
    assert work == {a: 1, other: 2, b: 2, c: 2, adapted: 9}  # b and c: 7 full blocks from the cache
    assert blocks.hit_tokens == 2 * 28
    assert b.block_table[:7] == c.block_table[:7] == a.block_table[:7]
    assert adapted.block_table[0] not in a.block_table  # another adapter's KV differs: its own blocks


def test_prompt_logprob_positions_are_capped_per_step_and_shared():
    """Requests for their prompt's logprobs compute at most max_prompt_logprob_tokens prompt positions a step
    between them (the last prompt token, sampled from, is not one); others use the rest of the budget."""
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_prompt_logprob_tokens=10)
    sched = Scheduler(cfg, BlockManager(64, 16), FakeAdapters())
    scored = [Sequence(request_id=f"s{i}", prompt_ids=list(range(15)), params=SamplingParams(prompt_logprobs=1))
              for i in range(2)]
    plain = seq(30)
    for s in (*scored, plain):
        sched.add(s)
    assert run_step(sched).work == {scored[0]: 10, plain: 30}  # the second waits for rows
    assert run_step(sched).work == {scored[0]: 5, scored[1]: 6, plain: 1}  # 4 rows and the sampled token; 6
    assert run_step(sched).work == {scored[0]: 1, scored[1]: 9, plain: 1}  # 8 rows, then the sampled token


def test_a_longrope_sequence_is_recomputed_long_once_it_outgrows_the_pretraining_length():
    """Longrope (Sequence.rope_long = (first long position, row offset)): the step that would compute position 8
    of a sequence pretrained on 8 recomputes it from 0, every position then on the long-context rows; one
    preempted for memory with a token past 8 already comes back long too; a shorter one keeps its rotations."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), BlockManager(32, 4), FakeAdapters())
    a, short = seq(6, rid="a"), seq(3, rid="short")
    for s in (a, short):
        s.rope_long = (8, 100)
        sched.add(s)
    run_step(sched)  # both prefilled
    run_step(sched)  # position 6: a has 8 tokens
    assert a.rope_long == (8, 100) and len(a.tokens) == 8
    step = run_step(sched)  # position 7: still within the pretraining length
    assert a.rope_long == (8, 100) and step.work[a] == 1
    step = run_step(sched)  # position 8: recomputed instead, in this same step, from position 0
    assert a.rope_long == (0, 100) and step.work[a] == 9 and a.cache_namespace == (None, "long rope")
    assert short.rope_long == (8, 100)
    b = seq(5, rid="b")
    b.rope_long = (4, 100)
    b.tokens.append(7)  # its prompt and a token at position 5: past 4
    sched.running.append(b)  # as if it ran, then lost its blocks
    b.status = Status.RUNNING
    sched.preempt(b)
    assert b.rope_long == (0, 100) and b.num_computed == 0 and sched.waiting[0] is b
