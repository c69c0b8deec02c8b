"""A fixed pipeline structure and its timing: pieces, their dependencies, the periodic steady state
and the unrolled multi-layer prediction. Labels in brackets refer to docs/formulation.md.

Both MILP stages and `solve` use this module for the dependency semantics, so the solver, the
prediction and the schedule agree on which nano-op waits for which.

A *piece* is one nano-op slot: op `o` cut into `p` pieces over `K` nano-batches, piece `i` covering
nano-batches [i*K/p, (i+1)*K/p). A piece with no tokens of its op's class (a decode op on a
prefill-only range) is *empty*: it is not issued on any stream and takes no time, but it stays in
the dependency graph, so its dependents still wait for its own deps (dependencies are transitive
through it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nfsearch.search.problem import Dep, SearchProblem, StageOp

SCALE = 100  # solver time units per microsecond (0.01 us)


def to_units(us: float) -> int:
    """Microseconds to solver units, rounded up so a solver schedule stays feasible in real time."""
    return int(-(-round(us * SCALE * 1e6) // 1_000_000))


@dataclass(frozen=True)
class Piece:
    op: str
    index: int
    batches: tuple[int, int]  # [first, last + 1) nano-batch

    @property
    def name(self) -> str:
        return f"{self.op}.{self.index}"


@dataclass(frozen=True)
class Structure:
    """What stage 1 decides: nano-batch count and sizes, op splits, per-stream issue order."""

    num_nano_batches: int
    boundaries: tuple[int, ...]  # granules, 0 = b0 < ... < bK = num_granules
    splits: dict[str, int]  # op -> pieces
    stream_order: dict[str, tuple[str, ...]]  # stream -> non-empty piece names, in issue order
    gather_granules: int = 0  # [S1.form]: granules [0, this) take the all-gather form


def piece_batches(k: int, p: int, i: int) -> tuple[int, int]:
    return i * k // p, (i + 1) * k // p


def class_range(problem: SearchProblem, token_class: str) -> tuple[int, int]:
    """[lo, hi) granules of a token class in the dense batch (decode tokens come first)."""
    if token_class == "decode":
        return 0, problem.decode_granules
    if token_class == "prefill":
        return problem.decode_granules, problem.num_granules
    if token_class == "gather":
        return 0, problem.gather_granules
    if token_class == "reduce":
        return problem.gather_granules, problem.num_granules
    return 0, problem.num_granules


def own_granules(problem: SearchProblem, op: StageOp, granules: tuple[int, int]) -> int:
    lo, hi = class_range(problem, op.token_class)
    return max(0, min(granules[1], hi) - max(granules[0], lo))


def own_range(problem: SearchProblem, op: StageOp, granules: tuple[int, int]) -> tuple[int, int]:
    """(a, n) of a piece on dense granules `granules`: its own-class granules are class granules
    [a, a + n), a = clamp(start) - lo (the index of StageOp.scale) [S1.lat-pos]."""
    lo, hi = class_range(problem, op.token_class)
    return min(max(granules[0], lo), hi) - lo, own_granules(problem, op, granules)


def all_pieces(problem: SearchProblem, k: int, splits: dict[str, int]) -> list[Piece]:
    return [Piece(o.name, i, piece_batches(k, splits[o.name], i))
            for o in problem.ops for i in range(splits[o.name])]


def granules_of(boundaries: tuple[int, ...], piece: Piece) -> tuple[int, int]:
    return boundaries[piece.batches[0]], boundaries[piece.batches[1]]


def waits_for(problem: SearchProblem, consumer: StageOp, dep: Dep, cons: tuple[int, int],
              prod: tuple[int, int]) -> bool:
    """Does a consumer piece on granules `cons` wait for a producer piece on granules `prod`? [prec]"""
    if dep.scope == "token":
        lo, hi = cons
    else:  # prefix: everything of the consumer's class before the end of its range
        lo, hi = class_range(problem, consumer.token_class)[0], cons[1]
    return max(lo, prod[0]) < min(hi, prod[1])


def dependency_edges(problem: SearchProblem, k: int, boundaries: tuple[int, ...],
                     splits: dict[str, int]) -> list[tuple[str, str, bool]]:
    """(producer piece, consumer piece, prev_layer) for every wait [S1.prec] [S1.wrap]."""
    edges = []
    for o in problem.ops:
        for i in range(splits[o.name]):
            cons = granules_of(boundaries, Piece(o.name, i, piece_batches(k, splits[o.name], i)))
            for dep in o.deps:
                pu = splits[dep.op]
                for j in range(pu):
                    prod = granules_of(boundaries, Piece(dep.op, j, piece_batches(k, pu, j)))
                    if waits_for(problem, o, dep, cons, prod):
                        edges.append((f"{dep.op}.{j}", f"{o.name}.{i}", dep.prev_layer))
    return edges


def _constraint_edges(problem: SearchProblem, s: Structure, dur: dict[str, float],
                      period: float) -> list[tuple[str, str, float]]:
    """Difference constraints start_v >= start_u + w of the periodic steady state."""
    edges = [(u, v, dur[u] - (period if prev else 0.0))
             for u, v, prev in dependency_edges(problem, s.num_nano_batches, s.boundaries, s.splits)]
    for order in s.stream_order.values():
        edges += [(a, b, dur[a]) for a, b in zip(order, order[1:], strict=False)]  # [S2.order]
        if order:
            edges.append((order[-1], order[0], dur[order[-1]] - period))  # [S1.fifo]
    return edges


def steady_state(problem: SearchProblem, s: Structure, dur: dict[str, float],
                 period_us: float) -> dict[str, float] | None:
    """ASAP start of every piece within one period (earliest non-empty start = 0), or None when
    `period_us` is infeasible for this structure (a positive cycle)."""
    nodes = [p.name for p in all_pieces(problem, s.num_nano_batches, s.splits)]
    edges = _constraint_edges(problem, s, dur, period_us)
    start = dict.fromkeys(nodes, 0.0)
    tol = 1e-9 * max(1.0, period_us)
    for _ in range(len(nodes) + 1):
        changed = False
        for u, v, w in edges:
            if start[u] + w > start[v] + tol:
                start[v] = start[u] + w
                changed = True
        if not changed:
            real = [start[n] for order in s.stream_order.values() for n in order]
            shift = min(real) if real else 0.0
            return {n: t - shift for n, t in start.items()}
    return None


def min_period(problem: SearchProblem, s: Structure, dur: dict[str, float]) -> float:
    """Smallest feasible period of a fixed structure (max cycle ratio, by bisection)."""
    lo = max((sum(dur[n] for n in order) for order in s.stream_order.values()), default=0.0)
    hi = max(lo, sum(dur.values())) + 1e-6
    if steady_state(problem, s, dur, lo) is not None:
        return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        if steady_state(problem, s, dur, mid) is None:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-7 * max(1.0, hi):
            break
    return hi


def layer_span_us(s: Structure, start: dict[str, float], dur: dict[str, float]) -> float:
    """First start to last end of one layer's (non-empty) nano-ops."""
    real = [n for order in s.stream_order.values() for n in order]
    if not real:
        return 0.0
    return max(start[n] + dur[n] for n in real) - min(start[n] for n in real)


def unrolled_makespan(problem: SearchProblem, s: Structure, dur: dict[str, float],
                      extra: Sequence[tuple[str, str, bool]] = ()) -> float:
    """ASAP execution of `num_layers` layers as one graph (what the runtime replays): longest path
    over deps, stream order, the cross-layer edges (prev_layer deps, stream FIFO) and `extra`
    edges (before, after, after is in the next layer): the order between nano-ops on shared SMs."""
    nodes = [p.name for p in all_pieces(problem, s.num_nano_batches, s.splits)]
    deps = dependency_edges(problem, s.num_nano_batches, s.boundaries, s.splits)
    preds: dict[str, list[tuple[str, bool]]] = {n: [] for n in nodes}
    for u, v, prev in [*deps, *extra]:
        preds[v].append((u, prev))
    for order in s.stream_order.values():
        for a, b in zip(order, order[1:], strict=False):
            preds[b].append((a, False))
        if order:
            preds[order[0]].append((order[-1], True))
    topo = _topological(nodes, [(u, v) for v, ps in preds.items() for u, prev in ps if not prev])
    end_prev: dict[str, float] = {}
    makespan = 0.0
    for _ in range(problem.num_layers):
        end: dict[str, float] = {}
        for n in topo:
            t = max([end[u] if not prev else end_prev.get(u, 0.0) for u, prev in preds[n]], default=0.0)
            end[n] = t + dur[n]
        makespan = max(makespan, max(end.values(), default=0.0))
        end_prev = end
    return makespan


def _topological(nodes: list[str], edges: list[tuple[str, str]]) -> list[str]:
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    indeg = dict.fromkeys(nodes, 0)
    for u, v in edges:
        succ[u].append(v)
        indeg[v] += 1
    ready = [n for n in nodes if indeg[n] == 0]
    out = []
    while ready:
        n = ready.pop(0)
        out.append(n)
        for v in succ[n]:
            indeg[v] -= 1
            if indeg[v] == 0:
                ready.append(v)
    if len(out) != len(nodes):
        raise ValueError("stream order contradicts the in-layer dependencies (a cycle)")
    return out


@dataclass(frozen=True)
class Timeline:
    period_us: float
    start_us: dict[str, float]  # ASAP steady state, one layer
    layer_span_us: float
    iteration_us: float  # num_layers unrolled + tail_us


def evaluate(problem: SearchProblem, s: Structure, dur: dict[str, float],
             period_us: float | None = None) -> Timeline:
    """Steady state at `period_us` (default: the structure's minimal period) and the prediction."""
    period = min_period(problem, s, dur) if period_us is None else period_us
    start = steady_state(problem, s, dur, period)
    if start is None:
        raise ValueError(f"period {period} us is infeasible for this structure")
    return Timeline(period, start, layer_span_us(s, start, dur),
                    unrolled_makespan(problem, s, dur) + problem.tail_us)
