"""The schedule file: what the compiler writes, a person may hand-write, and the runtime executes.

Pure Python (yaml + stdlib, no torch): the compiler writes through this module on machines
without a GPU. Format and rules: docs/schedule-format.md. Every record is a frozen dataclass whose
fields are type-checked on construction; `Schedule` then runs the cross-field rules
(`nfrt.schedule_validate`). Dictionaries and YAML appear only at the edges (`to_dict`,
`from_dict`, `load_schedule`, `save_schedule`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from nfrt import schedule_validate
from nfrt.atomic import atomic_write_text
from nfrt.config import BatchComposition, ModelConfig
from nfrt.errors import ConfigError, ScheduleError

SCHEMA_VERSION = 1

OpKind = Literal["compute", "memory", "network", "other"]
StreamKind = Literal["compute", "memory", "network", "mixed"]
TokenClass = Literal["all", "decode", "prefill"]
Scope = Literal["token", "prefix"]
ProfileSource = Literal["measured", "analytic"]
Policy = Literal["auto", "sequential", "hand"]

Check = Callable[[Any, str], Any]  # (value, path) -> normalized value, or raise ScheduleError


# ---- field checkers: each names the field by its path --------------------------------------------

def _fail(path: str, msg: str) -> None:
    raise ScheduleError(f"{path or 'schedule'}: {msg}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _name(v: Any, p: str) -> str:
    if not isinstance(v, str) or not v.strip():
        _fail(p, f"must be a non-empty string, got {v!r}")
    return v


def _text(v: Any, p: str) -> str:
    if not isinstance(v, str):
        _fail(p, f"must be a string, got {type(v).__name__} {v!r}")
    return v


def _int(v: Any, p: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        _fail(p, f"must be an integer, got {type(v).__name__} {v!r}")
    return v


def _nonneg_int(v: Any, p: str) -> int:
    if _int(v, p) < 0:
        _fail(p, f"must be >= 0, got {v}")
    return v


def _pos_int(v: Any, p: str) -> int:
    if _int(v, p) <= 0:
        _fail(p, f"must be a positive integer, got {v}")
    return v


def _float(v: Any, p: str) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        _fail(p, f"must be a finite number, got {type(v).__name__} {v!r}")
    return float(v)


def _nonneg(v: Any, p: str) -> float:
    if _float(v, p) < 0:
        _fail(p, f"must be >= 0, got {v}")
    return float(v)


def _pos(v: Any, p: str) -> float:
    if _float(v, p) <= 0:
        _fail(p, f"must be > 0, got {v}")
    return float(v)


def _bool(v: Any, p: str) -> bool:
    if not isinstance(v, bool):
        _fail(p, f"must be true or false, got {v!r}")
    return v


def _choice(*options: str) -> Check:
    def check(v: Any, p: str) -> str:
        if v not in options:
            _fail(p, f"must be one of {', '.join(options)}; got {v!r}")
        return v
    return check


def _optional(check: Check) -> Check:
    return lambda v, p: None if v is None else check(v, p)


def _seq(v: Any, p: str) -> list | tuple:
    if not isinstance(v, list | tuple):
        _fail(p, f"must be a list, got {type(v).__name__} {v!r}")
    return v


def _names(v: Any, p: str) -> tuple[str, ...]:
    items = tuple(_name(x, f"{p}[{i}]") for i, x in enumerate(_seq(v, p)))
    if not items:
        _fail(p, "must not be empty")
    return items


def _token_range(v: Any, p: str) -> tuple[int, int]:
    if not isinstance(v, list | tuple) or len(v) != 2:
        _fail(p, f"must be a pair [start, end], got {v!r}")
    start, end = _nonneg_int(v[0], f"{p}[0]"), _int(v[1], f"{p}[1]")
    if start >= end:
        _fail(p, f"start {start} >= end {end} (tokens are [start, end))")
    return (start, end)


def _records(cls: type) -> Check:
    def check(v: Any, p: str) -> tuple:
        return tuple(x if isinstance(x, cls) else cls.from_dict(x, f"{p}[{i}]")
                     for i, x in enumerate(_seq(v, p)))
    return check


def _record(cls: type) -> Check:
    return lambda v, p: v if isinstance(v, cls) else cls.from_dict(v, p)


def _config(cls: type) -> Check:
    """ModelConfig / BatchComposition: their own from_dict, with the error moved to our path."""
    def check(v: Any, p: str) -> Any:
        if isinstance(v, cls):
            return v
        if not isinstance(v, dict):
            _fail(p, f"must be a mapping, got {type(v).__name__} {v!r}")
        try:
            return cls.from_dict(v)
        except (ConfigError, TypeError) as e:
            _fail(p, str(e))
    return check


def _plain(v: Any) -> Any:
    """A record value as YAML-ready plain data; floats rounded so that the bytes are stable."""
    if isinstance(v, _Record | ModelConfig | BatchComposition):
        return v.to_dict()
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, float):
        return round(v, 3) + 0.0  # + 0.0 turns -0.0 into 0.0
    return v


def _ratio(v: Any) -> Any:
    """A ratio rounded to 6 significant digits: a tiny model's fraction of the bound (3e-4) must
    not round to 0. Re-rounding the result gives the same float, so the bytes stay stable."""
    if isinstance(v, float):
        return float(f"{v:.6g}") + 0.0
    return v


class _Record:
    """Base of the schedule's records: fields checked against `_spec`, dict I/O in field order."""

    _spec: ClassVar[dict[str, Check]] = {}
    _ratios: ClassVar[frozenset[str]] = frozenset()  # fields written with 6 significant digits

    def __post_init__(self) -> None:
        name = getattr(self, "name", None)
        label = f"{type(self).__name__}({name!r})" if isinstance(name, str) else type(self).__name__
        for f in fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, self._spec[f.name](getattr(self, f.name), _join(label, f.name)))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (_ratio if f.name in self._ratios else _plain)(getattr(self, f.name))
                for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> Any:
        if not isinstance(d, dict):
            _fail(path, f"must be a mapping, got {type(d).__name__} {d!r}")
        fs = fields(cls)  # type: ignore[arg-type]
        known = [f.name for f in fs]
        unknown = [str(k) for k in d if k not in known]
        if unknown:
            _fail(path, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
        missing = [f.name for f in fs
                   if f.name not in d and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            _fail(path, f"missing key(s) {', '.join(missing)}")
        return cls(**{k: cls._spec[k](v, _join(path, k)) for k, v in d.items()})


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
        "token_class": _choice("all", "decode", "prefill"), "deps": _records(OpDep)}


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
    _spec: ClassVar[dict[str, Check]] = {
        "name": _name, "policy": _choice("auto", "sequential", "hand"), "status": _name,
        "objective_us": _optional(_float), "gap": _optional(_nonneg), "solve_time_s": _optional(_nonneg)}
    _ratios: ClassVar[frozenset[str]] = frozenset({"gap"})


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
    _spec: ClassVar[dict[str, Check]] = {
        "model": _name, "model_config": _config(ModelConfig), "gpu": _name, "num_sms": _pos_int,
        "tp": _pos_int, "workload": _text, "dense_batch": _pos_int, "batch": _config(BatchComposition),
        "num_layers": _pos_int, "profile": _record(ProfileInfo), "solver": _record(SolverInfo),
        "nfsearch_version": _text}


def _schema_version(v: Any, p: str) -> int:
    if _int(v, p) > SCHEMA_VERSION:
        _fail(p, f"schedule schema_version {v} is newer than this nfrt supports ({SCHEMA_VERSION}): "
                 "upgrade nfsearch")
    if v < 1:
        _fail(p, f"must be >= 1, got {v}")
    return v


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
        """One partition of all SMs, one stream, one nano-batch, one nano-op per layer op."""
        n, dense = metadata.num_sms, metadata.dense_batch
        ops = tuple(NanoOp(name=f"{op}.0", ops=(op,), tokens=(0, dense), num_sms=n)
                    for op in schedule_validate.layer_order(layer))
        meta = replace(metadata, solver=SolverInfo(name="sequential", policy="sequential", status="n/a"))
        return cls(schema_version=SCHEMA_VERSION, metadata=meta, layer=tuple(layer),
                   partitions=(Partition(name="all", num_sms=n, first_sm=0),),
                   streams=(Stream(name="main", kind="mixed", partition="all", nano_ops=ops),),
                   nano_batches=(NanoBatch(name="nb0", start=0, end=dense),))

    def as_sequential(self, num_sms: int | None = None) -> Schedule:
        """The sequential baseline of this schedule (same model, batch and layer graph)."""
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


# ---- YAML I/O -------------------------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    """Safe, alias-free, with lists indented under their key."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)

    def represent_dict(self, data: Any) -> yaml.MappingNode:
        # Short all-scalar mappings stay on one line; long ones (model_config) get a line per key.
        return self.represent_mapping("tag:yaml.org,2002:map", data,
                                      flow_style=False if len(data) > 6 else None)


_Dumper.add_representer(dict, _Dumper.represent_dict)


_HEADER = f"# nfsearch schedule, schema {SCHEMA_VERSION}: see docs/schedule-format.md\n"


def dumps(schedule: Schedule) -> str:
    """Deterministic YAML text: field order fixed, floats rounded to 3 decimals (ratios to 6
    significant digits), no timestamps."""
    body = yaml.dump(schedule.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=None,
                     width=100, allow_unicode=True)
    return _HEADER + body


def loads(text: str, source: str = "<string>") -> Schedule:
    """Parse YAML text (safe_load: no Python tags) into a validated Schedule."""
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ScheduleError(f"{source}: not a valid YAML schedule: {' '.join(str(e).split())}") from None
    try:
        return Schedule.from_dict(d)
    except ScheduleError as e:
        raise ScheduleError(f"{source}: {e}") from None


def load_schedule(path: str | os.PathLike[str]) -> Schedule:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ScheduleError(f"cannot read schedule {p}: {e.strerror or e}") from None
    return loads(text, source=str(p))


def save_schedule(schedule: Schedule, path: str | os.PathLike[str]) -> Path:
    """Write atomically: a temp file in the same folder, then os.replace; on failure the old file
    (if any) is untouched and no temp file is left."""
    p = Path(path)
    try:
        return atomic_write_text(p, dumps(schedule))
    except OSError as e:
        raise ScheduleError(f"cannot write schedule {p}: {e.strerror or e}") from e
