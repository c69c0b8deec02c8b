"""Continuous batching: which tokens of which requests run in the next dense batch.

Pure Python (no torch): the serving loop (`nfrt.llm`) turns a `Plan` into the static buffers.

The dense batch has a fixed shape (docs/serving.md): `decode_slots` single-token slots (the
schedule's decode tokens, run by decode attention) and a prefill region of `prefill_tokens`
tokens in at most `prefill_rows` runs of consecutive positions of one request each (run by
prefill attention). Decode slots and the prefill region each pay off only with their own kind of
token: a decode token in the prefill region costs prefill attention a whole query tile (measured on
an H200, llama3-8b splitwise: 68.7 ms median dense forward with such runs vs 60.9 ms without), so
decodes go there only when it would otherwise hold padding. Every iteration, in this order:

1. requests past their prompt ("decoders") take one token each in the decode slots, least recently
   served first;
2. admitted requests still in their prompt take the next chunk of it, first come first served, as
   large as the prefill region has room for; one prompt token goes into a free decode slot instead
   when the region is full, or when it is the prompt's last token;
3. waiting requests are admitted first come first served while their projected KV need fits (see
   below) and the batch has room, and take their first chunk the same way: into the prefill
   region while it has room (the extra prompts that keep it full), else into a free decode slot —
   free only when every running decoder and prompt already has a token in this plan;
4. surplus decoders (the slots were full) take runs of length 1 in the prefill region room that is
   left, least recently served first: room no prompt token could take this iteration, which would
   otherwise be padding. The others wait a turn and are served first next time, so none starves.

So the requests that will need a decode slot (decoders and admitted prompts) exceed
`decode_slots` only by the prompts admitted to keep the prefill region full, no decode slot is left
empty while a decoder or an admissible prompt could fill it, and a decode never displaces a prompt
token from the prefill region. (Before 2026-11-21 surplus decoders took the region first; on an
H200, llama3-8b splitwise, 402 of 966 dense iterations then had such runs, 68.7 ms median forward
against 60.9 ms without. benchmarks/probes/scheduler_sim.py compares the rules on the CPU.)

Admission reserves the pages of a request's whole life — prompt plus `max_new_tokens - 1`
positions (the last sampled token is never fed back) — so the cache never runs out mid-flight and
nothing is preempted. Pages are allocated as positions are scheduled and freed once the request's
last token is scheduled: later iterations that reuse them run after it on the same stream.
(They are released at the next `schedule` call, once the plan that scheduled their last token
has been staged.) A request that could never fit (longer than `max_seq_len`, or more pages than
the cache has) is rejected by `add` with a message, and the others proceed.

The drain: once no request is waiting and none is still in its prompt, a prefill region could only
hold padding or decodes. With `drain_slots` == 0 decoders then use it as in step 1; with
`drain_slots` > 0 the plan is decode-only (`Plan.decode_only`): up to
`drain_slots` running requests, one token each, least recently served first, and no prefill region
(the serving loop runs it through a smaller captured shape). Every plan made with nothing left to
prefill has `Plan.drain` set, whichever shape it uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from nfrt.errors import NfrtError


class Allocator(Protocol):  # nfrt.kvcache.PageAllocator
    page_size: int

    def ensure(self, seq_id: int, num_tokens: int) -> list[int]: ...

    def free(self, seq_id: int) -> None: ...


@dataclass(eq=False)
class Request:
    """One generation request and its progress (host side)."""

    index: int  # the caller's position; also the KV sequence id
    prompt: tuple[int, ...]
    max_new_tokens: int
    key: int = 0  # sampling noise key (nfrt.sampling.request_key)
    temperature: float = 0.0
    top_p: float = 1.0
    outputs: list[int] = field(default_factory=list)  # tokens read back so far
    num_computed: int = 0  # positions scheduled (fed) so far
    num_sampled: int = 0  # samples scheduled so far (read back or in flight)
    pending: tuple[int, int] | None = None  # (iteration, sample row) of a sample not read back yet
    last_iter: int = -1
    admitted: bool = False
    released: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def kv_positions(self) -> int:
        """Positions the request holds at its end: prompt plus every output but the last."""
        return self.prompt_len + self.max_new_tokens - 1

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prompt_len

    @property
    def scheduled_all(self) -> bool:
        return self.num_sampled >= self.max_new_tokens

    @property
    def done(self) -> bool:
        return len(self.outputs) >= self.max_new_tokens


@dataclass(frozen=True)
class Item:
    """Positions [start, start + length) of one request in one iteration."""

    request: Request
    start: int
    length: int
    sample_row: int  # row of the iteration's logits to sample from; -1: no sample (mid-prompt chunk)
    prev: tuple[int, int] | None = None  # the request's sample in flight when planned: (iteration, row)


@dataclass(frozen=True)
class Plan:
    iteration: int
    decode: tuple[Item, ...]  # single-token items in decode slots 0, 1, ...
    prefill: tuple[Item, ...]  # runs in prefill rows 0, 1, ... (tokens in this order)
    drain: bool = False  # planned with no request waiting or in its prompt
    decode_only: bool = False  # for the decode-only shape: `drain_slots` slots, no prefill region

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(i.length for i in self.prefill)


class Scheduler:
    """See the module docstring. One instance serves one `LLM.stream` call."""

    def __init__(self, allocator: Allocator, usable_pages: int, decode_slots: int, prefill_tokens: int,
                 prefill_rows: int, max_seq_len: int, drain_slots: int = 0) -> None:
        if decode_slots < 0 or prefill_tokens < 0 or decode_slots + prefill_tokens == 0:
            raise NfrtError(f"scheduler: decode_slots {decode_slots} and prefill_tokens {prefill_tokens} "
                            "must be >= 0 with a positive sum")
        if prefill_tokens and prefill_rows < 1:
            raise NfrtError(f"scheduler: prefill_rows must be >= 1 with a prefill region, got {prefill_rows}")
        if drain_slots < 0:
            raise NfrtError(f"scheduler: drain_slots must be >= 0, got {drain_slots}")
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.usable_pages = usable_pages
        self.decode_slots = decode_slots
        self.prefill_tokens = prefill_tokens
        self.prefill_rows = prefill_rows if prefill_tokens else 0
        self.max_seq_len = max_seq_len
        self.drain_slots = drain_slots
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # admitted, not all tokens scheduled; admission order
        self.committed_pages = 0  # pages reserved by admitted requests not yet released
        self._finishing: list[Request] = []  # all tokens scheduled in the last plan: released next call

    def pages_for(self, r: Request) -> int:
        return math.ceil(r.kv_positions / self.page_size)

    def add(self, r: Request) -> str | None:
        """Queue `r`; returns why it can never run (and does not queue it), else None."""
        what = (f"request {r.index} rejected: prompt of {r.prompt_len} tokens + {r.max_new_tokens} new "
                f"tokens "
                f"needs {r.kv_positions} KV positions")
        if r.kv_positions > self.max_seq_len:
            return f"{what}, more than max_seq_len {self.max_seq_len}"
        if self.pages_for(r) > self.usable_pages:
            return (f"{what} = {self.pages_for(r)} pages of {self.page_size}, the KV cache has "
                    f"{self.usable_pages} (raise num_pages or shorten the request)")
        self.waiting.append(r)
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, iteration: int) -> Plan | None:
        """The next iteration's plan, or None when no request is left to schedule.

        Requests whose last token the previous plan scheduled are released first: that plan has
        been staged (its page tables copied), and this one runs after it."""
        for r in self._finishing:
            self.release(r)
        self._finishing = []
        drain = not self.waiting and not any(r.prefilling for r in self.running)
        decode_only = drain and self.drain_slots > 0
        # the shape planned for: decode slots, prefill-region tokens and runs
        slots, room, rows = ((self.drain_slots, 0, 0) if decode_only
                             else (self.decode_slots, self.prefill_tokens, self.prefill_rows))
        decode: list[Item] = []
        prefill: list[Item] = []

        def sample_row(r: Request, end: int, slot: int | None) -> int:
            if end < r.prompt_len:
                return -1
            return slot if slot is not None else slots + len(prefill)

        def region_free() -> bool:
            return room > 0 and len(prefill) < rows

        def place(r: Request, want: int, spill: bool = False) -> bool:
            """Put up to `want` next positions of r into the batch; False when there is no room.
            A single token goes into a free decode slot; into the prefill region only if `spill`
            (decoders) or the slots are full (a prompt's last token)."""
            nonlocal room
            start = r.num_computed
            if region_free() and (want > 1 or (len(decode) >= slots and (spill or r.prefilling))):
                n = min(want, room)
                prefill.append(Item(r, start, n, sample_row(r, start + n, None), r.pending))
                room -= n
            elif len(decode) < slots:
                decode.append(Item(r, start, 1, sample_row(r, start + 1, len(decode)), r.pending))
            else:
                return False
            return True

        # 1. requests past their prompt ("decoders"): the decode slots, least recently served first
        decoders = sorted((r for r in self.running if not r.prefilling), key=lambda r: (r.last_iter, r.index))
        served = 0
        for r in decoders:
            if not place(r, 1):
                break
            served += 1
        # 2. admitted prompts, first come first served
        for r in [r for r in self.running if r.prefilling]:
            if not place(r, r.prompt_len - r.num_computed):
                break
        # 3. admission, first come first served, while the pages fit and the batch has room: a new
        # request takes a free decode slot (then every running request outside the prefill region
        # holds one, so at most `slots` of them need one) or a place in the prefill region (the
        # extra prompts that keep it full)
        while self.waiting and self._fits(self.waiting[0]) and (region_free() or len(decode) < slots):
            r = self.waiting.pop(0)
            r.admitted = True
            self.committed_pages += self.pages_for(r)
            self.running.append(r)
            place(r, r.prompt_len)
        # 4. surplus decoders take region room that no prompt token could take (else padding)
        for r in decoders[served:]:
            if not place(r, 1, spill=True):
                break
        if not decode and not prefill:
            if self.has_work:  # cannot happen: add() rejects what could never be admitted
                raise NfrtError("scheduler: requests left but none can be scheduled")
            return None
        for item in decode + prefill:
            self._commit(item, iteration)
        self.running = [r for r in self.running if not r.scheduled_all]
        return Plan(iteration, tuple(decode), tuple(prefill), drain, decode_only)

    def _fits(self, r: Request) -> bool:
        """Whether admitting r keeps the reserved pages within the cache."""
        return self.committed_pages + self.pages_for(r) <= self.usable_pages

    def _commit(self, item: Item, iteration: int) -> None:
        r = item.request
        end = item.start + item.length
        self.allocator.ensure(r.index, end)
        r.num_computed = end
        r.last_iter = iteration
        if item.sample_row >= 0:
            r.num_sampled += 1
            r.pending = (iteration, item.sample_row)
        if r.scheduled_all:
            self._finishing.append(r)

    def release(self, r: Request) -> None:
        """Free r's pages and reservation (idempotent)."""
        if r.released:
            return
        self.allocator.free(r.index)
        if r.admitted:
            self.committed_pages -= self.pages_for(r)
        r.released = True

    def abort(self) -> None:
        """Release every request (the caller stopped early): all pages are free afterwards."""
        for r in self._finishing + self.running + self.waiting:
            self.release(r)
        self._finishing, self.running, self.waiting = [], [], []
