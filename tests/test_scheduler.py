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


def test_decode_slots_first_then_single_tokens_in_prefill_region():
    alloc = PageAllocator(200, page_size=4)
    sched = Scheduler(alloc, 200, decode_slots=2, prefill_tokens=6, prefill_rows=2, max_seq_len=100)
    reqs = [Request(i, (1, 2), 50) for i in range(4)] + [Request(9, (5,), 3)]
    for r in reqs:
        sched.add(r)
    first = sched.schedule(0)  # prompts: whole ones in the prefill region, then one token per decode slot
    assert [(i.request.index, i.length) for i in first.prefill] == [(0, 2), (1, 2)]
    assert [(i.request.index, i.start, i.sample_row) for i in first.decode] == [(2, 0, -1), (3, 0, -1)]
    assert [i.sample_row for i in first.prefill] == [2, 3]  # rows after the decode slots
    plan = first
    for k in range(1, 12):
        for it in plan.decode + plan.prefill:
            if it.sample_row >= 0:
                it.request.outputs.append(0)
        plan = sched.schedule(k)
        assert len(plan.decode) == 2  # decode slots are always filled first
        assert all(i.length == 1 for i in plan.prefill)  # past their prompts: single tokens
        assert {i.request.index for i in plan.decode + plan.prefill} == {0, 1, 2, 3}  # all served
    assert sched.waiting == [reqs[-1]]  # no room until one finishes
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
