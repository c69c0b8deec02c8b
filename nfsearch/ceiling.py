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
nano-batches (smaller GEMMs run less efficiently). `best_mix` solves it with `solve_mix` below.

Tensor parallelism adds a third resource, the network: the layer's all-reduces (`attn_allreduce`,
`mlp_allreduce`, N us alone on all SMs' communicator). `solve_mix` solves the same program over any
of the units {compute, memory, network}: minimise sum_k y_k subject to sum_k y_k * rate_{k,u} >= 1
for every unit u, y >= 0, exactly, by enumerating the vertices (an optimal vertex has at most one
mode per unit). Its modes (`network_ceiling`): each unit alone on all SMs, every measured pair side
by side (compute|memory, compute|network, memory|network), and the three-way splits, which are not
measured: their rates are each unit's rate *alone* on its share of the SMs, over the placed layouts
c + m + n = top, an optimistic rate (no interference) that keeps the optimum a lower bound on time.
The result is a ceiling (an upper bound on the speedup) only because every mode's rates are at
least what the hardware does; like the two-unit one it ranges over the measured partition sizes.

On one GPU the other ops (norms, RoPE, KV append, the activation: O us alone) are bounded two ways
above, run after the overlap ("serial") or hidden at no cost ("free"). `other_ceiling` tightens the
free one: O is a third unit, advanced alone, beside C or M, or in a three-way split, each mode
measured; its time is at most the serial one's (O alone is one of its modes).
Pure: no torch, no I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from nfsearch.errors import NfsearchError

UNITS = ("compute", "memory", "network", "other")


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
    """Optimum of the linear program in the module docstring (`solve_mix` over two units). Modes:
    compute alone (rates 1/C, 0), memory alone (0, 1/M) and every split (1/tc, 1/tm)."""
    _positive("c_us", c_us)
    _positive("m_us", m_us)
    return solve_mix([Mode("compute alone", (("compute", c_us),)), Mode("memory alone", (("memory", m_us),)),
                      *(Mode(s.name, (("compute", s.tc_us), ("memory", s.tm_us))) for s in splits)])


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


# ---- three units: compute, memory and the network (tensor parallelism) ---------------------------

def _unit(name: str, value: object) -> None:
    if value not in UNITS:
        raise NfsearchError(f"ceiling: {name} must be one of {', '.join(UNITS)}, got {value!r}")


def _sms(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise NfsearchError(f"ceiling: {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Mode:
    """One way to run the GPU for a while: (unit, us one unit takes in this mode) for each unit it
    advances; the others do not advance."""

    name: str
    unit_us: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        if not self.unit_us:
            raise NfsearchError(f"ceiling: mode {self.name!r} advances no unit")
        for u, us in self.unit_us:
            _unit("a mode's unit", u)
            _positive(f"{u} us of mode {self.name!r}", us)
        if len({u for u, _ in self.unit_us}) != len(self.unit_us):
            raise NfsearchError(f"ceiling: mode {self.name!r} names a unit twice")

    def rate(self, unit: str) -> float:
        """Units of `unit` per us in this mode (0 when it does not advance)."""
        return next((1.0 / us for u, us in self.unit_us if u == unit), 0.0)


def solve_mix(modes: Sequence[Mode], chunk: int = 100_000) -> Mix:
    """The exact optimum of the module docstring's program over the units the modes advance.

    An optimal vertex with support S has |S| linearly independent tight unit rows T, so every
    vertex solves R[T, S] y_S = 1 for some |S| = |T| <= #units: enumerate them (batched in numpy),
    keep the feasible ones, take the least time (the fewest modes among ties)."""
    if not modes:
        raise NfsearchError("ceiling: no modes to mix")
    units = [u for u in UNITS if any(m.rate(u) > 0 for m in modes)]
    scale = max(us for m in modes for _, us in m.unit_us)  # rates in units per `scale` us: O(1)
    rates = np.array([[m.rate(u) * scale for u in units] for m in modes])  # [modes, units]
    best_t, best_y, best_s = np.inf, None, None
    for size in range(1, len(units) + 1):
        combos = itertools.combinations(range(len(modes)), size)
        while block := list(itertools.islice(combos, chunk)):
            s_idx = np.array(block)  # [n, size] mode indices
            r = rates[s_idx]  # [n, size modes, units]
            for rows in itertools.combinations(range(len(units)), size):
                a = r[:, :, list(rows)].transpose(0, 2, 1)  # [n, tight units, modes]
                norm = np.prod(np.linalg.norm(a, axis=2), axis=1)
                ok = np.abs(np.linalg.det(a)) > 1e-11 * norm
                if not ok.any():
                    continue
                y = np.linalg.solve(a[ok], np.ones((int(ok.sum()), size, 1)))[..., 0]  # [n', size]
                done = np.einsum("ns,nsu->nu", y, r[ok])  # units done, every unit
                feas = (y >= -1e-12).all(axis=1) & (done >= 1 - 1e-9).all(axis=1)
                if not feas.any():
                    continue
                t = y.sum(axis=1)
                t[~feas] = np.inf
                i = int(np.argmin(t))
                if t[i] < best_t * (1 - 1e-12):
                    best_t, best_y, best_s = float(t[i]), y[i], s_idx[ok][i]
    if best_y is None:  # every unit has a mode advancing it, so only near-singular rates get here
        raise NfsearchError(f"ceiling: no vertex of the linear program over {len(modes)} modes "
                            "(degenerate rates)")
    return Mix(best_t * scale, tuple((modes[k].name, float(v) * scale)
                                     for k, v in zip(best_s, best_y, strict=True) if v > 1e-12))


@dataclass(frozen=True)
class PairRate:
    """Two units measured side by side on a placed split: `bottom` on the bottom `bottom_sms` SM
    slots, `top` on the top `top_sms`; us per unit of each, co-running."""

    bottom: str
    top: str
    bottom_sms: int
    top_sms: int
    bottom_us: float
    top_us: float

    def __post_init__(self) -> None:
        _unit("bottom", self.bottom)
        _unit("top", self.top)
        if self.bottom == self.top:
            raise NfsearchError(f"ceiling: a pair needs two units, got {self.bottom} twice")
        _sms("bottom_sms", self.bottom_sms)
        _sms("top_sms", self.top_sms)
        _positive("bottom_us", self.bottom_us)
        _positive("top_us", self.top_us)

    @property
    def mode(self) -> Mode:
        return Mode(f"{self.bottom}|{self.top} {self.bottom_sms}/{self.top_sms}",
                    ((self.bottom, self.bottom_us), (self.top, self.top_us)))


@dataclass(frozen=True)
class UnitRate:
    """One unit alone on a placed partition of `num_sms` SMs: us per unit."""

    unit: str
    num_sms: int
    us: float

    def __post_init__(self) -> None:
        _unit("unit", self.unit)
        _sms("num_sms", self.num_sms)
        _positive("us", self.us)


def three_way_modes(alone: Sequence[UnitRate], top_sms: int) -> list[Mode]:
    """Optimistic three-way splits: compute on c, memory on m, network on n SMs with c + m + n =
    `top_sms`, each unit at its rate alone on its share (a co-run is no faster), for every (c, m, n)
    where all three were measured alone."""
    _sms("top_sms", top_sms)
    have = {(a.unit, a.num_sms): a.us for a in alone}
    sizes = {u: sorted(s for v, s in have if v == u) for u in UNITS}
    return [Mode(f"3-way {c}/{top_sms - c - n}/{n} (alone rates)",
                 (("compute", have["compute", c]), ("memory", have["memory", top_sms - c - n]),
                  ("network", have["network", n])))
            for c in sizes["compute"] for n in sizes["network"]
            if ("memory", top_sms - c - n) in have]


@dataclass(frozen=True)
class NetworkCeiling:
    """Measured units of a tensor-parallel layer and the ceilings on the overlap's speedup."""

    c_us: float
    m_us: float
    n_us: float  # the layer's all-reduces over the whole batch, alone on all SMs
    other_us: float  # the rest of the layer (norms, RoPE, KV append), alone on all SMs
    seq_us: float  # one unit each of compute, memory and network, as the sequential schedule runs them
    top_sms: int  # the placed SMs the splits share
    pairs: tuple[PairRate, ...]
    alone: tuple[UnitRate, ...]  # each unit alone on a partition: the three-way modes' rates
    mix: Mix  # over every mode: the ceiling
    pairs_mix: Mix  # over the measured modes only (alone on all SMs and the pairs)

    @property
    def units(self) -> float:
        """Over the three units alone."""
        return self.seq_us / self.mix.time_us

    @property
    def other_serial(self) -> float:
        """The layer, with the other ops run after the overlapped units."""
        return (self.seq_us + self.other_us) / (self.mix.time_us + self.other_us)

    @property
    def other_free(self) -> float:
        """The layer, with the other ops hidden at no cost (the loosest ceiling)."""
        return (self.seq_us + self.other_us) / self.mix.time_us

    def to_dict(self) -> dict[str, Any]:
        return {"c_us": self.c_us, "m_us": self.m_us, "n_us": self.n_us, "other_us": self.other_us,
                "seq_us": self.seq_us, "top_sms": self.top_sms, "pairs": [asdict(p) for p in self.pairs],
                "alone_partition": [asdict(a) for a in self.alone],
                "best_us": self.mix.time_us, "best_mix": [list(m) for m in self.mix.modes],
                "pairs_best_us": self.pairs_mix.time_us,
                "pairs_best_mix": [list(m) for m in self.pairs_mix.modes],
                "ceiling_units": self.units, "ceiling_units_pairs_only": self.seq_us / self.pairs_mix.time_us,
                "ceiling_layer_other_serial": self.other_serial,
                "ceiling_layer_other_free": self.other_free}


def network_ceiling(c_us: float, m_us: float, n_us: float, other_us: float, seq_us: float,
                    pairs: Sequence[PairRate], alone: Sequence[UnitRate], top_sms: int) -> NetworkCeiling:
    """The ceiling of a tensor-parallel layer (module docstring): modes each unit alone on all SMs,
    the measured `pairs`, and the three-way splits from `alone` over c + m + n = `top_sms`."""
    for name, v in (("c_us", c_us), ("m_us", m_us), ("n_us", n_us), ("seq_us", seq_us)):
        _positive(name, v)
    if not other_us >= 0:
        raise NfsearchError(f"ceiling: other_us must be >= 0, got {other_us!r}")
    measured = [Mode("compute alone", (("compute", c_us),)), Mode("memory alone", (("memory", m_us),)),
                Mode("network alone", (("network", n_us),)), *(p.mode for p in pairs)]
    return NetworkCeiling(c_us, m_us, n_us, other_us, seq_us, top_sms, tuple(pairs), tuple(alone),
                          solve_mix(measured + three_way_modes(alone, top_sms)), solve_mix(measured))


# ---- three units on one GPU: compute, memory and the other ops -----------------------------------

@dataclass(frozen=True)
class TripleRate:
    """Compute, the other ops and memory side by side: compute on the bottom `compute_sms` SM slots,
    the other ops on the next `other_sms`, memory on the top `memory_sms`; us per unit of each."""

    compute_sms: int
    other_sms: int
    memory_sms: int
    tc_us: float
    to_us: float
    tm_us: float

    def __post_init__(self) -> None:
        for f in ("compute_sms", "other_sms", "memory_sms"):
            _sms(f, getattr(self, f))
        for f in ("tc_us", "to_us", "tm_us"):
            _positive(f, getattr(self, f))

    @property
    def mode(self) -> Mode:
        return Mode(f"3-way {self.compute_sms}/{self.other_sms}/{self.memory_sms}",
                    (("compute", self.tc_us), ("other", self.to_us), ("memory", self.tm_us)))


@dataclass(frozen=True)
class OtherCeiling:
    """A one-GPU layer with its other ops as a third unit (module docstring): the ceiling on the
    overlap's speedup over the sequential layer, between `Ceiling.other_serial` and `other_free`."""

    c_us: float
    m_us: float
    o_us: float  # the other ops over the whole batch, alone on all SMs
    seq_us: float  # one unit each of compute, memory and other, as the sequential schedule runs them
    pairs: tuple[PairRate, ...]  # compute|other and memory|other side by side (compute|memory: splits)
    triples: tuple[TripleRate, ...]
    mix: Mix

    @property
    def layer(self) -> float:
        return self.seq_us / self.mix.time_us

    def to_dict(self) -> dict[str, Any]:
        return {"o_us": self.o_us, "seq_layer_us": self.seq_us, "pairs": [asdict(p) for p in self.pairs],
                "triples": [asdict(t) for t in self.triples], "best_us": self.mix.time_us,
                "best_mix": [list(m) for m in self.mix.modes], "ceiling_layer": self.layer}


def other_ceiling(c_us: float, m_us: float, o_us: float, seq_us: float, splits: Sequence[SplitRate],
                  pairs: Sequence[PairRate], triples: Sequence[TripleRate]) -> OtherCeiling:
    """Modes, all measured: each unit alone on all SMs, the compute|memory `splits`, the `pairs`
    with the other ops as one side, and the three-way `triples`. Unlike the network's three-way modes
    these are not each unit's rate alone on its share: that would drop the compute-memory
    interference which limits a one-GPU overlap in the first place, so the ceiling ranges over the
    measured layouts only, as the two-unit one ranges over the measured splits."""
    for name, v in (("c_us", c_us), ("m_us", m_us), ("o_us", o_us), ("seq_us", seq_us)):
        _positive(name, v)
    for p in pairs:
        if "other" not in (p.bottom, p.top) or "network" in (p.bottom, p.top):
            raise NfsearchError(f"ceiling: a pair beside the other ops must have them as one side and "
                                f"no network, got {p.bottom}|{p.top}")
    modes = [Mode("compute alone", (("compute", c_us),)), Mode("memory alone", (("memory", m_us),)),
             Mode("other alone", (("other", o_us),)),
             *(Mode(s.name, (("compute", s.tc_us), ("memory", s.tm_us))) for s in splits),
             *(p.mode for p in pairs), *(t.mode for t in triples)]
    return OtherCeiling(c_us, m_us, o_us, seq_us, tuple(pairs), tuple(triples), solve_mix(modes))
