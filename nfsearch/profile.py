"""Kernel profiles: latency tables and interference, the file format, and interpolation.

A profile tells the search how long each layer op takes for a token count, a context length and
an SM count, and how much an op of one kind slows down beside another kind. It is one versioned
JSON file (docs/profile-format.md) with two pandas-readable tables in `orient="split"` form.
`Profile` validates itself once, then answers `latency_us` / `slowdown` by multilinear
interpolation over its grid. It never extrapolates: a query outside the grid raises
`ProfileRangeError` naming the op and the value.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from nfrt.atomic import atomic_write_bytes

from nfsearch.errors import NfsearchError
from nfsearch.profile_sustained import SUSTAINED_COLUMNS, SustainedFactors, check_sustained, empty_sustained

# Validation and the table schema live in nfsearch.profile_validate; public names re-exported here.
from nfsearch.profile_validate import CLOCK_COLUMN as CLOCK_COLUMN
from nfsearch.profile_validate import INTERFERENCE_COLUMNS as INTERFERENCE_COLUMNS
from nfsearch.profile_validate import KINDS as KINDS
from nfsearch.profile_validate import LATENCY_COLUMNS as LATENCY_COLUMNS
from nfsearch.profile_validate import LATENCY_DECIMALS as LATENCY_DECIMALS
from nfsearch.profile_validate import SLOWDOWN_DECIMALS as SLOWDOWN_DECIMALS
from nfsearch.profile_validate import ProfileError as ProfileError
from nfsearch.profile_validate import _check_interference, _check_latency, _frame, _is_int, _is_num

if TYPE_CHECKING:
    from nfrt.config import ModelConfig

    from nfsearch.gpus import GpuSpec

FORMAT = "nfsearch-profile"
FORMAT_VERSION = 1
SOURCES = ("measured", "analytic")
# Meta fields that change on every regeneration without changing the data: left out of the hash.
VOLATILE_META = ("date", "nfsearch_version")

Source = Literal["measured", "analytic"]


class ProfileRangeError(NfsearchError):
    """A lookup falls outside a profile's grid (or names an op the profile lacks)."""


@dataclass(frozen=True)
class ProfileMeta:
    """Where a profile comes from: the GPU, its ceilings and the software stamp."""

    source: Source
    model: str
    tp: int
    gpu: str  # slug, the folder name under profiles/
    gpu_name: str
    num_sms: int
    sm_granularity: int
    peak_tflops: float  # dense bf16 ceiling (measured in measured profiles)
    hbm_gbps: float
    nvlink_gbps: float  # 0: no NVLink
    driver: str = ""
    cuda: str = ""
    torch: str = ""
    triton: str = ""
    date: str = ""
    nfsearch_version: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ProfileError(f"meta.source {self.source!r} unknown; valid: {', '.join(SOURCES)}")
        for f in ("model", "gpu", "gpu_name"):
            v = getattr(self, f)
            if not isinstance(v, str) or not v:
                raise ProfileError(f"meta.{f} must be a non-empty string, got {v!r}")
        for f in ("driver", "cuda", "torch", "triton", "date", "nfsearch_version", "notes"):
            if not isinstance(getattr(self, f), str):
                raise ProfileError(f"meta.{f} must be a string, got {getattr(self, f)!r}")
        for f in ("tp", "num_sms", "sm_granularity"):
            v = getattr(self, f)
            if not _is_int(v) or v < 1:
                raise ProfileError(f"meta.{f} must be a positive integer, got {v!r}")
        for f, lo in (("peak_tflops", 0.0), ("hbm_gbps", 0.0), ("nvlink_gbps", None)):
            v = getattr(self, f)
            if not _is_num(v) or not np.isfinite(v) or (v <= 0 if lo is not None else v < 0):
                need = "positive" if lo is not None else "non-negative"
                raise ProfileError(f"meta.{f} must be a {need} number, got {v!r}")
            object.__setattr__(self, f, float(v))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> ProfileMeta:
        if not isinstance(d, dict):
            raise ProfileError(f"meta must be a mapping, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ProfileError(f"meta: unknown field(s) {', '.join(unknown)}; valid: {', '.join(names)}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in d]
        if missing:
            raise ProfileError(f"meta: missing field(s) {', '.join(missing)}")
        return cls(**d)


@dataclass(frozen=True)
class _OpGrid:
    """One op's complete grid: lat[c, t, s] at contexts[c], tokens[t], sms[s]."""

    tokens: list[int]
    contexts: list[int]  # [0] when the op's cost does not depend on context
    sms: list[int]
    lat: np.ndarray  # [contexts, tokens, sms]
    cycles: np.ndarray | None  # lat * the point's SM clock (us * MHz), when the profile has clocks


@dataclass(frozen=True, eq=False)
class Profile:
    """A validated profile. The DataFrames are normalized copies (sorted, rounded): treat as read-only."""

    meta: ProfileMeta
    latency: pd.DataFrame
    interference: pd.DataFrame
    # sustained / burst latency per (op, tokens, SMs) (nfsearch.profile_sustained); empty: none
    sustained: pd.DataFrame = field(default_factory=empty_sustained)
    _factors: SustainedFactors = field(init=False, repr=False)
    _grids: dict[str, _OpGrid] = field(init=False, repr=False)
    _slow: dict[tuple[str, str], tuple[list[int], list[float]]] = field(init=False, repr=False)
    _sm_grid: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.meta, ProfileMeta):
            raise ProfileError(f"meta must be a ProfileMeta, got {type(self.meta).__name__}")
        lat = _check_latency(self.latency, self.meta)
        inter = _check_interference(self.interference, self.meta)
        object.__setattr__(self, "latency", lat)
        object.__setattr__(self, "interference", inter)
        sm_grid = tuple(sorted(int(s) for s in lat["num_sms"].unique()))
        if sm_grid[-1] != self.meta.num_sms:
            raise ProfileError(f"tables.latency: the SM grid ends at {sm_grid[-1]}, not at "
                               f"meta.num_sms {self.meta.num_sms} (the full GPU must be profiled)")
        object.__setattr__(self, "_sm_grid", sm_grid)
        object.__setattr__(self, "_grids", _build_grids(lat, sm_grid))
        slow: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
        for (k, o), g in inter.groupby(["kind", "other_kind"], sort=True):
            slow[(str(k), str(o))] = ([int(s) for s in g["num_sms"]], [float(x) for x in g["slowdown"]])
        object.__setattr__(self, "_slow", slow)
        sus = check_sustained(self.sustained, self.meta.num_sms, tuple(sorted(self._grids)))
        object.__setattr__(self, "sustained", sus)
        object.__setattr__(self, "_factors", SustainedFactors(sus))

    # -- lookups -------------------------------------------------------------------------------

    def ops(self) -> tuple[str, ...]:
        return tuple(sorted(self._grids))

    def sm_grid(self) -> tuple[int, ...]:
        return self._sm_grid

    def token_grid(self, op: str) -> tuple[int, ...]:
        return tuple(self._grid(op).tokens)

    def context_grid(self, op: str) -> tuple[int, ...]:
        """(0,) for an op whose latency does not depend on context."""
        return tuple(self._grid(op).contexts)

    @property
    def has_clocks(self) -> bool:
        """Whether every latency point carries the SM clock it was measured at."""
        return CLOCK_COLUMN in self.latency.columns

    @property
    def has_sustained(self) -> bool:
        """Whether the profile carries a sustained-clock table (latencies are charged with it)."""
        return bool(self._factors)

    def latency_us(self, op: str, tokens: float, context: float, num_sms: float,
                   clock_mhz: float | None = None, sustained: bool = True) -> float:
        """Solo latency, interpolated linearly in tokens, context and num_sms between grid points.

        0.0 for tokens == 0. `context` is ignored for ops profiled at context 0 only. The latency
        is the one at the power-limited steady state a replayed schedule runs in: the burst point
        times the sustained table's factor (`sustained=False`: the burst point as measured; a
        profile without the table: always the burst point). With
        `clock_mhz` (and a profile with clocks), the latency at that SM clock: the points' cycles
        (latency x their clock) are interpolated and divided by it, the rule for ops whose time
        scales with the clock (docs/profile-format.md, "Clocks"). Without clocks in the profile,
        `clock_mhz` is ignored.
        """
        g = self._grid(op)
        table = g.lat
        if clock_mhz is not None and g.cycles is not None:
            if not _is_num(clock_mhz) or not clock_mhz > 0:
                raise ProfileRangeError(f"profile: clock_mhz must be positive, got {clock_mhz!r}")
            table = g.cycles
        if tokens == 0:
            return 0.0
        ti = _bracket(g.tokens, tokens, op, "tokens")
        si = _bracket(g.sms, num_sms, op, "num_sms")
        ci = ((0, 0, 0.0) if g.contexts == [0] else _bracket(g.contexts, context, op, "context"))
        total = 0.0
        for c, wc in ((ci[0], 1.0 - ci[2]), (ci[1], ci[2])):
            if wc == 0.0:
                continue
            for t, wt in ((ti[0], 1.0 - ti[2]), (ti[1], ti[2])):
                if wt == 0.0:
                    continue
                for s, ws in ((si[0], 1.0 - si[2]), (si[1], si[2])):
                    if ws:
                        total += wc * wt * ws * float(table[c, t, s])
        if table is not g.lat:
            return total / float(clock_mhz)
        return total * self._factors.factor(op, tokens, num_sms) if sustained else total

    def slowdown(self, kind: str, other_kind: str, num_sms: float) -> float:
        """Slowdown (>= 1) of `kind` on `num_sms` SMs beside `other_kind`; 1.0 for an absent pair."""
        for k in (kind, other_kind):
            if k not in KINDS:
                raise ProfileRangeError(f"profile: kind {k!r} unknown; valid: {', '.join(KINDS)}")
        entry = self._slow.get((kind, other_kind))
        if entry is None:
            return 1.0
        sms, vals = entry
        lo, hi, w = _bracket(sms, num_sms, f"interference {kind}/{other_kind}", "num_sms")
        return vals[lo] * (1.0 - w) + vals[hi] * w

    def _grid(self, op: str) -> _OpGrid:
        g = self._grids.get(op)
        if g is None:
            raise ProfileRangeError(f"profile ({self.meta.model}, {self.meta.gpu}) has no op {op!r}; "
                                    f"ops: {', '.join(self.ops())}")
        return g

    # -- serialization -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "meta": self.meta.to_dict(),
            "tables": {
                "latency": {"columns": list(LATENCY_COLUMNS) + ([CLOCK_COLUMN] if self.has_clocks else []),
                            "data": [[str(r[0]), int(r[1]), int(r[2]), int(r[3])] + [float(x) for x in r[4:]]
                                     for r in self.latency.itertuples(index=False, name=None)]},
                "interference": {"columns": list(INTERFERENCE_COLUMNS), "data": [
                    [str(k), str(o), int(s), float(x)] for k, o, s, x in
                    self.interference.itertuples(index=False, name=None)]},
                # only when present, so a profile without one keeps its bytes and hash
                **({"sustained": {"columns": list(SUSTAINED_COLUMNS), "data": [
                    [str(o), int(t), int(s), float(x)] for o, t, s, x in
                    self.sustained.itertuples(index=False, name=None)]}} if self.has_sustained else {}),
            },
        }

    @classmethod
    def from_dict(cls, d: Any) -> Profile:
        if not isinstance(d, dict):
            raise ProfileError(f"profile must be a mapping, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ProfileError(f"not an nfsearch profile: format is {d.get('format')!r}, expected {FORMAT!r}")
        ver = d.get("format_version")
        if ver != FORMAT_VERSION or not _is_int(ver):
            raise ProfileError(f"profile format_version {ver!r} is not supported (this nfsearch reads "
                               f"{FORMAT_VERSION})")
        extra = sorted(set(d) - {"format", "format_version", "meta", "tables"})
        if extra:
            raise ProfileError(f"profile: unknown top-level key(s) {', '.join(extra)}")
        meta = ProfileMeta.from_dict(d.get("meta"))
        tables = d.get("tables")
        if not isinstance(tables, dict):
            raise ProfileError("profile: 'tables' must be a mapping with 'latency' and 'interference'")
        unknown = sorted(set(tables) - {"latency", "interference", "sustained"})
        if unknown:
            raise ProfileError(f"tables: unknown table(s) {', '.join(unknown)}; valid: latency, "
                               f"interference, sustained")
        frames = [_frame(tables, name, cols, opt) for name, cols, opt in
                  (("latency", LATENCY_COLUMNS, (CLOCK_COLUMN,)), ("interference", INTERFERENCE_COLUMNS, ()))]
        sus = _frame(tables, "sustained", SUSTAINED_COLUMNS) if "sustained" in tables else empty_sustained()
        return cls(meta, frames[0], frames[1], sus)

    def canonical_bytes(self) -> bytes:
        """The exact bytes `save_profile` writes."""
        return _dump(self.to_dict()).encode()

    @cached_property
    def hash(self) -> str:
        """sha256 (hex) of the canonical file content without the volatile meta fields."""
        d = self.to_dict()
        for k in VOLATILE_META:
            d["meta"].pop(k)
        return hashlib.sha256(_dump(d).encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Profile):
            return NotImplemented
        return (self.meta == other.meta and self.latency.equals(other.latency)
                and self.interference.equals(other.interference) and self.sustained.equals(other.sustained))

    def __hash__(self) -> int:
        return hash(self.hash)


# -- files -------------------------------------------------------------------------------------


def load_profile(path: str | os.PathLike[str]) -> Profile:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ProfileError(f"profile file {p} not found") from None
    except OSError as e:
        raise ProfileError(f"profile file {p}: cannot read ({e.strerror})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    try:
        return Profile.from_dict(d)
    except ProfileError as e:
        raise ProfileError(f"{p}: {e}") from None


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> Path:
    """Write atomically (temp file in the same folder, then rename); the bytes are deterministic."""
    return atomic_write_bytes(path, profile.canonical_bytes())


def profiles_root() -> Path:
    """The repository's profiles/ folder (next to the nfsearch package)."""
    return Path(__file__).resolve().parent.parent / "profiles"


def profile_filename(model_name: str, tp: int) -> str:
    return f"{model_name}-tp{tp}.json"


def shipped_profile_path(gpu_slug: str, model_name: str, tp: int,
                         root: str | os.PathLike[str] | None = None) -> Path | None:
    """profiles/<gpu-slug>/<model>-tp<N>.json if it exists, else None."""
    p = Path(root if root is not None else profiles_root()) / gpu_slug / profile_filename(model_name, tp)
    return p if p.is_file() else None


def default_profile_for(model: ModelConfig | str, gpu: GpuSpec | str, tp: int = 1,
                        root: str | os.PathLike[str] | None = None, gather: bool = False) -> Profile:
    """The shipped measured profile for (model, gpu, tp) if one exists, else the analytic one
    (`gather`: with the all-gather form's ops too).

    `meta.source` says which it is.
    """
    from nfsearch.gpus import resolve_gpu
    from nfsearch.models import resolve_model

    m = resolve_model(model) if isinstance(model, str) else model
    g = resolve_gpu(gpu) if isinstance(gpu, str) else gpu
    path = shipped_profile_path(g.name, m.name, tp, root)
    if path is None:
        return _analytic_cached(m, g, tp, gather)
    prof = load_profile(path)
    got = (prof.meta.model, prof.meta.gpu, prof.meta.tp)
    if got != (m.name, g.name, tp):
        raise ProfileError(f"{path}: meta says model {got[0]!r}, gpu {got[1]!r}, tp {got[2]}; the file name "
                           f"says {m.name!r}, {g.name!r}, {tp}")
    return prof


@lru_cache(maxsize=8)
def _analytic_cached(model: ModelConfig, gpu: GpuSpec, tp: int, gather: bool = False) -> Profile:
    from nfsearch.profile_analytic import analytic_profile  # it imports this module

    return analytic_profile(model, gpu, tp, gather=gather)


# -- grid, interpolation and canonical JSON helpers --------------------------------------------


def _build_grids(lat: pd.DataFrame, sm_grid: tuple[int, ...]) -> dict[str, _OpGrid]:
    """Per op, check the grid is the full product contexts x tokens x SMs and index it."""
    grids: dict[str, _OpGrid] = {}
    for op, g in lat.groupby("op", sort=True):
        op = str(op)
        tokens = sorted({int(t) for t in g["tokens"]})
        contexts = sorted({int(c) for c in g["context"]})
        if 0 in contexts and len(contexts) > 1:
            raise ProfileError(f"tables.latency: op {op!r} mixes context 0 (context-independent) with "
                               f"contexts {contexts[1:]}")
        n = len(contexts) * len(tokens) * len(sm_grid)
        if len(g) != n:
            present = set(zip(g["context"], g["tokens"], g["num_sms"], strict=True))
            c, t, s = next((c, t, s) for c in contexts for t in tokens for s in sm_grid
                           if (c, t, s) not in present)
            raise ProfileError(f"tables.latency: op {op!r} lacks the grid point tokens={t}, context={c}, "
                               f"num_sms={s} (each op needs every (context, tokens, num_sms) combination "
                               f"of its grid, so interpolation is defined)")
        # rows are sorted by (op, tokens, context, num_sms): reshape, then put context first
        shape = (len(tokens), len(contexts), len(sm_grid))
        arr = g["latency_us"].to_numpy(dtype=np.float64).reshape(shape)
        cycles = None
        if CLOCK_COLUMN in g.columns:
            cyc = arr * g[CLOCK_COLUMN].to_numpy(dtype=np.float64).reshape(shape)
            cycles = np.ascontiguousarray(cyc.transpose(1, 0, 2))
        grids[op] = _OpGrid(tokens, contexts, list(sm_grid), np.ascontiguousarray(arr.transpose(1, 0, 2)),
                            cycles)
    return grids


def _bracket(grid: list[int], x: float, op: str, what: str) -> tuple[int, int, float]:
    """Indexes (lo, hi) around x and the weight of hi; raises outside [grid[0], grid[-1]]."""
    if not _is_num(x) or not grid[0] <= x <= grid[-1]:
        raise ProfileRangeError(f"profile: op {op!r} {what} {x!r} is outside the profiled grid "
                                f"[{grid[0]}, {grid[-1]}] (no extrapolation)")
    hi = bisect.bisect_left(grid, x)
    if grid[hi] == x:
        return hi, hi, 0.0
    lo = hi - 1
    return lo, hi, (x - grid[lo]) / (grid[hi] - grid[lo])


def _dump(d: dict[str, Any]) -> str:
    """Canonical JSON: fixed key order, one table row per line (diff-friendly, deterministic)."""
    out = ["{", f'  "format": {json.dumps(d["format"])},', f'  "format_version": {d["format_version"]},',
           '  "meta": {']
    meta = d["meta"]
    keys = sorted(meta)
    out += [f"    {json.dumps(k)}: {json.dumps(meta[k], allow_nan=False)}"
            + ("," if i < len(keys) - 1 else "") for i, k in enumerate(keys)]
    out += ["  },", '  "tables": {']
    names = tuple(n for n in ("latency", "interference", "sustained") if n in d["tables"])
    for n, name in enumerate(names):
        t = d["tables"][name]
        out += [f'    "{name}": {{', f'      "columns": {json.dumps(t["columns"])},', '      "data": [']
        rows = t["data"]
        out += [f"        {json.dumps(r, allow_nan=False)}" + ("," if i < len(rows) - 1 else "")
                for i, r in enumerate(rows)]
        out += ["      ]", "    }" + ("," if n < len(names) - 1 else "")]
    out += ["  }", "}", ""]
    return "\n".join(out)
