"""The schedule file: what the compiler writes, a person may hand-write, and the runtime executes.

Pure Python (yaml + stdlib, no torch): the compiler writes through this module on machines
without a GPU. Format and rules: docs/schedule-format.md. Every record is a frozen dataclass whose
fields are type-checked on construction; `Schedule` then runs the cross-field rules
(`nfrt.schedule_validate`). Dictionaries and YAML appear only at the edges (`to_dict`,
`from_dict`, `load_schedule`, `save_schedule`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, ClassVar, Literal

from nfrt import schedule_validate
from nfrt.config import BatchComposition, ModelConfig
from nfrt.errors import ScheduleError

# The dict/YAML edge lives in nfrt.schedule_io; the public names are re-exported from here.
from nfrt.schedule_io import SCHEMA_VERSION as SCHEMA_VERSION
from nfrt.schedule_io import Check as Check
from nfrt.schedule_io import (
    _bool,
    _choice,
    _config,
    _float,
    _int,
    _join,
    _name,
    _names,
    _nonneg,
    _nonneg_int,
    _optional,
    _pos,
    _pos_int,
    _Record,
    _record,
    _records,
    _schema_version,
    _text,
    _token_range,
)
from nfrt.schedule_io import dumps as dumps
from nfrt.schedule_io import load_schedule as load_schedule
from nfrt.schedule_io import loads as loads
from nfrt.schedule_io import save_schedule as save_schedule

OpKind = Literal["compute", "memory", "network", "other"]
StreamKind = Literal["compute", "memory", "network", "mixed"]
TokenClass = Literal["all", "decode", "prefill", "gather", "reduce"]
TOKEN_CLASSES = ("all", "decode", "prefill", "gather", "reduce")
GATHER_OPS = schedule_validate.GATHER_OPS  # the all-gather form's ops (docs/tensor-parallel.md)
Scope = Literal["token", "prefix"]
ProfileSource = Literal["measured", "analytic"]
Policy = Literal["auto", "sequential", "overlap", "hand"]


def standard_layer(layer: tuple[LayerOp, ...]) -> tuple[LayerOp, ...]:
    """The standard (reduce-form) layer of `layer`: the gather-form ops (GATHER_OPS) and the deps
    on them removed, classes "reduce" (and "gather") back to "all". The identity on a standard layer."""
    def plain(op: LayerOp) -> LayerOp:
        deps = tuple(d for d in op.deps if d.op not in GATHER_OPS)
        cls = "all" if op.token_class in ("gather", "reduce") else op.token_class
        return op if (deps, cls) == (op.deps, op.token_class) else replace(op, deps=deps, token_class=cls)

    return tuple(plain(op) for op in layer if op.name not in GATHER_OPS)


# ---- the records ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpDep(_Record):
    """The layer op `op` (of the previous layer when `prev_layer`) must finish first.

    scope "token": a piece on tokens [a, b) needs the pieces of `op` that overlap [a, b);
    "prefix": those that overlap [start of the dependent op's token class, b).
    """

    op: str
    scope: Scope = "token"
    prev_layer: bool = False
    _spec: ClassVar[dict[str, Check]] = {"op": _name, "scope": _choice("token", "prefix"),
                                         "prev_layer": _bool}


@dataclass(frozen=True)
class LayerOp(_Record):
    """One op of the decoder layer (docs/architecture.md's vocabulary)."""

    name: str
    kind: OpKind
    token_class: TokenClass = "all"
    deps: tuple[OpDep, ...] = ()
    _spec: ClassVar[dict[str, Check]] = {
        "name": _name, "kind": _choice("compute", "memory", "network", "other"),
        "token_class": _choice(*TOKEN_CLASSES), "deps": _records(OpDep)}


@dataclass(frozen=True)
class Partition(_Record):
    """SM slots [first_sm, first_sm + num_sms) of the GPU's layout (one green context).

    Partitions may overlap; streams on overlapping partitions must be ordered by dependencies
    (docs/schedule-format.md, "Placement").
    """

    name: str
    num_sms: int
    first_sm: int = 0
    _spec: ClassVar[dict[str, Check]] = {"name": _name, "num_sms": _pos_int, "first_sm": _nonneg_int}

    @property
    def sm_range(self) -> tuple[int, int]:
        """[start, end) of the SM slots it occupies."""
        return (self.first_sm, self.first_sm + self.num_sms)


@dataclass(frozen=True)
class NanoOp(_Record):
    """Layer ops `ops`, run back to back on one stream for the dense-batch tokens [start, end)."""

    name: str
    ops: tuple[str, ...]
    tokens: tuple[int, int]
    num_sms: int
    _spec: ClassVar[dict[str, Check]] = {"name": _name, "ops": _names, "tokens": _token_range,
                                         "num_sms": _pos_int}


@dataclass(frozen=True)
class Stream(_Record):
    """One stream bound to one partition; `nano_ops` in issue order for one layer."""

    name: str
    kind: StreamKind
    partition: str
    nano_ops: tuple[NanoOp, ...]
    _spec: ClassVar[dict[str, Check]] = {
        "name": _name, "kind": _choice("compute", "memory", "network", "mixed"), "partition": _name,
        "nano_ops": _records(NanoOp)}


@dataclass(frozen=True)
class NanoBatch(_Record):
    name: str
    start: int
    end: int
    _spec: ClassVar[dict[str, Check]] = {"name": _name, "start": _nonneg_int, "end": _int}


@dataclass(frozen=True)
class Dependency(_Record):
    """Nano-op `after` waits for `before` (of the previous layer when `prev_layer`)."""

    before: str
    after: str
    prev_layer: bool = False
    _spec: ClassVar[dict[str, Check]] = {"before": _name, "after": _name, "prev_layer": _bool}


@dataclass(frozen=True)
class TimelineEntry(_Record):
    nano_op: str
    stream: str
    start_us: float
    end_us: float
    _spec: ClassVar[dict[str, Check]] = {"nano_op": _name, "stream": _name, "start_us": _float,
                                         "end_us": _float}


@dataclass(frozen=True)
class Prediction(_Record):
    period_us: float  # steady-state layer period
    layer_span_us: float  # first start to last end of one layer's nano-ops
    iteration_us: float  # all layers + tail
    tokens_per_s_per_gpu: float
    fraction_of_bound: float
    optimal_tokens_per_s_per_gpu: float
    speedup_vs_sequential: float | None = None
    timeline: tuple[TimelineEntry, ...] = ()
    _spec: ClassVar[dict[str, Check]] = {
        "period_us": _nonneg, "layer_span_us": _nonneg, "iteration_us": _nonneg,
        "tokens_per_s_per_gpu": _nonneg, "fraction_of_bound": _nonneg,
        "optimal_tokens_per_s_per_gpu": _nonneg, "speedup_vs_sequential": _optional(_pos),
        "timeline": _records(TimelineEntry)}
    _ratios: ClassVar[frozenset[str]] = frozenset({"fraction_of_bound", "speedup_vs_sequential"})


@dataclass(frozen=True)
class ProfileInfo(_Record):
    hash: str
    source: ProfileSource
    path: str | None = None
    _spec: ClassVar[dict[str, Check]] = {"hash": _text, "source": _choice("measured", "analytic"),
                                         "path": _optional(_text)}


@dataclass(frozen=True)
class SolverInfo(_Record):
    name: str
    policy: Policy
    status: str  # the solver's word (OPTIMAL, FEASIBLE, ...), "n/a" where no solver ran
    objective_us: float | None = None
    gap: float | None = None
    solve_time_s: float | None = None
    # solved with the K = 2 structure family (`nfsearch solve --structure-family`)
    structure_family: bool = False
    _spec: ClassVar[dict[str, Check]] = {
        "name": _name, "policy": _choice("auto", "sequential", "overlap", "hand"), "status": _name,
        "objective_us": _optional(_float), "gap": _optional(_nonneg), "solve_time_s": _optional(_nonneg),
        "structure_family": _bool}
    _ratios: ClassVar[frozenset[str]] = frozenset({"gap"})

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if not d["structure_family"]:
            del d["structure_family"]  # omitted when false: schedules solved without it keep their bytes
        return d


@dataclass(frozen=True)
class Metadata(_Record):
    model: str
    model_config: ModelConfig
    gpu: str
    num_sms: int
    tp: int
    workload: str
    dense_batch: int
    batch: BatchComposition
    num_layers: int
    profile: ProfileInfo
    solver: SolverInfo
    nfsearch_version: str
    # dense tokens [0, gather_tokens) run the attention output in the all-gather form (class
    # "gather"), the rest in the reduce form (class "reduce"); 0: the standard layer
    gather_tokens: int = 0
    _spec: ClassVar[dict[str, Check]] = {
        "model": _name, "model_config": _config(ModelConfig), "gpu": _name, "num_sms": _pos_int,
        "tp": _pos_int, "workload": _text, "dense_batch": _pos_int, "batch": _config(BatchComposition),
        "num_layers": _pos_int, "profile": _record(ProfileInfo), "solver": _record(SolverInfo),
        "nfsearch_version": _text, "gather_tokens": _nonneg_int}

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        g = d.pop("gather_tokens")
        if not g:
            return d  # omitted when 0: schedules of the standard layer stay byte-identical
        keys = list(d)
        at = keys.index("dense_batch") + 1
        return {**{k: d[k] for k in keys[:at]}, "gather_tokens": g, **{k: d[k] for k in keys[at:]}}


@dataclass(frozen=True)
class Schedule(_Record):
    """A complete schedule; validated on construction (docs/schedule-format.md lists the rules)."""

    schema_version: int
    metadata: Metadata
    layer: tuple[LayerOp, ...]
    partitions: tuple[Partition, ...]
    streams: tuple[Stream, ...]
    nano_batches: tuple[NanoBatch, ...]
    dependencies: tuple[Dependency, ...] = ()
    prediction: Prediction | None = None
    _spec: ClassVar[dict[str, Check]] = {
        "schema_version": _schema_version, "metadata": _record(Metadata), "layer": _records(LayerOp),
        "partitions": _records(Partition), "streams": _records(Stream),
        "nano_batches": _records(NanoBatch), "dependencies": _records(Dependency),
        "prediction": _optional(_record(Prediction))}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate()

    def validate(self) -> None:
        schedule_validate.validate(self)

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> Schedule:
        # The version first: a newer file may have keys this version does not know.
        if isinstance(d, dict) and "schema_version" in d:
            _schema_version(d["schema_version"], _join(path, "schema_version"))
        return super().from_dict(d, path)

    # ---- accessors ----

    @cached_property
    def _nano_index(self) -> dict[str, tuple[Stream, NanoOp]]:
        return {n.name: (s, n) for s in self.streams for n in s.nano_ops}

    def nano_op(self, name: str) -> NanoOp:
        return self._lookup(name)[1]

    def stream_of(self, name: str) -> Stream:
        """The stream that runs nano-op `name`."""
        return self._lookup(name)[0]

    def _lookup(self, name: str) -> tuple[Stream, NanoOp]:
        try:
            return self._nano_index[name]
        except KeyError:
            raise ScheduleError(f"unknown nano-op {name!r}; known: {', '.join(self._nano_index)}") from None

    def topo_order(self) -> tuple[tuple[str, str], ...]:
        """(stream, nano-op) pairs of one layer in a deterministic issue order for the CPU executor:
        respects stream order and same-layer dependencies; ties go to the earliest predicted start,
        then to the earlier position in its stream, then to the earlier stream."""
        return schedule_validate.issue_order(self)

    # ---- derived schedules and checks ----

    @classmethod
    def sequential(cls, metadata: Metadata, layer: tuple[LayerOp, ...]) -> Schedule:
        """One partition of all SMs, one stream, one nano-batch, one nano-op per op of the standard
        layer of `layer` (`standard_layer`: the sequential baseline never takes the all-gather form,
        gather_tokens 0)."""
        layer = standard_layer(layer)
        n, dense = metadata.num_sms, metadata.dense_batch
        ops = tuple(NanoOp(name=f"{op}.0", ops=(op,), tokens=(0, dense), num_sms=n)
                    for op in schedule_validate.layer_order(layer))
        meta = replace(metadata, gather_tokens=0,
                       solver=SolverInfo(name="sequential", policy="sequential", status="n/a"))
        return cls(schema_version=SCHEMA_VERSION, metadata=meta, layer=tuple(layer),
                   partitions=(Partition(name="all", num_sms=n, first_sm=0),),
                   streams=(Stream(name="main", kind="mixed", partition="all", nano_ops=ops),),
                   nano_batches=(NanoBatch(name="nb0", start=0, end=dense),))

    def as_sequential(self, num_sms: int | None = None) -> Schedule:
        """The sequential baseline of this schedule: same model and batch, the standard
        (reduce-form) layer graph (`Schedule.sequential`)."""
        meta = self.metadata if num_sms is None else replace(self.metadata, num_sms=num_sms)
        return Schedule.sequential(meta, self.layer)

    def check_compatible(self, model_name: str, num_sms: int,
                         schema_version_supported: int = SCHEMA_VERSION) -> None:
        """Raise ScheduleError unless an engine running `model_name` on `num_sms` SMs can run this."""
        if self.schema_version > schema_version_supported:
            raise ScheduleError(f"schedule schema_version {self.schema_version} is newer than the runtime "
                                f"supports ({schema_version_supported})")
        if self.metadata.model != model_name:
            raise ScheduleError(f"schedule is for {self.metadata.model}, engine runs {model_name}")
        used = max(p.first_sm + p.num_sms for p in self.partitions)  # the layout is [0, used)
        if used > num_sms:
            raise ScheduleError(f"schedule partitions use {used} SMs, the GPU has {num_sms}")
        if self.metadata.num_sms != num_sms:
            raise ScheduleError(f"schedule is for a GPU with {self.metadata.num_sms} SMs, this GPU has "
                                f"{num_sms}: re-plan, or use as_sequential({num_sms})")

