"""`nfrt.LLM`: serve generation requests through a schedule (docs/serving.md).

    llm = LLM("schedules/llama3-8b-h200-tp1-splitwise.yaml", weights=None)  # random weights
    outs = llm.generate([[1, 2, 3], [4, 5]], max_new_tokens=16)  # greedy token ids per request
    for done in llm.stream(prompts, max_new_tokens=64, temperature=0.8, top_p=0.95, seed=1):
        print(done.index, done.token_ids)  # in order of completion

The loop per iteration k: the scheduler plans k (`nfrt.scheduler`), the host fills pinned staging
and enqueues the upload, the forward (one CUDA-graph replay of the fixed-shape batch) and the
sampling; only then does it wait for iteration k - 1's sampled ids and hand finished requests to
the caller. So the host plans k + 1 while the device runs k, and tokens that k + 1 feeds back are
gathered on the device (`nfrt.staging`). Nothing else in the loop waits for the device.

Two shapes, each captured once: `dense` (the schedule's batch) and, for the drain (no request
waiting or in its prompt), `decode_only`: the decode slots alone, run by the schedule's model
through a one-stream sequential schedule of that size, so the drain does not compute an idle
prefill region. `LLM.stats` counts tokens, slots and padding per shape and phase;
`instrument=True` also times every iteration (`nfrt.loop_stats`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from nfrt.config import BatchComposition
from nfrt.engine import Engine
from nfrt.errors import NfrtError
from nfrt.kvcache import PAGE_SIZE, KVCache
from nfrt.layout import position_sum, prefill_chunks
from nfrt.loop_stats import LoopStats, Stopwatch
from nfrt.sampling import SamplingParams, request_key, sample
from nfrt.schedule import Schedule
from nfrt.scheduler import Item, Plan, Request, Scheduler
from nfrt.staging import ServingShape, StaticBatch
from nfrt.weights import Weights

SCRATCH_SEQ = -1  # owns the scratch page that padding tokens read and write
CPU_KV_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True)
class Completion:
    """A finished request: `index` is its position in the prompts given to `stream`/`generate`."""

    index: int
    token_ids: tuple[int, ...]
    finish_reason: Literal["length", "rejected"]
    error: str | None = None


class RejectedError(NfrtError):
    """Some requests could never fit; `outputs` holds the others' token ids (None where rejected)."""

    def __init__(self, message: str, outputs: list[list[int] | None], errors: dict[int, str]) -> None:
        super().__init__(message)
        self.outputs = outputs
        self.errors = errors


@dataclass(frozen=True)
class _Shape:
    """One batch shape the loop runs: its engine (graph) and its static batch."""

    name: Literal["dense", "decode_only"]
    engine: Engine
    static: StaticBatch

    @property
    def slots(self) -> int:
        return self.static.shape.dense_batch


def default_prefill_rows(prefill_tokens: int) -> int:
    """Runs allowed in the prefill region: enough for a few prompts plus overflowing decodes, few
    enough that the LM head over the sample rows stays a small part of the iteration."""
    return min(prefill_tokens, 8 + prefill_tokens // 8)


class LLM:
    """A model served through one schedule (see the module docstring and docs/serving.md).

    `weights`: None (random, from `seed`), a Hugging Face checkpoint folder, or a weight dict.
    `num_pages`: KV pages; default on CUDA: what is left after weights, buffers and the measured
    transient memory of one forward: `kv_memory_fraction` of the free device memory; on the CPU 1 GiB
    at most. `max_seq_len`: the longest prompt + output (default: the model's max_position).
    `drain_shape`: run the drain in the decode-only shape (see the module docstring).
    `instrument`: log every iteration's host and device times (`nfrt.loop_stats`; `self.loop`).
    """

    def __init__(self, schedule: str | os.PathLike[str] | Schedule, weights: None | str | os.PathLike[str] |
                 Weights = None, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, seed: int = 0, num_pages: int | None = None,
                 max_seq_len: int | None = None, prefill_rows: int | None = None,
                 kv_memory_fraction: float = 0.9, cuda_graph: bool = True,
                 use_partitions: bool = True, drain_shape: bool = True, instrument: bool = False) -> None:
        if not 0 < kv_memory_fraction <= 1:
            raise NfrtError(f"LLM: kv_memory_fraction must be in (0, 1], got {kv_memory_fraction}")
        if num_pages is not None and num_pages < 2:
            raise NfrtError(f"LLM: num_pages must be >= 2 (one is the scratch page), got {num_pages}")
        # One page to start: the cache is sized once the rest of the memory is known.
        self.engine = eng = Engine.from_schedule(schedule, weights, device=device, seed=seed, num_pages=1,
                                                 dtype=dtype, use_partitions=use_partitions)
        self.config, self.device = eng.config, eng.device
        self.cuda = self.device.type == "cuda"
        meta = eng.schedule.metadata
        max_seq_len = max_seq_len or self.config.max_position
        if not 1 <= max_seq_len <= self.config.max_position:
            raise NfrtError(f"LLM: max_seq_len {max_seq_len} must be in [1, max_position "
                            f"{self.config.max_position}] of {self.config.name}")
        self.max_seq_len = max_seq_len
        prefill_tokens = meta.dense_batch - meta.batch.decode_tokens
        rows = default_prefill_rows(prefill_tokens) if prefill_rows is None else prefill_rows
        self.shape = ServingShape(meta.dense_batch, meta.batch.decode_tokens, rows,
                                  math.ceil(max_seq_len / PAGE_SIZE))
        self.static = StaticBatch(self.shape, self.device, PAGE_SIZE, scratch_page=0)
        # Sampled ids by iteration parity, shared by both shapes (the dense one has the most rows),
        # so an iteration gathers its fed-back tokens whichever shape ran the one before.
        s = self.shape.num_samples
        self.sampled = [torch.zeros(s, dtype=torch.int64, device=self.device) for _ in range(2)]
        self.host_out = [torch.zeros(s, dtype=torch.int64, pin_memory=self.cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)] if self.cuda else []
        eng.bind(self.static.buffers)
        self.kv = eng.model.kv
        self.kv.allocator.ensure(SCRATCH_SEQ, 1)
        self.instrument = instrument
        self.loop = LoopStats()  # the last stream's accounting
        self.dense = _Shape("dense", eng, self.static)
        transient = self._warmup(self.dense)
        self.drain: _Shape | None = None  # the decode-only shape, when there is a prefill region to skip
        drain_transient = 0
        if drain_shape and self.shape.decode_slots and self.shape.prefill_tokens:
            dshape = self.shape.decode_only()
            self.drain = _Shape("decode_only", self._decode_only_engine(dshape.dense_batch),
                                StaticBatch(dshape, self.device, PAGE_SIZE, scratch_page=0))
            self.drain.engine.bind(self.drain.static.buffers)
            drain_transient = self._warmup(self.drain)
            eng.bind(self.static.buffers)  # the model's logits at the dense size while the cache is sized
        dtype = eng.model.dtype
        if num_pages is None:
            num_pages = self._pages_for_memory(transient, drain_transient, kv_memory_fraction, dtype)
        self.kv = eng.model.kv = KVCache.for_model(self.config, num_pages, self.device, dtype)
        if self.kv.allocator.ensure(SCRATCH_SEQ, 1) != [0]:
            raise NfrtError("LLM: the scratch page must be page 0")
        self.graph = False
        if self.cuda and cuda_graph:
            for shape in (self.dense, self.drain):  # one graph per shape, captured once
                if shape is not None:
                    self._capture(shape)
            self.graph = True
        self._busy = False
        self.stats: dict = {}

    # ---- shapes and sizing -----------------------------------------------------------------------
    def _decode_only_engine(self, slots: int) -> Engine:
        """The schedule's model over a one-stream sequential schedule of `slots` decode tokens
        (every op on all of them, all SMs): the drain's engine. It shares the weights, the KV cache
        and the activation buffers (the two shapes never run at once: one stream)."""
        meta = self.engine.schedule.metadata
        comp = BatchComposition(slots, slots, 0, meta.batch.decode_context, 0)
        seq = Schedule.sequential(replace(meta, dense_batch=slots, batch=comp), self.engine.schedule.layer)
        return Engine(seq, self.engine.model, use_partitions=False)

    def _capture(self, shape: _Shape) -> None:
        shape.engine.bind(shape.static.buffers)  # sizes the model's sample/logit buffers for the shape
        shape.engine.capture()  # keeps the buffers its graph writes alive across later binds

    def _warmup(self, shape: _Shape) -> int:
        """One padding-only iteration (compiles kernels); returns its transient device bytes."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        self._launch(None, 0, shape, graph=False)
        if not self.cuda:
            return 0
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - base

    def _pages_for_memory(self, transient: int, drain_transient: int, fraction: float,
                          dtype: torch.dtype) -> int:
        per_page = KVCache.bytes_per_page(self.config, dtype)
        if not self.cuda:
            return max(2, min(CPU_KV_BUDGET_BYTES // per_page, 64 * self.shape.pages_per_seq + 1))
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        # A fraction of the memory that is free now (other allocations in this process, such as
        # another engine, are not ours to count), less what the graph's private pool and the
        # sampling ops need: about one forward's transient memory each (and the drain graph's pool).
        budget = fraction * free - 2 * transient - drain_transient
        pages = int(budget // per_page)
        if pages < 2:
            raise NfrtError(f"LLM: no device memory left for the KV cache ({free / 2**30:.2f} GiB free, "
                            f"{transient / 2**30:.2f} GiB transient per forward)")
        return pages

    @property
    def num_pages(self) -> int:
        return self.kv.num_pages

    @property
    def usable_pages(self) -> int:
        """Pages requests can hold (all but the scratch page)."""
        return self.kv.num_pages - 1

    @property
    def free_pages(self) -> int:
        """Pages free now; equals `usable_pages` whenever no generation is running."""
        return self.kv.allocator.free_pages

    # ---- one iteration --------------------------------------------------------------------------
    def _launch(self, plan: Plan | None, iteration: int, shape: _Shape, graph: bool | None = None,
                row: int | None = None) -> None:
        """Stage `plan` and enqueue upload, forward, sampling and the read-back (no host wait).
        `row`: the plan's row in `self.loop` when instrumented."""
        which = iteration % 2
        watch = Stopwatch() if row is not None else None
        sampling = shape.static.fill(plan, self.kv.allocator.pages, which)
        if watch is not None:
            self.loop.host(row, "fill", watch.lap())
        ev = self.loop.events(row)  # e0..e3 around upload, forward, sampling (None: not timed)
        if ev is not None:
            ev[0].record()
        shape.static.upload(which, self.sampled[1 - which])
        if ev is not None:
            ev[1].record()
        use_graph = self.graph if graph is None else graph
        logits = shape.engine.replay() if use_graph else shape.engine.run()
        if ev is not None:
            ev[2].record()
        d = shape.static.dev
        out = self.sampled[which][: shape.static.shape.num_samples]
        sample(logits, d["temperature"], d["top_p"], d["keys"], d["steps"], out, greedy_only=not sampling)
        self.host_out[which].copy_(self.sampled[which], non_blocking=self.cuda)
        if ev is not None:
            ev[3].record()
        if self.cuda:
            self.events[which].record()
        if watch is not None:
            self.loop.host(row, "enqueue", watch.lap())

    def _collect(self, plan: Plan, row: int | None = None) -> Iterator[Completion]:
        """Wait for `plan`'s sampled ids; append them; yield the requests that finished."""
        which = plan.iteration % 2
        watch = Stopwatch() if row is not None else None
        if self.cuda:
            self.events[which].synchronize()
        if watch is not None:
            self.loop.host(row, "wait", watch.lap())
        tokens = self.host_out[which].tolist()
        for it in plan.decode + plan.prefill:
            if it.sample_row < 0:
                continue
            r = it.request
            r.outputs.append(tokens[it.sample_row])
            if r.pending is not None and r.pending[0] == plan.iteration:
                r.pending = None
            if r.done:
                yield Completion(r.index, tuple(r.outputs), "length")
        if watch is not None:
            self.loop.host(row, "collect", watch.lap())

    # ---- public API -----------------------------------------------------------------------------
    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 16,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Iterator[Completion]:
        """Finished requests in order of completion (rejected ones first, with `error` set).
        Bad input (empty prompt, token outside the vocabulary, ...) raises NfrtError here."""
        return self._run(self._requests(prompts, max_new_tokens, SamplingParams(temperature, top_p, seed)))

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 16,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
        """Generated token ids per request, in the prompts' order. Requests that can never fit are
        rejected: the others still complete, then RejectedError carries their outputs."""
        outputs: list[list[int] | None] = [None] * len(prompts)
        errors: dict[int, str] = {}
        for c in self.stream(prompts, max_new_tokens, temperature, top_p, seed):
            if c.error is not None:
                errors[c.index] = c.error
            else:
                outputs[c.index] = list(c.token_ids)
        if errors:
            first = min(errors)
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise RejectedError(errors[first] + more, outputs, errors)
        return outputs  # type: ignore[return-value]

    def _requests(self, prompts, max_new_tokens, params: SamplingParams) -> list[Request]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise NfrtError("generate: prompts must be a list of token-id lists")
        n = len(prompts)
        if isinstance(max_new_tokens, Sequence):
            if len(max_new_tokens) != n:
                raise NfrtError(f"generate: {len(max_new_tokens)} max_new_tokens for {n} prompts")
            news = list(max_new_tokens)
        else:
            news = [max_new_tokens] * n
        vocab = self.config.vocab_size
        out = []
        for i, (p, m) in enumerate(zip(prompts, news, strict=True)):
            if not isinstance(m, (int, np.integer)) or isinstance(m, bool) or m < 1:
                raise NfrtError(f"request {i}: max_new_tokens must be an integer >= 1, got {m!r}")
            if isinstance(p, (str, bytes)):
                raise NfrtError(f"prompt {i}: must be a list of token ids, got a string")
            arr = np.asarray(p.tolist() if isinstance(p, torch.Tensor) else list(p))
            if arr.size == 0:
                raise NfrtError(f"prompt {i} is empty: a request needs at least one token")
            if arr.ndim != 1 or arr.dtype.kind not in "iu":
                raise NfrtError(f"prompt {i}: token ids must be integers, got {arr.dtype} "
                                f"of shape {arr.shape}")
            bad = np.flatnonzero((arr < 0) | (arr >= vocab))
            if bad.size:
                j = int(bad[0])
                raise NfrtError(f"prompt {i}: token id {int(arr[j])} at position {j} is outside the "
                                f"vocabulary [0, {vocab}) of {self.config.name}")
            out.append(Request(index=i, prompt=tuple(arr.tolist()), max_new_tokens=int(m),
                               key=request_key(params.seed, i), temperature=float(params.temperature),
                               top_p=float(params.top_p)))
        return out

    def _run(self, requests: list[Request]) -> Iterator[Completion]:
        if self._busy:
            raise NfrtError("LLM: another stream is still running on this LLM (exhaust or close it first)")
        self._busy = True
        s = self.shape
        sched = Scheduler(self.kv.allocator, self.usable_pages, s.decode_slots, s.prefill_tokens,
                          s.prefill_rows, self.max_seq_len,
                          drain_slots=self.drain.slots if self.drain is not None else 0)
        stats = {"iterations": 0, "tokens": 0, "slots": 0, "start_s": time.perf_counter()}
        self.stats = stats
        self.loop = loop = LoopStats(self.instrument, self.cuda)
        try:
            for r in requests:
                err = sched.add(r)
                if err is not None:
                    yield Completion(r.index, (), "rejected", err)
            k, inflight, inflight_row = 0, None, None
            while True:
                watch = Stopwatch()
                plan = sched.schedule(k)
                row = None
                if plan is not None:
                    shape = self.drain if plan.decode_only else self.dense
                    row = loop.add(plan, shape.name, shape.slots)
                    loop.host(row, "plan", watch.lap())
                    self._launch(plan, k, shape, row=row)
                    if k == 0:  # validation, admission and the first plan: the device waits for them
                        stats["first_launch_s"] = time.perf_counter() - stats["start_s"]
                    stats["iterations"] += 1
                    stats["tokens"] += plan.num_tokens
                    stats["slots"] += shape.slots
                if inflight is not None:
                    yield from self._collect(inflight, inflight_row)
                if plan is None:
                    break
                inflight, inflight_row, k = plan, row, k + 1
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)  # nothing in flight touches the pages freed next
            sched.abort()
            self._busy = False
            stats["wall_s"] = time.perf_counter() - stats["start_s"]
            if self.cuda:
                loop.read_device()
            stats["loop"] = loop.summary()

    # ---- measurement ----------------------------------------------------------------------------
    def time_iteration(self, iters: int = 20, warmup: int = 3, warm_s: float = 0.0) -> dict[str, float]:
        """Median time of the serving forward on the schedule's own batch composition (decode slots
        at its mean context, the prefill region laid out by `nfrt.layout.prefill_chunks` in prompts of
        its `prefill_context`, as `make_batch` does), back to back with no host work between: the
        iteration-level speed beside which end-to-end throughput is read.

        `warm_s`: keep replaying (untimed) for at least this long before the timed replays, so that
        a GPU at its power cap settles to the clock it keeps under sustained load, as while serving."""
        if self._busy:
            raise NfrtError("LLM: time_iteration while a stream is running")
        comp, s = self.engine.schedule.metadata.batch, self.shape
        free = self.free_pages
        want_ctx = max(1, min(comp.decode_context, self.max_seq_len))
        # the prefill region laid out as the schedule's synthetic batch (nfrt.layout.prefill_chunks):
        # where real chunked prefill puts its tokens in the prompts, on average
        pre_ctx = max(1, min(comp.prefill_context or 1, self.max_seq_len))
        chunks = prefill_chunks(s.prefill_tokens, pre_ctx)
        if len(chunks) > s.prefill_rows:  # too many prompts for the rows: longer ones, fewer runs
            fewer = math.ceil(s.prefill_tokens / max(1, s.prefill_rows - 1))
            pre_ctx = min(self.max_seq_len, max(pre_ctx, fewer))
            chunks = prefill_chunks(s.prefill_tokens, pre_ctx)
        pre_pages = sum(math.ceil((a + n) / PAGE_SIZE) for a, n in chunks)
        per_dec = max(1, (free - pre_pages) // max(1, s.decode_slots)) if s.decode_slots else 0
        ctx = min(want_ctx, per_dec * PAGE_SIZE) if s.decode_slots else 0
        if s.decode_slots and ctx < 1:
            raise NfrtError("LLM: the KV cache is too small to time the schedule's batch")
        base = 1 << 40
        reqs = []
        decode = []
        # random token ids, as real prompts have: a GPU at its power cap clocks a batch of one repeated
        # token (identical activation rows) higher than real data (H200, 2026-11-21: 1725 vs 1590 MHz)
        rng = np.random.default_rng(0)

        def ids(n: int) -> tuple[int, ...]:
            return tuple(rng.integers(0, self.config.vocab_size, n).tolist())

        for j in range(s.decode_slots):
            r = Request(base + j, (0,) * (ctx - 1) + ids(1), 1, num_sampled=1)
            decode.append(Item(r, ctx - 1, 1, j))
            reqs.append(r)
        prefill = []
        for k, (a, n) in enumerate(chunks):
            r = Request(base + s.decode_slots + k, (0,) * a + ids(n), 1, num_sampled=1)
            prefill.append(Item(r, a, n, s.decode_slots + k))
            reqs.append(r)
        try:
            for it in decode + prefill:
                self.kv.allocator.ensure(it.request.index, it.start + it.length)
            plan = Plan(0, tuple(decode), tuple(prefill))

            def once() -> float:  # one iteration, host-timed from launch to its sampled ids
                t0 = time.perf_counter()
                self._launch(plan, 0, self.dense)
                if self.cuda:
                    self.events[0].synchronize()
                return time.perf_counter() - t0

            warm_until = time.perf_counter() + warm_s
            while time.perf_counter() < warm_until:  # untimed: the clock settles
                once()
            times = [once() for _ in range(warmup + iters)][warmup:]
            if self.cuda:  # device time of the forward alone, with events around back-to-back replays
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    self.engine.replay() if self.graph else self.engine.run()
                end.record()
                end.synchronize()
                forward_us = start.elapsed_time(end) * 1e3 / iters
            else:
                forward_us = float(np.median(times)) * 1e6
        finally:
            for r in reqs:
                self.kv.allocator.free(r.index)
        # what attention reads in this batch, as nfrt.loop_stats counts it per serving iteration
        reads = {"decode_context_sum": sum(it.start + 1 for it in decode),
                 "prefill_position_sum": position_sum(chunks)}
        return {"forward_us": forward_us, "iteration_us": float(np.median(times)) * 1e6,
                "tokens_per_s": s.dense_batch / (forward_us * 1e-6), "decode_context": ctx,
                "prefill_context": pre_ctx, "warm_s": warm_s, **reads}
