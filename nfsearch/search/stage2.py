"""Stage 2 MILP: keep stage 1's structure (K, boundaries, splits, per-stream order) and choose the
SM partition of every stream, charging interference where nano-ops of different streams overlap.
Labels in brackets refer to docs/formulation.md.
"""

from __future__ import annotations

import math

from ortools.sat.python import cp_model

from nfsearch.search.problem import SearchProblem
from nfsearch.search.stage1 import StageResult, run_solver
from nfsearch.search.timeline import (
    Structure,
    all_pieces,
    dependency_edges,
    granules_of,
    own_granules,
    to_units,
)


def slowdown(problem: SearchProblem, kind: str, other: str, j: int) -> float:
    return problem.interference.get((kind, other), (1.0,) * len(problem.sm_options))[j]


def piece_tokens(problem: SearchProblem, s: Structure) -> dict[str, int]:
    ops = {o.name: o for o in problem.ops}
    return {p.name: own_granules(problem, ops[p.op], granules_of(s.boundaries, p))
            for p in all_pieces(problem, s.num_nano_batches, s.splits)}


def solve_stage2(problem: SearchProblem, s: Structure, time_limit_s: float,
                 window_layers: int = 2) -> StageResult:
    """`window_layers` = m: the layer span is held to m*T [S2.window], so a nano-op can only meet
    nano-ops of layers l-(m-1) .. l+(m-1) (m = 2: the previous, the same and the next layer)."""
    ops = {o.name: o for o in problem.ops}
    nj = len(problem.sm_options)
    tokens = piece_tokens(problem, s)
    stream_of = {n: k for k, order in s.stream_order.items() for n in order}
    streams = [k for k, order in s.stream_order.items() if order]

    def units(n: str, j: int, other: str | None) -> int:
        lat = ops[n.rsplit(".", 1)[0]].latency_us[tokens[n]][j]
        return to_units(lat * (slowdown(problem, stream_of[n], other, j) if other else 1.0))

    others = {a: [b for b in streams if b != a] for a in streams}
    horizon = 1 + sum(max(units(n, j, b) for j in range(nj) for b in [None, *others[stream_of[n]]])
                      for n in stream_of)
    m = cp_model.CpModel()
    period = m.new_int_var(0, horizon, "T")
    span = m.new_int_var(0, horizon, "span")
    m.add(span <= window_layers * period)  # [S2.window]

    y = {(a, j): m.new_bool_var(f"y_{a}_{j}") for a in streams for j in range(nj)}
    for a in streams:
        m.add_exactly_one(y[a, j] for j in range(nj))  # [S2.choice] one partition size per stream
    # [S2.sms] partitions are disjoint and static: their sizes add up to at most the GPU
    m.add(sum(problem.sm_options[j] * y[a, j] for a in streams for j in range(nj)) <= problem.num_sms)

    start, end, dur, ov = {}, {}, {}, {}
    for p in all_pieces(problem, s.num_nano_batches, s.splits):
        n = p.name
        start[n] = m.new_int_var(0, horizon, f"s_{n}")
        if n not in stream_of:  # empty piece: a zero-length waypoint of the dependency graph
            end[n] = start[n]
            continue
        a = stream_of[n]
        lo = min(units(n, j, None) for j in range(nj))
        hi = max(units(n, j, b) for j in range(nj) for b in [None, *others[a]])
        dur[n] = m.new_int_var(lo, hi, f"d_{n}")
        end[n] = m.new_int_var(0, horizon, f"e_{n}")
        m.add(end[n] == start[n] + dur[n])
        m.add(span >= end[n])
        for j in range(nj):  # [S2.lat] latency_us[n][j], times the slowdown when overlapped
            m.add(dur[n] >= units(n, j, None)).only_enforce_if(y[a, j])
            for b in others[a]:
                if any(slowdown(problem, a, b, jj) > 1.0 for jj in range(nj)):
                    if (n, b) not in ov:
                        ov[n, b] = m.new_bool_var(f"ov_{n}_{b}")
                    m.add(dur[n] >= units(n, j, b)).only_enforce_if([y[a, j], ov[n, b]])

    for a in streams:
        order = s.stream_order[a]
        for u, v in zip(order, order[1:], strict=False):
            m.add(start[v] >= end[u])  # [S2.order] stage 1's issue order on the stream
        m.add(start[order[0]] + period >= end[order[-1]])  # [S2.fifo]
        m.add(sum(dur[n] for n in order) <= period)  # [S2.load] redundant
    for u, v, prev in dependency_edges(problem, s.num_nano_batches, s.boundaries, s.splits):
        if prev:
            m.add(start[v] + period >= end[u])  # [S2.wrap]
        else:
            m.add(start[v] >= end[u])  # [S2.prec]

    # [S2.overlap] i (stream a, layer l) and j (stream b, layer l+d) are disjoint, or both pay
    for ia, a in enumerate(streams):
        for b in streams[ia + 1:]:
            for i in s.stream_order[a]:
                for jn in s.stream_order[b]:
                    pay = [ov[k] for k in ((i, b), (jn, a)) if k in ov]
                    if not pay:
                        continue
                    for d in range(-(window_layers - 1), window_layers):
                        before = m.new_bool_var(f"bef_{i}_{jn}_{d}")
                        after = m.new_bool_var(f"aft_{i}_{jn}_{d}")
                        m.add(end[i] <= start[jn] + d * period).only_enforce_if(before)
                        m.add(end[jn] + d * period <= start[i]).only_enforce_if(after)
                        for lit in pay:
                            m.add_bool_or([before, after, lit])

    weight = horizon + 1  # lexicographic: T, then span
    m.minimize(weight * period + span)
    solver = run_solver(m, problem, time_limit_s)
    status = solver.status
    if status not in ("OPTIMAL", "FEASIBLE"):
        return StageResult(status, s)
    t_val = int(solver.value(period))
    bound = t_val if status == "OPTIMAL" else int(math.ceil(solver.bound - 1e-6)) // weight
    parts = {a: problem.sm_options[next(j for j in range(nj) if solver.value(y[a, j]))] for a in streams}
    return StageResult(status, s, t_val, int(solver.value(span)), min(bound, t_val),
                       {n: int(solver.value(v)) for n, v in start.items()}, parts,
                       {n: int(solver.value(v)) for n, v in dur.items()})


def charged(problem: SearchProblem, r: StageResult, window_layers: int = 2
            ) -> tuple[dict[str, float], dict[str, bool]]:
    """Exact durations (us) and overlapped flags of a stage 2 solution: a nano-op is charged the
    slowdown of each other stream it really meets in the solver's periodic schedule (max over them)."""
    s = r.structure
    assert s is not None
    ops = {o.name: o for o in problem.ops}
    tokens = piece_tokens(problem, s)
    stream_of = {n: k for k, order in s.stream_order.items() for n in order}
    t = r.period_units
    dur = dict.fromkeys(tokens, 0.0)
    flags: dict[str, bool] = {}
    for n, a in stream_of.items():
        j = problem.sm_options.index(r.partitions[a])
        base = ops[n.rsplit(".", 1)[0]].latency_us[tokens[n]][j]
        s0, e0 = r.start_units[n], r.start_units[n] + r.dur_units[n]
        met = {b for jn, b in stream_of.items() if b != a
               for d in range(-(window_layers - 1), window_layers)
               if s0 < r.start_units[jn] + r.dur_units[jn] + d * t and r.start_units[jn] + d * t < e0}
        factor = max((slowdown(problem, a, b, j) for b in met), default=1.0)
        dur[n] = base * factor
        flags[n] = bool(met) and factor > 1.0
    return dur, flags
