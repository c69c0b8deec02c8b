"""GPU timing of the runtime's own layer ops: the `Timer` behind `nfsearch profile`.

Every point runs exactly what the runtime runs, `nfrt.model.Model.run_op(layer, op, 0, tokens)`
on a synthetic batch (`nfrt.batch.make_batch`), on the stream of a disjoint green-context
partition (`nfrt.partition.make_partitions`; the ordinary stream for all SMs). N back-to-back
launches, rotating over several layers' weights so that L2 does not hold them, are captured in
one CUDA graph; the graph is replayed once to warm up, then `repeats` times between CUDA events,
and the median replay / N is the latency. Decode and prefill attention read KV pages scattered
at random over a 2 GiB pool per layer (far larger than L2): pages are aliased across requests,
which is free for a read-only timing and lets 4096 requests x 4096 tokens fit on any GPU.

Under tensor parallelism (tp > 1, one process per GPU, `nfrt.tp.TPGroup`) the model is the rank's
shard (`shard_config`, `random_shard_weights`): latencies are per GPU. The network ops
(attn_allreduce, mlp_allreduce: `Model.run_op` all-reduces hidden[:tokens]) run on the point's
stream through `TPGroup.comm(num_sms)`, NCCL's CTAs capped at the partition (`comm(None)` on all
SMs), captured and timed like every other op. Every count that decides how many collectives a
rank issues (launches per graph, replays) is first agreed between the ranks (the max), so the
ranks issue identical collective sequences; that agreement also lines the ranks up per point.

The all-gather form of the attention output (attn_allgather, o_proj_col, o_allgather; TP only)
needs the `o_proj_col` weights (`random_shard_weights(..., gather_form=True)`), and `Model.run_op`
runs those ops on tokens [0, Model.gather_tokens) and o_proj / attn_allreduce on the rest: every
launch sets `gather_tokens` right before its `run_op` (the point's tokens for a gather op, 0 for
every other op, so o_proj and attn_allreduce keep all their tokens), so a graph captures the
tokens its point names whatever ran before it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import math
import statistics
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from nfrt import kernels as K
from nfrt.batch import BatchBuffers, BatchShape, make_batch
from nfrt.config import BatchComposition, ModelConfig
from nfrt.gemm_target import enabled as gemm_target_enabled
from nfrt.gemm_target import sized_for
from nfrt.kvcache import PAGE_SIZE, KVCache
from nfrt.model import Model
from nfrt.partition import make_partitions
from nfrt.tp import TPGroup, random_shard_weights, shard_config

from nfsearch.bench_measure import allreduce_busbw_gbps, ceilings, driver_version
from nfsearch.errors import NfsearchError
from nfsearch.opgraph import GATHER_OPS
from nfsearch.profiler.clock import ClockProbe
from nfsearch.profiler.grid import Point, ProfileGrid, heat_label, profiles_gather
from nfsearch.profiler.run import NVLINK_PROBE_MIB, CoRun, Tick

MAX_LAUNCHES = 64  # launches per captured graph (short ops); long ops get fewer, at least 1


class AliasAllocator:
    """A page allocator (the `nfrt.kvcache.PageAllocator` interface `BatchBuffers.prepare` uses) that
    maps each sequence's pages to random pages of a fixed pool, shared between sequences."""

    def __init__(self, num_pages: int, page_size: int = PAGE_SIZE, seed: int = 0) -> None:
        self.num_pages, self.page_size, self.seed = num_pages, page_size, seed
        self._pages: dict[int, list[int]] = {}

    def ensure(self, seq_id: int, num_tokens: int) -> list[int]:
        n = math.ceil(num_tokens / self.page_size)
        have = self._pages.get(seq_id, [])
        if len(have) < n:
            rng = np.random.default_rng([self.seed, seq_id])
            have = rng.integers(0, self.num_pages, size=n).tolist()
            self._pages[seq_id] = have
        return list(have)

    def pages(self, seq_id: int) -> list[int]:
        return list(self._pages.get(seq_id, ()))

    def slot(self, seq_id: int, position: int) -> int:
        return self._pages[seq_id][position // self.page_size] * self.page_size + position % self.page_size


class GpuTimer:
    """Times the runtime's ops on this GPU; see the module docstring."""

    def __init__(self, model: ModelConfig, tp: int, grid: ProfileGrid, device: int = 0,
                 rotate_layers: int = 4, kv_pool_bytes: int = 2 << 30, target_us: float = 500.0,
                 seed: int = 0, group: TPGroup | None = None, gather_form: bool | None = None) -> None:
        """`group`: this rank's tensor-parallel group (required for tp > 1; its device is used).
        `gather_form`: build the all-gather form's weights and buffers (default: iff a profile of
        this model at this tp holds its ops, `nfsearch.profiler.grid.profiles_gather`)."""
        if tp > 1 and (group is None or group.size != tp):
            got = "none" if group is None else f"one of {group.size} ranks"
            raise NfsearchError(f"--tp {tp}: the timer needs a tensor-parallel group of {tp} ranks, "
                                f"got {got}")
        self.group = group if tp > 1 else None
        if self.group is not None:
            device = self.group.device.index
        torch.cuda.set_device(device)
        self.dev = torch.device("cuda", device)
        self.model, self.tp, self.grid, self.target_us, self.seed = model, tp, grid, target_us, seed
        self.layers = min(rotate_layers, model.num_layers)
        full = replace(model, num_layers=self.layers)
        cfg = shard_config(full, tp)  # the rank's shard: per-GPU shapes
        self.cfg = cfg
        dtype = torch.bfloat16
        rank = self.group.rank if self.group is not None else 0
        self.gather_form = profiles_gather(model, tp) if gather_form is None else bool(gather_form)
        self.w = random_shard_weights(full, rank, tp, seed=seed, device=self.dev, dtype=dtype,
                                      gather_form=self.gather_form)
        pages = max(64, kv_pool_bytes // (2 * PAGE_SIZE * cfg.kv_size * 2))
        self.kv = KVCache(self.layers, pages, cfg.num_kv_heads, cfg.head_dim, self.dev, dtype)
        for t in self.kv.k + self.kv.v:
            t.normal_(0.0, 1.0)  # never time on zeros
        self.alloc = AliasAllocator(pages, seed=seed)
        inter_t = grid.interference_tokens
        held_t = max(grid.sustained_tokens, default=0)  # the sustained table's points
        self.max_all = max(grid.tokens[-1], inter_t, held_t)
        self.max_dec = max(grid.decode_requests[-1], grid.interference_decode[0], held_t)
        self.max_pre = max(grid.prefill_tokens[-1], inter_t, held_t)
        self.m = self.model_copy()
        self._buffers: dict[tuple[str, int], BatchBuffers] = {}
        self._bound: tuple[str, int] | None = None
        self._est: dict[tuple[str, int, int], float] = {}  # per-launch us, for choosing N
        # One memory pool for all solo graphs; a tiny graph that lives as long as the timer keeps
        # the pool alive (PyTorch deletes a pool when its last graph dies, and a dead handle asserts).
        self._pool = torch.cuda.graph_pool_handle()
        anchor_x = torch.zeros(1, device=self.dev)
        anchor = torch.cuda.CUDAGraph()
        with torch.cuda.stream(torch.cuda.Stream(self.dev)):
            anchor.capture_begin(pool=self._pool)
            anchor_x.add_(1.0)
            anchor.capture_end()
        self._anchor = (anchor, anchor_x)
        self.props = torch.cuda.get_device_properties(self.dev)
        self.clock = ClockProbe(self.dev)

    # ---- tensor parallelism ---------------------------------------------------------------
    def agree(self, values: list[float]) -> list[float]:
        """The elementwise max of `values` over the ranks (the values themselves at tp 1). Called
        on the ordinary stream between timings; every rank calls it at the same points."""
        if self.group is None:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group.default)
        return t.tolist()

    def use_comm(self, num_sms: int | None) -> None:
        """Network ops captured from now on run on the communicator for a stream of `num_sms` SMs
        (None: all SMs), created and initialised (eagerly, on the ordinary stream) at first use."""
        if self.group is None:
            return
        comm = self.group.comm(num_sms if num_sms and num_sms < self.grid.num_sms else None)
        if comm is not self.m.comm:
            probe = torch.ones(8, device=self.dev)
            self.group.all_reduce(probe, comm)  # NCCL creates the communicator here, not in a capture
            torch.cuda.synchronize(self.dev)
            self.m.comm = comm

    # ---- metadata and ceilings -----------------------------------------------------------
    def stamp(self) -> dict[str, Any]:
        import triton

        return {"gpu_name": torch.cuda.get_device_name(self.dev), "num_sms": self.props.multi_processor_count,
                "driver": driver_version(self.dev.index) or "", "cuda": torch.version.cuda or "",
                "torch": torch.__version__, "triton": triton.__version__,
                "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}

    def describe(self) -> str:
        return (f"Latency: median of {self.grid.repeats} CUDA-graph replays of N back-to-back "
                f"Model.run_op launches (N chosen for ~{self.target_us:g} us per replay, 1..{MAX_LAUNCHES}) "
                f"rotating over {self.layers} layers' weights, after a warm-up replay; random bf16 "
                f"weights, activations and KV pages (2 GiB pool per layer, random page tables); "
                f"attn_prefill tokens are make_batch chunks of prompts of length `context`. Interference: "
                f"each op looped in its own CUDA graph (~3 ms), both replayed concurrently for "
                f"{self.grid.corun_s:g} s on make_layout ranges compute [0, c), memory [top - m, top) "
                f"after a warm-up co-run (power-capped steady state); solo timed the same way, same stream. "
                f"sm_clock_mhz: the SM clock right after each point's timed replays, from a one-warp "
                f"%clock64 spin timed with CUDA events (nfsearch.profiler.clock). Sustained table: "
                f"each point replayed for {self.grid.sustained_s:g} s on its partition, each replay "
                f"between two of a heater, {heat_label(self.grid)} (nfsearch.profiler.held), factor = "
                f"median replay of the second half / the profile's own latency of the point."
                + (" GEMMs on a partition of s SMs run through cuBLASLt with SM count target s "
                   "(nfrt.gemm_target), as in the engine." if gemm_target_enabled() else "")
                + (f" Tensor parallel over {self.tp} GPUs: each op on the rank's shard (per-GPU shapes); "
                   f"attn_allreduce / mlp_allreduce are NCCL all-reduces of [tokens, hidden] bf16 on a "
                   f"communicator capped at the partition's SMs (max 32 CTAs), timed the same way on rank "
                   f"0, launch and replay counts agreed between the ranks; the network co-runs place "
                   f"attn_allreduce on the top m SMs and each GEMM or decode attention on [0, c)."
                   if self.group is not None else "")
                + (" The all-gather form's ops: attn_allgather (NCCL all-gather of the [tokens, q/tp] "
                   "attention output) and o_allgather (all-gather of the [tokens, hidden/tp] O slices, "
                   "then the token-major copy) on the same communicators, o_proj_col (the gathered "
                   "output permuted to [tokens, q], then the [q, hidden/tp] column-parallel GEMM), each "
                   "on all `tokens` of the point (Model.gather_tokens = tokens)."
                   if self.group is not None and self.gather_form else ""))

    def ceilings(self) -> dict[str, float]:
        peak_tflops, hbm_gbps = ceilings(self.dev)
        out = {"peak_tflops": peak_tflops, "hbm_gbps": hbm_gbps}  # the same GEMM and copy as bench
        if self.group is not None:
            out["nvlink_gbps"] = allreduce_busbw_gbps(self.group, NVLINK_PROBE_MIB << 20)
        return out

    def model_copy(self) -> Model:
        """A Model over the timer's weights and KV cache with activation buffers of its own, filled
        with random values (never time on zeros; the layer heater runs on one of these)."""
        m = Model(self.cfg, self.w, max(self.max_all, self.max_dec, self.max_pre), self.kv, self.dev,
                  tp=self.group)
        for name in ("hidden", "residual", "normed", "qkv", "attn_out", "gate_up", "act", "moe_gate_up",
                     "moe_act", "router_logits", "gather_attn", "attn_full", "o_col", "gather_hidden"):
            if hasattr(m, name):
                getattr(m, name).normal_(0.0, 1.0)
        return m

    # ---- batches and launchers -----------------------------------------------------------
    def batch_of(self, op: str, context: int) -> BatchBuffers:
        """The synthetic batch an op's points read (bound to the timer's model)."""
        kind = {"attn_decode": "decode", "attn_prefill": "prefill"}.get(op, "all")
        return self._bind(kind, context if kind != "all" else 0)

    def _bind(self, kind: str, context: int) -> BatchBuffers:
        key = (kind, context)
        if context > self.cfg.max_position:  # past the rope table: the kernel would read other memory
            raise NfsearchError(f"profile point: context {context} exceeds max_position "
                                f"{self.cfg.max_position} of {self.cfg.name} (fit the grid with "
                                "nfsearch.profiler.grid.fit_to_model)")
        if key not in self._buffers:
            if kind == "all":
                comp = BatchComposition(self.max_all, self.max_all, 0, 128, 0)
            elif kind == "decode":
                comp = BatchComposition(self.max_dec, self.max_dec, 0, context, 0)
            else:
                comp = BatchComposition(self.max_pre, 0, self.max_pre, 0, context)
            # distinct sequence ids per batch: the allocator keeps each sequence's pages
            # attn_prefill's reference layout stays prompts from position 0 (nfsearch.plan.reference_work)
            batch = make_batch(comp, self.cfg.vocab_size, seed=self.seed,
                               first_seq_id=len(self._buffers) * 1_000_000, layout="from_zero")
            buf = BatchBuffers(BatchShape.of(batch), self.dev)
            buf.prepare(batch, self.alloc)
            self._buffers[key] = buf
        buf = self._buffers[key]
        if self._bound != key:
            self.m.bind(buf)
            self._bound = key
        return buf

    def _launcher(self, op: str, tokens: int, context: int):
        """Bind the op's batch; return fn(i) that issues launch i (layer i mod the rotation)."""
        m, t, L = self.m, tokens, self.layers
        buf = self.batch_of(op, context)
        if op == "final_norm":  # Model.tail's pieces, on `tokens` tokens
            return lambda i: K.fused_add_rms_norm(m.hidden[:t], m.residual[:t], m.w["final_norm"], m.eps,
                                                  m.normed[:t], False)
        if op == "lm_head":
            logits = m.logits_local if m.tp is not None else m.logits  # TP: the rank's vocab shard
            def lm_head(i: int) -> None:
                torch.index_select(m.normed, 0, buf.sample_positions[:t], out=m.sampled[:t])
                torch.mm(m.sampled[:t], m.w["lm_head"].t(), out=logits[:t])
            return lm_head
        gather_tokens = t if op in GATHER_OPS else 0  # o_proj / attn_allreduce: all t tokens

        def run(i: int) -> None:
            m.gather_tokens = gather_tokens  # read by run_op as it issues the launch
            m.run_op(i % L, op, 0, t)
        return run

    # ---- timing --------------------------------------------------------------------------
    def _capture(self, stream: torch.cuda.Stream, fn, n: int,
                 shared_pool: bool = True) -> torch.cuda.CUDAGraph:
        """Capture n launches. Solo graphs live one at a time and share one memory pool (a private
        pool per graph stays reserved after the graph dies: thousands of them ran an H100 out of
        memory); graphs that replay concurrently (co-runs) get private pools, so that their
        temporaries cannot alias."""
        with torch.cuda.stream(stream), sized_for(stream):  # GEMMs sized for the partition, as the engine
            fn(0)  # eager warm-up on this stream: Triton JIT, cuBLAS workspace, allocator
            g = torch.cuda.CUDAGraph()
            if shared_pool:
                g.capture_begin(pool=self._pool)
            else:
                g.capture_begin()
            try:
                for i in range(n):
                    fn(i)
            finally:
                g.capture_end()
        return g

    def _replays_us(self, g: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, reps: int) -> list[float]:
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
        with torch.cuda.stream(stream):
            g.replay()  # warm-up replay
            ev[0].record(stream)
            for r in range(reps):
                g.replay()
                ev[r + 1].record(stream)
        stream.synchronize()
        return [ev[r].elapsed_time(ev[r + 1]) * 1e3 for r in range(reps)]

    def _launches(self, est_us: float) -> int:
        return max(1, min(MAX_LAUNCHES, math.ceil(self.target_us / max(est_us, 1.0))))

    def _time_point(self, stream, op: str, t: int, c: int, num_sms: int) -> tuple[float, float]:
        """(latency us, SM clock MHz right after the timed replays)."""
        est = self._est.get((op, t, c))
        est = est * self.grid.num_sms / num_sms if est is not None else self._est.get((op, -1, c), 50.0)
        est = self.agree([est])[0]  # under TP: the same launch and replay counts on every rank
        n = self._launches(est)
        reps = self.grid.repeats if est * n < 20e3 else max(3, self.grid.repeats // 2)
        g = self._capture(stream, self._launcher(op, t, c), n)
        us = statistics.median(self._replays_us(g, stream, reps)) / n
        mhz = self.clock.mhz(stream)
        del g
        self._est[(op, t, c)] = us if num_sms == self.grid.num_sms else self._est.get((op, t, c), us)
        self._est[(op, -1, c)] = us  # the next token count of this op starts from here
        return us, mhz

    @contextlib.contextmanager
    def on_partition(self, num_sms: int) -> Iterator[torch.cuda.Stream]:
        """A stream on a green-context partition of `num_sms` SMs (an ordinary stream for all SMs);
        on exit the GPU is drained, the partition closed and the cached memory freed."""
        parts = make_partitions([num_sms], device=self.dev.index) if num_sms < self.grid.num_sms else None
        try:
            yield parts[0].stream if parts is not None else torch.cuda.Stream(self.dev)
        finally:
            torch.cuda.synchronize(self.dev)
            if parts is not None:
                parts.close()
            gc.collect()
            torch.cuda.empty_cache()

    def solo(self, num_sms: int, points: list[Point], tick: Tick) -> list[tuple[float, float]]:
        with self.on_partition(num_sms) as stream:
            self.use_comm(num_sms)
            out = []
            for op, t, c in points:
                out.append(self._time_point(stream, op, t, c, num_sms))
                tick(1)
            return out

    def sustained(self, num_sms: int, points: list[Point], tick: Tick) -> list[tuple[float, float]]:
        """(burst us, sustained us) per launch of each point on a partition of `num_sms` SMs, the
        sustained one between replays of the grid's heater (`nfsearch.profiler.held`)."""
        from nfsearch.profiler.held import held_points

        return held_points(self, num_sms, points, tick)

    def corun(self, top_sms: int, bottom_sms: int, bottom_ops: tuple[str, ...],
              top_ops: tuple[str, ...], tick: Tick) -> list[CoRun]:
        """Sustained co-runs on complementary placed partitions (`nfsearch.profiler.corun`)."""
        from nfsearch.profiler.corun import sustained_corun

        return sustained_corun(self, top_sms, bottom_sms, bottom_ops, top_ops, tick)
