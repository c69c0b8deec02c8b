"""The most that overlapping a layer's compute and memory work can gain, from measured co-run rates.

Whatever its nano-batches and order, a schedule must do one layer's compute work C (its GEMMs and
prefill attention over the whole batch: one "compute unit", C us alone on all SMs) and its memory
work M (decode attention over every request's KV cache: one "memory unit", M us alone). At any
moment the GPU runs compute alone, memory alone, or both side by side on a split of the SMs (c for
compute, m for memory), where a compute unit takes tc us and a memory unit tm us (`nfsearch
ceiling`, nfsearch/ceiling_measure.py, measures them, sustained at the power limit). Time y_k
spent in mode k does y_k / tc_k compute units and y_k / tm_k memory units, so the least time for
one unit of each is the linear program

    minimise  sum_k y_k   subject to  sum_k y_k / tc_k >= 1,  sum_k y_k / tm_k >= 1,  y >= 0.

That optimum bounds every schedule built from these kernels from below: it ignores the dependencies
between the ops (which only constrain a schedule further) and the cost of cutting the batch into
nano-batches (smaller GEMMs run less efficiently). With two constraints an optimal basic solution
uses at most two modes, so `best_mix` enumerates single modes and pairs of modes with both
constraints tight. Pure: no torch, no I/O.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

from nfsearch.errors import NfsearchError


def _positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not value > 0:  # NaN fails `> 0` too
        raise NfsearchError(f"ceiling: {name} must be a positive number of us, got {value!r}")


@dataclass(frozen=True)
class SplitRate:
    """One placed split measured side by side: compute on `compute_sms`, memory on `memory_sms`."""

    compute_sms: int
    memory_sms: int
    tc_us: float  # one compute unit, co-running
    tm_us: float  # one memory unit, co-running

    def __post_init__(self) -> None:
        for f in ("compute_sms", "memory_sms"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise NfsearchError(f"ceiling: {f} must be a positive integer, got {v!r}")
        _positive("tc_us", self.tc_us)
        _positive("tm_us", self.tm_us)

    @property
    def name(self) -> str:
        return f"split {self.compute_sms}/{self.memory_sms}"


@dataclass(frozen=True)
class Mix:
    """The least time for one compute and one memory unit, and the modes (name, us) that take it."""

    time_us: float
    modes: tuple[tuple[str, float], ...]


def best_mix(c_us: float, m_us: float, splits: list[SplitRate] | tuple[SplitRate, ...]) -> Mix:
    """Optimum of the linear program in the module docstring. Modes: compute alone (rates 1/C, 0),
    memory alone (0, 1/M) and every split (1/tc, 1/tm)."""
    _positive("c_us", c_us)
    _positive("m_us", m_us)
    modes = [("compute alone", 1.0 / c_us, 0.0), ("memory alone", 0.0, 1.0 / m_us)]
    modes += [(s.name, 1.0 / s.tc_us, 1.0 / s.tm_us) for s in splits]
    best = Mix(c_us + m_us, (("compute alone", c_us), ("memory alone", m_us)))
    for name, rc, rm in modes:  # one mode doing both units
        if rc > 0 and rm > 0:
            t = max(1.0 / rc, 1.0 / rm)
            if t < best.time_us:
                best = Mix(t, ((name, t),))
    for (n1, c1, m1), (n2, c2, m2) in itertools.combinations(modes, 2):  # two modes, both tight
        det = c1 * m2 - c2 * m1
        if abs(det) <= 1e-12 * max(c1 * m2, c2 * m1):
            continue
        y1, y2 = (m2 - c2) / det, (c1 - m1) / det  # y1 (c1, m1) + y2 (c2, m2) = (1, 1)
        if y1 >= 0 and y2 >= 0 and y1 + y2 < best.time_us:
            best = Mix(y1 + y2, tuple((n, y) for n, y in ((n1, y1), (n2, y2)) if y > 0))
    return best


@dataclass(frozen=True)
class Ceiling:
    """Measured units and the ceilings on the overlap's speedup over the sequential schedule."""

    c_us: float
    m_us: float
    other_us: float  # the rest of the layer (norms, RoPE, KV append), alone on all SMs
    seq_pair_us: float  # one compute then one memory unit, as the sequential schedule runs them
    splits: tuple[SplitRate, ...]
    mix: Mix

    @property
    def cm(self) -> float:
        """Over the compute + memory pair alone."""
        return self.seq_pair_us / self.mix.time_us

    @property
    def other_serial(self) -> float:
        """The layer, with the other ops run after the overlapped pair."""
        return (self.seq_pair_us + self.other_us) / (self.mix.time_us + self.other_us)

    @property
    def other_free(self) -> float:
        """The layer, with the other ops hidden at no cost (the loosest ceiling)."""
        return (self.seq_pair_us + self.other_us) / self.mix.time_us

    def to_dict(self) -> dict[str, Any]:
        return {"c_us": self.c_us, "m_us": self.m_us, "other_us": self.other_us,
                "seq_pair_us": self.seq_pair_us, "splits": [asdict(s) for s in self.splits],
                "best_us": self.mix.time_us, "best_mix": [list(m) for m in self.mix.modes],
                "ceiling_cm": self.cm, "ceiling_layer_other_serial": self.other_serial,
                "ceiling_layer_other_free": self.other_free}


def overlap_ceiling(c_us: float, m_us: float, other_us: float, seq_pair_us: float,
                    splits: list[SplitRate] | tuple[SplitRate, ...]) -> Ceiling:
    _positive("seq_pair_us", seq_pair_us)
    if not other_us >= 0:
        raise NfsearchError(f"ceiling: other_us must be >= 0, got {other_us!r}")
    return Ceiling(c_us, m_us, other_us, seq_pair_us, tuple(splits), best_mix(c_us, m_us, splits))
