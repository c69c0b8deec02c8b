"""The schedule's dict/YAML edge: field checks, records' `to_dict`/`from_dict`, YAML text and files.

`nfrt.schedule` defines the records on top of `_Record` and the checkers here and re-exports the
public names (`SCHEMA_VERSION`, `dumps`, `loads`, `load_schedule`, `save_schedule`), so
`from nfrt.schedule import ...` keeps working. This module imports `nfrt.schedule` only inside
`loads` (it needs `Schedule`), so the two never import each other at module level.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

from nfrt.atomic import atomic_write_text
from nfrt.config import BatchComposition, ModelConfig
from nfrt.errors import ConfigError, ScheduleError

if TYPE_CHECKING:
    from nfrt.schedule import Schedule

SCHEMA_VERSION = 1

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


def _schema_version(v: Any, p: str) -> int:
    if _int(v, p) > SCHEMA_VERSION:
        _fail(p, f"schedule schema_version {v} is newer than this nfrt supports ({SCHEMA_VERSION}): "
                 "upgrade nfsearch")
    if v < 1:
        _fail(p, f"must be >= 1, got {v}")
    return v


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
    from nfrt.schedule import Schedule  # here, not at the top: nfrt.schedule imports this module

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
