"""The executor: runs a schedule's nano-ops over the model, layer after layer.

CPU: nano-ops of each layer in `schedule.topo_order()` (one thread, no streams).
CUDA: one stream per schedule stream (on its own green-context SM partition when the schedule has
several partitions), nano-ops issued in each stream's FIFO order, one event per cross-stream
dependency per layer. `capture()` records embed -> all layers -> tail into one CUDA graph over
the static buffers; `prepare(batch)` + `replay()` then run any batch of the same shape.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path

import torch

from nfrt.batch import Batch, BatchBuffers, BatchShape, make_batch, pages_needed
from nfrt.config import ModelConfig
from nfrt.errors import NfrtError, ScheduleError
from nfrt.gemm_target import sized_for
from nfrt.kvcache import KVCache
from nfrt.model import GATHER_OPS, NETWORK_OPS, Model, layer_ops
from nfrt.schedule import Schedule, load_schedule
from nfrt.tp import TPGroup, random_shard_weights, shard_config, shard_weights
from nfrt.weights import Weights, default_dtype, load_hf_weights, weight_shapes

_SHAPE_FIELDS = tuple(f.name for f in fields(ModelConfig) if f.name not in ("name", "max_position"))


def _mismatch(a: ModelConfig, b: ModelConfig) -> str | None:
    diff = [f for f in _SHAPE_FIELDS if getattr(a, f) != getattr(b, f)]
    return ", ".join(f"{f} {getattr(a, f)} vs {getattr(b, f)}" for f in diff) if diff else None


class Engine:
    """A model bound to one schedule; see the module docstring."""

    def __init__(self, schedule: Schedule, model: Model, use_partitions: bool = True, trace: bool = False,
                 green_full_stream: bool = False, serialize: bool = False) -> None:
        """`trace`: stamp each nano-op's start and end on its stream (`nfrt.trace`; off: no cost).
        `green_full_stream`: a partition over all SMs gets a green context too, instead of an
        ordinary stream (the profile times all-SM ops on an ordinary stream). `serialize` (a
        diagnosis): each nano-op also waits for the one issued before it, so every nano-op runs alone
        on its own partition inside the graph (solo times without interference)."""
        self.schedule = schedule
        self.model = model
        self.device = model.device
        self.config = model.config
        self.buffers: BatchBuffers | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self._graph_buffers: BatchBuffers | None = None
        self._graph_logits: torch.Tensor | None = None
        self._graph_outputs: tuple[torch.Tensor, ...] = ()
        self._check_ops()
        self._plan()
        self.tracer = None
        if trace:
            from nfrt.trace import Tracer

            self.tracer = Tracer(self.config.num_layers, len(self.order), self.device)
        self.green_full_stream = green_full_stream
        self.serialize = serialize
        self.partitions = None  # nfrt.partition.Partitions, when green contexts are in use
        self.streams: list = []
        if self.device.type == "cuda":
            self.streams = self._make_streams(use_partitions)
        self.comms = self._make_comms()

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_schedule(cls, path_or_schedule: str | os.PathLike[str] | Schedule,
                      weights: None | str | os.PathLike[str] | Weights = None,
                      device: torch.device | str | None = None, seed: int = 0, num_pages: int | None = None,
                      dtype: torch.dtype | None = None, use_partitions: bool = True,
                      trace: bool = False, tp_group: TPGroup | None = None) -> Engine:
        """Load the schedule, build the model (random weights from `seed`, a HF folder, or a weight
        dict) and a KV cache (`num_pages`, default: the schedule's synthetic batch plus headroom).

        A schedule with tp > 1 runs in every process of a tensor-parallel group (`tp_group`, by
        default joined from torchrun's environment); each rank holds its shard of the weights
        (full ones given as a dict or folder are sharded here) and of the KV cache. A schedule
        with gather_tokens > 0 also gets the all-gather form's weights (`o_proj_col`) and buffers."""
        schedule = (path_or_schedule if isinstance(path_or_schedule, Schedule)
                    else load_schedule(path_or_schedule))
        meta = schedule.metadata
        if meta.tp > 1:
            if tp_group is None:
                tp_group = TPGroup.from_env(None if device is None else torch.device(device).type)
            if tp_group.size != meta.tp:
                raise ScheduleError(f"schedule has tp {meta.tp}, but {tp_group.size} processes were launched")
            device = tp_group.device
        else:
            tp_group = None
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        dtype = dtype or default_dtype(device)
        config = meta.model_config
        rank, tp = (tp_group.rank, tp_group.size) if tp_group is not None else (0, 1)
        gather = meta.gather_tokens > 0  # validation guarantees tp > 1 then
        if weights is None:
            w = random_shard_weights(config, rank, tp, seed=seed, device=device, dtype=dtype,
                                     gather_form=gather)
        elif isinstance(weights, dict):
            w = weights
            for key, shape in weight_shapes(config).items():
                if key not in w or tuple(w[key].shape) != shape:
                    got = tuple(w[key].shape) if key in w else "missing"
                    raise ScheduleError(f"schedule is for {meta.model}: weight {key} should be {shape}, "
                                        f"got {got}")
        else:
            found, w = load_hf_weights(Path(weights), device, dtype)
            diff = _mismatch(config, found)
            if diff:
                raise ScheduleError(f"schedule is for {meta.model}, weights are {found.name} ({diff})")
            config = replace(found, name=meta.model)  # the checkpoint's max_position, the schedule's name
        if weights is not None and tp > 1:
            w = shard_weights(w, config, rank, tp, gather_form=gather)
        full_config, config = config, shard_config(config, tp)
        num_sms = (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda"
                   else meta.num_sms)  # on the CPU only the model and schema are checked
        schedule.check_compatible(meta.model, num_sms)
        if num_pages is None:
            synth = make_batch(meta.batch, full_config.vocab_size)
            num_pages = pages_needed(synth) + len(synth.decodes) + len(synth.prefills) + 16
        kv = KVCache.for_model(config, num_pages, device, dtype)
        model = Model(config, w, max_tokens=meta.dense_batch, kv_cache=kv, device=device, tp=tp_group,
                      gather_form=gather)
        return cls(schedule, model, use_partitions, trace=trace)

    def sequential_twin(self) -> Engine:
        """An engine over `schedule.as_sequential()` sharing this engine's weights, KV cache and
        activation buffers (run one at a time)."""
        return Engine(self.schedule.as_sequential(), self.model, use_partitions=False)

    def _check_ops(self) -> None:
        if self.schedule.metadata.gather_tokens and not self.model.gather_form:
            raise ScheduleError(f"schedule has gather_tokens {self.schedule.metadata.gather_tokens}, but the "
                                "model was built without the all-gather form (Model(gather_form=True))")
        known = set(layer_ops(self.config)) | set(NETWORK_OPS) | set(GATHER_OPS)
        for st in self.schedule.streams:
            for nop in st.nano_ops:
                bad = [op for op in nop.ops if op not in known]
                if bad:
                    raise ScheduleError(f"nano-op {nop.name}: op {bad[0]} does not exist in model "
                                        f"{self.config.name}; valid: {', '.join(sorted(known))}")

    def _plan(self) -> None:
        """Issue order, and the cross-stream dependencies that need events."""
        s = self.schedule
        self.stream_index = {st.name: i for i, st in enumerate(s.streams)}
        self.order = [(self.stream_index[st], s.nano_op(name)) for st, name in s.topo_order()]
        where = {n.name: self.stream_index[st.name] for st in s.streams for n in st.nano_ops}
        # Same-stream dependencies hold by FIFO order; only cross-stream ones need an event.
        self.cross = [d for d in s.dependencies if where[d.before] != where[d.after]]
        self.waits: dict[str, list[int]] = {}  # nano-op -> indices into self.cross it waits on
        self.records: dict[str, list[int]] = {}  # nano-op -> indices into self.cross it records
        for i, d in enumerate(self.cross):
            self.waits.setdefault(d.after, []).append(i)
            self.records.setdefault(d.before, []).append(i)

    def _make_streams(self, use_partitions: bool) -> list:
        """One CUDA stream per schedule stream, on a green context over its partition's SM range.

        Partitions are placed ranges of one SM layout (`nfrt.partition.make_layout`); ranges may
        overlap only between streams the schedule orders, so concurrent kernels never share SMs."""
        s = self.schedule
        parts = {p.name: p for p in s.partitions}
        if use_partitions and any(p.num_sms != s.metadata.num_sms for p in s.partitions):
            ranges = sorted(p.sm_range for p in s.partitions)
            if all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False)):
                # disjoint: exact sizes from one split (the largest may take the unaligned rest)
                from nfrt.partition import make_partitions

                index = {p.name: i for i, p in enumerate(s.partitions)}
                self.partitions = make_partitions([p.num_sms for p in s.partitions],
                                                  device=self.device.index or 0)
                return [self.partitions[index[st.partition]].stream for st in s.streams]
            from nfrt.partition import make_layout

            self.partitions = make_layout(device=self.device.index or 0)
            top = max(p.first_sm + p.num_sms for p in s.partitions if p.num_sms != s.metadata.num_sms)
            if top > self.partitions.aligned:
                raise ScheduleError(f"schedule places partitions up to SM slot {top}, but this GPU's "
                                    f"driver splits only {self.partitions.aligned} SMs into "
                                    f"{self.partitions.granularity}-SM groups: re-solve for this GPU")
            full = s.metadata.num_sms
            # A partition over all SMs needs no fence (the schedule orders it against every other
            # stream): an ordinary stream, as the profile timed it, unless asked otherwise.
            return [torch.cuda.Stream(self.device)
                    if parts[st.partition].num_sms == full and not self.green_full_stream
                    else self.partitions.stream(parts[st.partition].first_sm, parts[st.partition].num_sms)
                    for st in s.streams]
        # Every stream on all SMs (or partitions disabled): plain streams.
        return [torch.cuda.Stream(self.device) for _ in s.streams]

    def _make_comms(self) -> list:
        """Per schedule stream, the process group its network nano-ops use (None: no TP, or a
        stream without network ops). Lanes count network streams, so no two share a communicator;
        NCCL's CTAs are capped at the partition the stream is fenced to."""
        tp = self.model.tp
        comms: list = [None] * len(self.schedule.streams)
        if tp is None:
            return comms
        parts = {p.name: p for p in self.schedule.partitions}
        lane = 0
        for i, st in enumerate(self.schedule.streams):
            if any(op in NETWORK_OPS for nop in st.nano_ops for op in nop.ops):
                sms = parts[st.partition].num_sms
                fenced = self.partitions is not None and sms != self.schedule.metadata.num_sms
                comms[i] = tp.comm(sms if fenced else None, lane)
                lane += 1
        return comms

    # ---- batches -------------------------------------------------------------------------
    def prepare(self, batch: Batch) -> None:
        """Copy `batch` into the static buffers (new buffers, and a stale graph, if the shape changed)."""
        if batch.num_tokens > self.schedule.metadata.dense_batch:
            raise ScheduleError(f"batch has {batch.num_tokens} tokens, more than the schedule's dense_batch "
                                f"{self.schedule.metadata.dense_batch}")
        if batch.num_decode != self.schedule.metadata.batch.decode_tokens:
            raise ScheduleError(f"batch has {batch.num_decode} decode tokens, the schedule is for "
                                f"{self.schedule.metadata.batch.decode_tokens}")
        longest = max(batch.seq_lengths().values())
        if longest > self.config.max_position:
            raise NfrtError(f"batch: a sequence of {longest} positions exceeds max_position "
                            f"{self.config.max_position} of {self.config.name}")
        ps = self.model.kv.page_size
        if self.buffers is None or not self.buffers.fits(batch, ps):
            self.buffers = BatchBuffers(BatchShape.of(batch, ps), self.device)
        self.buffers.prepare(batch, self.model.kv.allocator)
        self.model.bind(self.buffers)

    def bind(self, buffers: BatchBuffers) -> None:
        """Use static buffers that the caller fills itself (the serving loop, `nfrt.staging`) as the
        prepared batch; `capture()` then records a graph over them and `replay()` reads them."""
        if buffers.num_tokens != self.schedule.metadata.dense_batch or (
                buffers.num_decode != self.schedule.metadata.batch.decode_tokens):
            raise ScheduleError(f"buffers of {buffers.num_tokens} tokens ({buffers.num_decode} decode) "
                                f"do not match the schedule's {self.schedule.metadata.dense_batch} "
                                f"({self.schedule.metadata.batch.decode_tokens} decode)")
        self.buffers = buffers
        self.model.bind(buffers)

    def synthetic_batch(self, seed: int = 0) -> Batch:
        """The schedule's batch composition as a concrete batch (`nfrt.batch.make_batch`)."""
        return make_batch(self.schedule.metadata.batch, self.config.vocab_size, seed=seed)

    def run(self, batch: Batch | None = None) -> torch.Tensor:
        """Eager forward of `batch` (or of the prepared one) -> float32 logits [samples, vocab]."""
        if batch is not None:
            self.prepare(batch)
        self._bound()
        logits = self._forward()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return logits.float().clone()

    def _bound(self) -> BatchBuffers:
        if self.buffers is None:
            raise NfrtError("engine: no batch prepared (call prepare(batch) or run(batch) first)")
        self.model.bind(self.buffers)
        return self.buffers

    # ---- execution -----------------------------------------------------------------------
    def _forward(self) -> torch.Tensor:
        m, tr = self.model, self.tracer
        # the split between the two forms of the attention output is this schedule's (a twin
        # sharing the model has its own); read when ops are issued, so also fixed in a graph
        m.gather_tokens = self.schedule.metadata.gather_tokens
        if tr is not None:
            from nfrt.trace import ITER_END, ITER_START

            tr.stamp(ITER_START)
        m.embed()
        if self.device.type != "cuda":
            for layer in range(self.config.num_layers):
                for i, (si, nop) in enumerate(self.order):
                    m.comm = self.comms[si]
                    if tr is not None:
                        tr.stamp(tr.slot(layer, i, False))
                    for op in nop.ops:
                        m.run_op(layer, op, *nop.tokens)
                    if tr is not None:
                        tr.stamp(tr.slot(layer, i, True))
            logits = m.tail()
            if tr is not None:
                tr.stamp(ITER_END)
            return logits
        origin = torch.cuda.current_stream(self.device)
        fork = torch.cuda.Event()
        fork.record(origin)
        for st in self.streams:
            st.wait_event(fork)
        events = [[torch.cuda.Event() for _ in self.cross] for _ in range(self.config.num_layers)]
        prev = None  # serialize: the event after the previously issued nano-op
        for layer in range(self.config.num_layers):
            for k, (si, nop) in enumerate(self.order):
                stream = self.streams[si]
                if self.serialize and prev is not None:
                    stream.wait_event(prev)
                for i in self.waits.get(nop.name, ()):
                    src = layer - 1 if self.cross[i].prev_layer else layer
                    if src >= 0:
                        stream.wait_event(events[src][i])
                m.comm = self.comms[si]
                with torch.cuda.stream(stream), sized_for(stream):
                    if tr is not None:  # after the waits: the nano-op's real start
                        tr.stamp(tr.slot(layer, k, False))
                    for op in nop.ops:
                        m.run_op(layer, op, *nop.tokens)
                    if tr is not None:
                        tr.stamp(tr.slot(layer, k, True))
                if self.serialize:
                    prev = torch.cuda.Event()
                    prev.record(stream)
                for i in self.records.get(nop.name, ()):
                    events[layer][i].record(stream)
        for st in self.streams:  # join: the tail runs on the origin stream, on all SMs
            done = torch.cuda.Event()
            done.record(st)
            origin.wait_event(done)
        logits = m.tail()
        if tr is not None:
            tr.stamp(ITER_END)
        return logits

    def capture(self) -> None:
        """Capture the whole forward of the prepared batch's shape into one CUDA graph."""
        if self.device.type != "cuda":
            raise NfrtError("engine: CUDA graphs need a CUDA device")
        self._bound()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: Triton JIT, cuBLAS handles, allocator pools
            self._forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._forward()
        torch.cuda.synchronize(self.device)
        self.graph, self._graph_buffers, self._graph_logits = graph, self.buffers, self.model.logits
        # the graph writes these: keep them alive even if a later bind() replaces the model's
        m = self.model
        self._graph_outputs = (m.sampled, m.logits, m.logits_local, m.logits_ranks)

    def replay(self) -> torch.Tensor:
        """Replay the captured graph on the prepared inputs -> the static logits buffer [samples, vocab]."""
        if self.graph is None or self._graph_buffers is not self.buffers:
            raise NfrtError("engine: no graph captured for the prepared batch shape (call capture())")
        self.graph.replay()
        return self._graph_logits

    def close(self) -> None:
        """Release the graph and the green-context partitions."""
        self.graph, self._graph_outputs = None, ()
        if self.partitions is not None:
            self.partitions.close()
            self.partitions = None
