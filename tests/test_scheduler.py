"""The continuous-batching scheduler alone (no model): batch shape, fairness, KV reservation, rejection."""

from __future__ import annotations

import math
import random

import pytest

pytest.importorskip("torch")  # nfrt.kvcache's allocator lives beside the torch cache

from nfrt.kvcache import PageAllocator  # noqa: E402
from nfrt.scheduler import Request, Scheduler  # noqa: E402


def simulate(sched: Scheduler, requests: list[Request], check) -> int:
    """Run plans to the end, 'sampling' token 7 for every sample row one iteration late (as the
    loop does); returns the number of iterations."""
    for r in requests:
        assert sched.add(r) is None
    k, inflight = 0, None
    while True:
        plan = sched.schedule(k)
        if plan is not None:
            check(plan)
        if inflight is not None:
            for it in inflight.decode + inflight.prefill:
                if it.sample_row >= 0:
                    it.request.outputs.append(7)
        if plan is None:
            return k
        inflight, k = plan, k + 1


def make(n: int, rng: random.Random, prompt=(1, 30), new=(1, 9)) -> list[Request]:
    return [Request(i, tuple(range(rng.randint(*prompt))), rng.randint(*new)) for i in range(n)]


@pytest.mark.parametrize("decode_slots,prefill_tokens,rows", [(4, 12, 3), (0, 8, 4), (6, 0, 0), (3, 5, 5)])
def test_every_request_completes_within_shape_and_reservation(decode_slots, prefill_tokens, rows):
    rng = random.Random(decode_slots * 100 + prefill_tokens)
    alloc = PageAllocator(40, page_size=4)
    sched = Scheduler(alloc, 40, decode_slots, prefill_tokens, rows, max_seq_len=160)
    reqs = make(60, rng)

    def check(plan):
        assert len(plan.decode) <= decode_slots and all(i.length == 1 for i in plan.decode)
        assert len(plan.prefill) <= rows and sum(i.length for i in plan.prefill) <= prefill_tokens
        seqs = [i.request.index for i in plan.decode + plan.prefill]
        assert len(seqs) == len(set(seqs))  # a request at most once per iteration
        for it in plan.decode + plan.prefill:
            r = it.request
            assert len(alloc.pages(r.index)) == math.ceil((it.start + it.length) / 4)
            assert it.start + it.length <= r.kv_positions
        assert sched.committed_pages <= 40
        rows_used = [i.sample_row for i in plan.decode + plan.prefill if i.sample_row >= 0]
        assert len(rows_used) == len(set(rows_used))

    simulate(sched, reqs, check)
    assert [len(r.outputs) for r in reqs] == [r.max_new_tokens for r in reqs]
    assert alloc.free_pages == 40 and sched.committed_pages == 0


def test_surplus_decoders_take_only_prefill_room_no_prompt_can_use():
    alloc = PageAllocator(200, page_size=4)
    sched = Scheduler(alloc, 200, decode_slots=2, prefill_tokens=6, prefill_rows=2, max_seq_len=100)
    reqs = [Request(i, (1, 2), 50) for i in range(4)] + [Request(9, (5,), 3)]
    for r in reqs:
        sched.add(r)
    first = sched.schedule(0)  # prompts: whole ones in the prefill region, then one token per decode slot
    assert [(i.request.index, i.length) for i in first.prefill] == [(0, 2), (1, 2)]
    assert [(i.request.index, i.start, i.sample_row) for i in first.decode] == [(2, 0, -1), (3, 0, -1)]
    assert [i.sample_row for i in first.prefill] == [2, 3]  # rows after the decode slots
    plans = [first]

    def step(k):
        for it in plans[-1].decode + plans[-1].prefill:
            if it.sample_row >= 0:
                it.request.outputs.append(0)
        plans.append(sched.schedule(k))
        p = plans[-1]
        return [(i.request.index, i.start, i.length) for i in p.decode], \
            [(i.request.index, i.start, i.length) for i in p.prefill]

    # decoders 0, 1 in the slots; the last prompt tokens of 2, 3 (slots full) in the region
    assert step(1) == ([(0, 2, 1), (1, 2, 1)], [(2, 1, 1), (3, 1, 1)])
    # 4 decoders, 2 slots, and request 9 can be admitted: 9's prompt takes the region first, then
    # surplus decoder 2 takes the room left (the region's last run); 3 waits
    assert step(2) == ([(0, 3, 1), (1, 3, 1)], [(9, 0, 1), (2, 2, 1)])
    assert not plans[-1].drain and sched.waiting == []
    # nothing left to prefill (drain_slots 0): the least recently served first (3), the rest spill
    assert step(3) == ([(3, 2, 1), (0, 4, 1)], [(1, 4, 1), (2, 3, 1)])
    assert plans[-1].drain
    for k in range(4, 12):  # 5 (then 4) decoders on 2 slots + 2 rows: none waits twice in a row
        running = {r.index for r in sched.running}
        step(k)
        p = plans[-1]
        assert p.drain and len(p.decode) == 2 and all(i.length == 1 for i in p.prefill)
        now = {i.request.index for i in p.decode + p.prefill}
        before = {i.request.index for i in plans[-2].decode + plans[-2].prefill}
        assert running <= now | before
    sched.abort()
    assert alloc.free_pages == 200


def test_admission_waits_for_pages_first_come_first_served():
    alloc = PageAllocator(10, page_size=4)
    sched = Scheduler(alloc, 10, decode_slots=4, prefill_tokens=16, prefill_rows=4, max_seq_len=64)
    big, small = Request(0, tuple(range(20)), 13), Request(1, (1,), 2)  # 32 positions: 8 pages
    late = Request(2, tuple(range(8)), 5)  # 12 positions: 3 pages, must wait behind nobody but big
    for r in (big, small, late):
        sched.add(r)
    plan = sched.schedule(0)
    admitted = {i.request.index for i in plan.decode + plan.prefill}
    assert admitted == {0, 1} and sched.committed_pages == 9  # late's 3 pages do not fit yet
    assert sched.waiting == [late]


def test_never_fitting_requests_are_rejected_with_reason():
    alloc = PageAllocator(9, page_size=16)
    sched = Scheduler(alloc, 8, decode_slots=2, prefill_tokens=6, prefill_rows=2, max_seq_len=100)
    too_long = sched.add(Request(3, tuple(range(90)), 20))
    assert "request 3 rejected" in too_long and "109 KV positions" in too_long
    assert "max_seq_len 100" in too_long
    too_big = Scheduler(alloc, 2, 2, 6, 2, max_seq_len=100).add(Request(4, tuple(range(40)), 1))
    assert "3 pages of 16" in too_big and "has 2" in too_big
    assert sched.add(Request(5, (1,), 1)) is None


@pytest.mark.parametrize("drain_slots", [0, 2, 4])
def test_drain_plans_are_decode_only_once_no_prompt_is_left(drain_slots):
    rng = random.Random(drain_slots + 11)
    alloc = PageAllocator(60, page_size=4)
    sched = Scheduler(alloc, 60, decode_slots=4, prefill_tokens=10, prefill_rows=3, max_seq_len=160,
                      drain_slots=drain_slots)
    reqs = make(40, rng, prompt=(1, 20), new=(1, 14))
    seen = {"drain": 0, "decode_only": 0, "before_drain": 0}
    last_served: dict[int, int] = {}

    def check(plan):
        # sched.running/waiting now hold the state after planning; a drain plan had nothing to prefill
        if plan.drain:
            seen["drain"] += 1
            assert not sched.waiting and not any(r.prefilling for r in sched.running)
            assert all(i.start >= i.request.prompt_len for i in plan.decode + plan.prefill)
        else:
            seen["before_drain"] += 1
            assert seen["drain"] == 0  # requests arrive only at the start: no way back from the drain
        assert plan.decode_only == (plan.drain and drain_slots > 0)
        if plan.decode_only:
            seen["decode_only"] += 1
            assert not plan.prefill and 1 <= len(plan.decode) <= drain_slots
            assert [i.sample_row for i in plan.decode] == list(range(len(plan.decode)))
            # least recently served first: nobody served here was passed over for a later-served one
            served = {i.request.index for i in plan.decode}
            passed_over = [r for r in sched.running if r.index not in served]
            waiting_longest = min((last_served.get(r.index, -1) for r in passed_over), default=None)
            if waiting_longest is not None:
                assert all(last_served.get(i, -1) <= waiting_longest for i in served)
        for i in plan.decode + plan.prefill:
            last_served[i.request.index] = plan.iteration

    simulate(sched, reqs, check)
    assert [len(r.outputs) for r in reqs] == [r.max_new_tokens for r in reqs]
    assert alloc.free_pages == 60 and sched.committed_pages == 0
    assert seen["drain"] > 0 and seen["before_drain"] > 0
    assert seen["decode_only"] == (seen["drain"] if drain_slots else 0)


@pytest.mark.parametrize("decode_slots,prefill_tokens,rows,drain_slots,pages", [
    (4, 12, 3, 0, 60), (4, 12, 3, 4, 400), (3, 5, 5, 2, 40), (8, 24, 4, 8, 120), (6, 0, 0, 0, 50)])
def test_decoders_take_only_prefill_room_no_prompt_can_use(decode_slots, prefill_tokens, rows,
                                                                       drain_slots, pages):
    """Hundreds of random requests: a decode in the prefill region only in room that no prompt token
    could take; decode slots full whenever enough decoders run; admission into decode slots only
    once every decoder is served; nobody lost, duplicated or starved; all pages free at the end."""
    rng = random.Random(1000 * decode_slots + pages + drain_slots)
    alloc = PageAllocator(pages, page_size=4)
    sched = Scheduler(alloc, pages, decode_slots, prefill_tokens, rows, max_seq_len=200,
                      drain_slots=drain_slots)
    reqs = make(300, rng, prompt=(1, 40), new=(1, 24))
    seen = {"spilled": 0, "spilled_while_waiting": 0, "decoders_waited": 0}
    last_served: dict[int, int] = {}
    gaps: list[tuple[int, int]] = []  # (plans a decoder waited, decoders running then)
    state: dict = {}

    def snapshot() -> None:  # the state `schedule` plans from
        state["decoders"] = [r for r in sched.running if not r.prefilling]
        state["prompts"] = [r for r in sched.running if r.prefilling]
        state["waiting"] = list(sched.waiting)

    def check(plan):
        items = plan.decode + plan.prefill
        served = {i.request.index for i in items}
        assert len(served) == len(items)  # a request at most once per iteration
        decoders, prompts = state["decoders"], state["prompts"]
        gaps.extend((plan.iteration - last_served[r.index] - 1, len(decoders)) for r in decoders
                    if r.index in served)
        slots = drain_slots if plan.decode_only else decode_slots
        spilled = [i for i in plan.prefill if i.start >= i.request.prompt_len]
        if spilled:  # only into room no prompt token could take: every admitted prompt placed whole,
            # the head of the queue does not fit, and the decode slots are full
            seen["spilled"] += 1
            assert len(plan.decode) == slots
            assert not any(r.prefilling for r in sched.running)
            if sched.waiting:
                seen["spilled_while_waiting"] += 1
                assert sched.committed_pages + sched.pages_for(sched.waiting[0]) > pages
        # decode slots: full whenever enough decoders run, and decoders go there first
        slot_decoders = sum(1 for i in plan.decode if i.start >= i.request.prompt_len)
        assert slot_decoders == min(len(decoders), slots)
        waited = [r for r in decoders if r.index not in served]
        seen["decoders_waited"] += bool(waited and (prompts or plan.num_tokens > len(plan.decode)))
        if len(plan.decode) < slots:  # a free slot: nobody that could have used it was left out
            assert not waited and all(r.index in served for r in prompts)
            assert not sched.waiting or sched.committed_pages + sched.pages_for(sched.waiting[0]) > pages
        # admission into a decode slot only when every decoder and admitted prompt has its token
        new_in_slots = [i for i in plan.decode if i.request in state["waiting"]]
        if new_in_slots:
            assert not waited and all(r.index in served for r in prompts)
        # least recently served first: a waiting decoder was served no later than any served one
        if waited:
            oldest_wait = min(last_served[r.index] for r in waited)
            assert all(last_served[i.request.index] <= oldest_wait for i in plan.decode
                       if i.request in decoders)
        for i in items:
            last_served[i.request.index] = plan.iteration
        assert sched.committed_pages <= pages
        snapshot()

    snapshot()
    simulate(sched, reqs, check)
    assert [len(r.outputs) for r in reqs] == [r.max_new_tokens for r in reqs]  # none lost or duplicated
    assert alloc.free_pages == pages and sched.committed_pages == 0
    # starvation bound: least recently served first serves D decoders within ceil(D / slots) plans
    most = max(d for _, d in gaps)
    min_slots = min(s for s in (decode_slots, drain_slots) if s > 0)
    assert max(g for g, _ in gaps) <= math.ceil(most / min_slots) - 1
    if prefill_tokens:
        assert seen["decoders_waited"] > 0 and seen["spilled"] > 0
