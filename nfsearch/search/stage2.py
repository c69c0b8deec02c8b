"""Stage 2 MILP: keep stage 1's structure (K, boundaries, splits, per-stream order) and choose the
SM count of every nano-op, charging interference where nano-ops of different streams overlap.
Labels in brackets refer to docs/formulation.md.
"""

from __future__ import annotations

import itertools
import math

from ortools.sat.python import cp_model

from nfsearch.search.problem import SearchProblem
from nfsearch.search.stage1 import StageResult, run_solver
from nfsearch.search.timeline import (
    SCALE,
    Structure,
    all_pieces,
    dependency_edges,
    granules_of,
    own_range,
    to_units,
)

NETWORK = "network"  # the one stream whose partition is fixed for the whole stream [S2.net]
# intervals that touch within this do not meet (float sums of the solver's integer times)
TOUCH_US = 1e-6


def slowdown(problem: SearchProblem, kind: str, other: str, j: int) -> float:
    return problem.interference.get((kind, other), (1.0,) * len(problem.sm_options))[j]


def piece_ranges(problem: SearchProblem, s: Structure) -> dict[str, tuple[int, int]]:
    """Piece name -> (a, n): its own-class granules are class granules [a, a + n)."""
    ops = {o.name: o for o in problem.ops}
    return {p.name: own_range(problem, ops[p.op], granules_of(s.boundaries, p))
            for p in all_pieces(problem, s.num_nano_batches, s.splits)}


class _Costs:
    """Durations in solver units of the non-empty nano-ops of a structure, per SM option and per
    set of other streams met (the slowdown is the largest of theirs)."""

    def __init__(self, problem: SearchProblem, s: Structure):
        self.problem = problem
        self.ops = {o.name: o for o in problem.ops}
        self.ranges = piece_ranges(problem, s)
        self.stream_of = {n: k for k, order in s.stream_order.items() for n in order}
        self.streams = [k for k, order in s.stream_order.items() if order]
        self.others = {a: [b for b in self.streams if b != a] for a in self.streams}
        self.met_sets = {a: [c for r in range(len(o) + 1) for c in itertools.combinations(o, r)]
                         for a, o in self.others.items()}

    def latency_us(self, n: str, j: int) -> float:
        """[S2.lat] L_i[j]: the piece's own (a, n) entry, position scale included."""
        return self.ops[n.rsplit(".", 1)[0]].piece_latency_us(*self.ranges[n], j)

    def factor(self, n: str, j: int, met) -> float:
        return max((slowdown(self.problem, self.stream_of[n], b, j) for b in met), default=1.0)

    def units(self, n: str, j: int, met=()) -> int:
        return to_units(self.latency_us(n, j) * self.factor(n, j, met))

    def worst(self, n: str, js) -> int:
        return max(self.units(n, j, self.others[self.stream_of[n]]) for j in js)


def size_candidates(c: _Costs) -> dict[str, list[int]]:
    """[S2.cand] SM options (indices) that some optimal solution uses, per non-empty nano-op, and for
    the network stream under the key NETWORK. Sound restriction, by exchange arguments:
    - network: drop an option when a smaller one is no slower for every network nano-op and every
      set of streams met (a smaller static partition only relaxes [S2.sms-net]);
    - compute/memory: a nano-op may use at most cap = N - (s_net if it meets a network nano-op or
      a nano-op of the other compute/memory stream, else 0) - (largest size among the nano-ops of
      the other compute/memory stream that it overlaps, or 0); replacing its size by the fastest
      option <= cap (ties: fewest SMs) for its set of streams met keeps every constraint and
      shortens it. So its candidates are those best responses over the caps that the other
      stream's candidates allow; iterated to a fixed point (the sets only shrink)."""
    p = c.problem
    sm, nj, big = p.sm_options, len(p.sm_options), p.num_sms
    conc = p.concurrent_sms or big  # [S2.sms] side by side, only this many SMs are placeable
    net_ops = [n for n, a in c.stream_of.items() if a == NETWORK]
    net: list[int] = []
    # ascending: a dominating option is smaller, so it is already kept (or dominated by a kept one)
    for j in range(nj if net_ops else 0):
        if not any(all(c.units(n, jj, met) <= c.units(n, j, met)
                       for n in net_ops for met in c.met_sets[NETWORK]) for jj in net):
            net.append(j)
    net_sizes = [sm[j] for j in net]
    cm = [a for a in c.streams if a != NETWORK]
    cand = {n: set(range(nj)) for n, a in c.stream_of.items() if a != NETWORK}
    changed = True
    while changed:  # Gauss-Seidel rounds, streams in a fixed order (deterministic)
        changed = False
        for a in cm:
            other = {0} | {sm[j] for n, b in c.stream_of.items() if b in cm and b != a for j in cand[n]}
            if net_sizes:  # beside nothing: all SMs [S2.sms-net]; else the network partition is kept
                caps = sorted({big} | {conc - sn - o for sn in net_sizes for o in other})
            else:
                caps = sorted({big if o == 0 else conc - o for o in other})
            for n in (n for n, b in c.stream_of.items() if b == a):
                best = set()
                for cap in caps:
                    fit = [j for j in range(nj) if sm[j] <= cap]
                    for met in (c.met_sets[a] if fit else ()):
                        best.add(min(fit, key=lambda j, met=met: (c.units(n, j, met), j)))
                if best != cand[n]:
                    cand[n] = best
                    changed = True
    out = {n: sorted(v) for n, v in cand.items()}
    if net_ops:
        out[NETWORK] = net
    return out


def solve_stage2(problem: SearchProblem, s: Structure, time_limit_s: float,
                 window_layers: int = 2) -> StageResult:
    """`window_layers` = m: the layer span is held to m*T [S2.window], so a nano-op can only meet
    nano-ops of layers l-(m-1) .. l+(m-1) (m = 2: the previous, the same and the next layer)."""
    c = _Costs(problem, s)
    sm, big = problem.sm_options, problem.num_sms
    conc = problem.concurrent_sms or big
    stream_of, streams, others = c.stream_of, c.streams, c.others
    cand = size_candidates(c)  # [S2.cand]
    if any(not v for v in cand.values()):
        return StageResult("INFEASIBLE", s)  # no size fits next to the network partition
    opts = {n: cand[NETWORK if a == NETWORK else n] for n, a in stream_of.items()}
    horizon = 1 + sum(c.worst(n, opts[n]) for n in stream_of)
    m = cp_model.CpModel()
    period = m.new_int_var(0, horizon, "T")
    span = m.new_int_var(0, horizon, "span")
    m.add(span <= window_layers * period)  # [S2.window]

    def one_hot(tag: str, js: list[int]) -> dict[int, cp_model.IntVar]:
        lits = {j: m.new_bool_var(f"y_{tag}_{sm[j]}") for j in js}
        m.add_exactly_one(lits.values())  # [S2.size] / [S2.net] one SM count
        return lits

    net_y = one_hot(NETWORK, cand[NETWORK]) if NETWORK in cand else None
    s_net = sum(sm[j] * v for j, v in net_y.items()) if net_y else 0
    max_net = max(sm[j] for j in net_y) if net_y else 0
    y, size, top, net_meet = {}, {}, {}, {}
    for n, a in stream_of.items():
        y[n] = net_y if a == NETWORK else one_hot(n, opts[n])
        size[n] = sum(sm[j] * v for j, v in y[n].items())
        top[n] = max(sm[j] for j in y[n])
        if a != NETWORK and net_y:
            # g_i: i meets a nano-op of the network stream (forced by every such ov_ik below)
            net_meet[n] = m.new_bool_var(f"g_{n}")
            if top[n] + max_net > conc:  # [S2.sms-net] only while beside the network partition
                m.add(size[n] + s_net <= conc).only_enforce_if(net_meet[n])

    start, end, dur, hit = {}, {}, {}, {}
    for p in all_pieces(problem, s.num_nano_batches, s.splits):
        n = p.name
        start[n] = m.new_int_var(0, horizon, f"s_{n}")
        if n not in stream_of:  # empty piece: a zero-length waypoint of the dependency graph
            end[n] = start[n]
            continue
        a = stream_of[n]
        dur[n] = m.new_int_var(min(c.units(n, j) for j in opts[n]), c.worst(n, opts[n]), f"d_{n}")
        end[n] = m.new_int_var(0, horizon, f"e_{n}")
        m.add(end[n] == start[n] + dur[n])
        m.add(span >= end[n])
        # [S2.lat] d >= sum_j y_j L[n][j], and, when n meets stream b, >= sum_j y_j L[n][j] f_b[j]
        # (the one-hot y makes these sums the chosen entry: the product y * hit is never formed)
        m.add(dur[n] >= sum(c.units(n, j) * v for j, v in y[n].items()))
        for b in others[a]:
            if any(c.units(n, j, (b,)) > c.units(n, j) for j in opts[n]):
                hit[n, b] = m.new_bool_var(f"hit_{n}_{b}")
                m.add(dur[n] >= sum(c.units(n, j, (b,)) * v for j, v in y[n].items())
                      ).only_enforce_if(hit[n, b])

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

    # [S2.overlap] i (stream a, layer l) and j (stream b, layer l+d) are disjoint, or ov_ij = 1;
    # ov_ij charges both sides' slowdown and makes the two fit side by side: g_i when j is a network
    # nano-op [S2.sms-net], the SM sum for compute vs memory [S2.sms]. [S2.back] A later layer's
    # nano-op ordered before an earlier layer's is held to the same fit: the runtime orders nano-ops
    # on shared SMs only from a layer to the next (emit), so such a pair must not share SMs.
    for ia, a in enumerate(streams):
        for b in streams[ia + 1:]:
            for i in s.stream_order[a]:
                for jn in s.stream_order[b]:
                    pay = [hit[k] for k in ((i, b), (jn, a)) if k in hit]
                    fit = [net_meet[x] for x, o in ((i, b), (jn, a)) if o == NETWORK and x in net_meet]
                    share = NETWORK not in (a, b) and top[i] + top[jn] + max_net > conc
                    if share:
                        fit.append(m.new_bool_var(f"fit_{i}_{jn}"))  # [S2.sms]
                        m.add(size[i] + size[jn] + s_net <= conc).only_enforce_if(fit[-1])
                    if not pay and not fit:
                        continue
                    ov = m.new_bool_var(f"ov_{i}_{jn}")
                    for d in range(-(window_layers - 1), window_layers):
                        before = m.new_bool_var(f"bef_{i}_{jn}_{d}")
                        after = m.new_bool_var(f"aft_{i}_{jn}_{d}")
                        m.add(end[i] <= start[jn] + d * period).only_enforce_if(before)
                        m.add(end[jn] + d * period <= start[i]).only_enforce_if(after)
                        m.add_bool_or([before, after, ov])
                        back = before if d < 0 else after if d > 0 else None
                        for lit in fit if back is not None else ():
                            m.add_implication(back, lit)  # [S2.back]
                    for lit in pay + fit:
                        m.add_implication(ov, lit)

    weight = horizon + 1  # lexicographic: T, then span
    m.minimize(weight * period + span)
    solver = run_solver(m, problem, time_limit_s)
    status = solver.status
    if status not in ("OPTIMAL", "FEASIBLE"):
        return StageResult(status, s)
    t_val = int(solver.value(period))
    bound = t_val if status == "OPTIMAL" else int(math.ceil(solver.bound - 1e-6)) // weight
    sizes = {n: sm[next(j for j, v in y[n].items() if solver.value(v))] for n in stream_of}
    # a stream's partition: the largest size its nano-ops use (the static one, for network)
    parts = {a: max(sizes[n] for n in s.stream_order[a]) for a in streams}
    return StageResult(status, s, t_val, int(solver.value(span)), min(bound, t_val),
                       {n: int(solver.value(v)) for n, v in start.items()}, parts,
                       {n: int(solver.value(v)) for n, v in dur.items()}, sizes)


def charged(problem: SearchProblem, r: StageResult, window_layers: int = 2
            ) -> tuple[dict[str, int], dict[str, float], dict[str, bool]]:
    """SM counts, exact durations (us) and overlapped flags of a stage 2 solution, at the solver's
    start times and period. A nano-op is charged the slowdown of each other stream it really meets
    (max over them), on its own SM count.

    [S2.polish] Then, one nano-op at a time (a fixed order) until nothing changes, a compute/memory
    nano-op takes the fastest option that fits beside the network partition and the nano-ops of the
    other stream it really meets, when that is strictly faster. Durations only shrink, so every
    constraint still holds at the same starts and period; a nano-op meeting nothing gets the
    fastest size overall (the solver leaves a nano-op off the critical path at any size)."""
    s = r.structure
    assert s is not None
    c = _Costs(problem, s)
    sm, t = problem.sm_options, r.period_units / SCALE
    sizes = dict(r.sizes)
    start = {n: r.start_units[n] / SCALE for n in c.stream_of}
    s_net = max((sizes[n] for n, a in c.stream_of.items() if a == NETWORK), default=0)

    def meets(n: str, dur: dict[str, float], backward: bool = False) -> list[str]:
        """Nano-ops of other streams that n meets (in the layers of the window) and, with
        `backward`, those ordered against it later layer first [S2.back]: all must fit beside n."""
        s0, e0 = start[n], start[n] + dur[n]
        out = []
        for jn, b in c.stream_of.items():
            if b == c.stream_of[n] or dur[jn] <= 0 or dur[n] <= 0:
                continue
            for d in range(-(window_layers - 1), window_layers):
                sj, ej = start[jn] + d * t, start[jn] + dur[jn] + d * t
                back = backward and ((d < 0 and e0 <= sj + TOUCH_US) or (d > 0 and ej <= s0 + TOUCH_US))
                if (s0 < ej - TOUCH_US and sj < e0 - TOUCH_US) or back:
                    out.append(jn)
                    break
        return out

    def exact(n: str, j: int, dur: dict[str, float]) -> float:
        met = {c.stream_of[jn] for jn in meets(n, dur)}
        return c.latency_us(n, j) * c.factor(n, j, met)

    dur = {n: r.dur_units[n] / SCALE for n in c.stream_of}  # the solver's (upper bounds)
    dur = {n: exact(n, sm.index(sizes[n]), dur) for n in c.stream_of}
    changed = True
    while changed:  # durations only shrink and a size only changes when strictly faster: it ends
        changed = False
        for n, a in c.stream_of.items():
            d_now = exact(n, sm.index(sizes[n]), dur)  # partners may have shrunk away
            if d_now < dur[n] - 1e-9:
                dur[n], changed = d_now, True
            if a == NETWORK:
                continue
            met = meets(n, dur, backward=True)
            beside = [sizes[jn] for jn in met if c.stream_of[jn] != NETWORK]
            # [S2.sms-net] the network partition is reserved while n meets a collective, and
            # [S2.sms] beside a nano-op of the other compute/memory stream ([S2.back] alike)
            sn = s_net if beside or any(c.stream_of[jn] == NETWORK for jn in met) else 0
            cap = (problem.num_sms if not beside and not sn
                   else (problem.concurrent_sms or problem.num_sms) - sn - max(beside, default=0))
            fit = [jj for jj in range(len(sm)) if sm[jj] <= cap] or [sm.index(sizes[n])]
            j = min(fit, key=lambda jj: (exact(n, jj, dur), jj))
            d_new = exact(n, j, dur)
            if d_new < dur[n] - 1e-9:
                sizes[n], dur[n], changed = sm[j], d_new, True
    full = dict.fromkeys(c.ranges, 0.0)
    full.update(dur)
    flags = {n: any(c.factor(n, sm.index(sizes[n]), (c.stream_of[jn],)) > 1.0 for jn in meets(n, dur))
             for n in c.stream_of}
    return sizes, full, flags


def shared_sm_edges(problem: SearchProblem, s: Structure, sizes: dict[str, int], start: dict[str, float],
                    dur: dict[str, float], period: float) -> list[tuple[str, str, bool]]:
    """(before, after, after is in the next layer) for every pair of nano-ops of different streams
    that cannot run side by side on their SM counts (compute + memory + network partition, or one
    of them + the network partition, over the placeable SMs; all SMs clash with everything), in the
    order the steady state has them: the events emit adds between nano-ops on shared SMs. The
    prediction needs them: without them the unrolled layers run such pairs side by side."""
    conc = problem.concurrent_sms or problem.num_sms
    stream_of = {n: k for k, order in s.stream_order.items() for n in order}
    s_net = max((sizes[n] for n, k in stream_of.items() if k == NETWORK), default=0)

    def clash(i: str, j: str) -> bool:
        a, b = stream_of[i], stream_of[j]
        if NETWORK in (a, b):
            return sizes[j if a == NETWORK else i] + s_net > conc
        return sizes[i] + sizes[j] + s_net > conc

    edges = []
    for i, a in stream_of.items():
        for j, b in stream_of.items():
            if a != b and clash(i, j):
                for d in (0, 1):  # j in the same layer, or in the next
                    if start[i] + dur[i] <= start[j] + d * period + TOUCH_US:
                        edges.append((i, j, d == 1))
    return edges

