"""Stage 1 MILP for one nano-batch count K: sizes, splits and per-stream order under solo full-GPU
latencies (no interference, as in NanoFlow). Labels in brackets refer to docs/formulation.md.

CP-SAT is used as an integer-linear solver: linear constraints, enforcement literals (big-M in the
math), element constraints (one-hot table lookups) and NoOverlap (pairwise disjunctions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from nfsearch.search.problem import FORM_CLASSES, SearchProblem, StageOp
from nfsearch.search.timeline import Structure, class_range, piece_batches, to_units

_STATUS = {cp_model.OPTIMAL: "OPTIMAL", cp_model.FEASIBLE: "FEASIBLE",
           cp_model.INFEASIBLE: "INFEASIBLE", cp_model.MODEL_INVALID: "UNKNOWN",
           cp_model.UNKNOWN: "UNKNOWN"}


@dataclass(frozen=True)
class StageResult:
    status: str  # OPTIMAL | FEASIBLE | INFEASIBLE | UNKNOWN
    structure: Structure | None = None
    period_units: int = -1
    span_units: int = -1
    period_bound_units: int = 0  # proven lower bound on T for this sub-problem
    start_units: dict[str, int] = field(default_factory=dict)  # every piece (empty ones too)
    partitions: dict[str, int] = field(default_factory=dict)  # stage 2 only: stream -> largest size
    dur_units: dict[str, int] = field(default_factory=dict)  # stage 2 only: charged durations
    sizes: dict[str, int] = field(default_factory=dict)  # stage 2 only: non-empty nano-op -> SMs

    @property
    def ok(self) -> bool:
        return self.status in ("OPTIMAL", "FEASIBLE")


@dataclass(frozen=True)
class Solved:
    status: str
    values: dict[int, int]  # proto variable index -> value of the best solution
    bound: float  # best proven objective bound

    def value(self, var) -> int:
        return self.values[var.index]


# Wall-clock limits make a solve depend on the machine's speed; deterministic time (CP-SAT's own
# work counter) does not. Budgets are deterministic time; the wall limit is only a safety net.
WALL_SAFETY_FACTOR = 12.0  # generous: a binding wall limit makes the result depend on machine load


def _solve_once(model: cp_model.CpModel, problem: SearchProblem, budget: float,
                interleave: bool) -> tuple[str, dict[int, int], float, float]:
    solver = cp_model.CpSolver()
    prm = solver.parameters
    prm.num_workers = 1  # determinism: one thread, fixed seed
    prm.random_seed = problem.seed
    prm.linearization_level = 2  # big-M rows of the enforced constraints go into the LP
    prm.interleave_search = interleave
    prm.max_deterministic_time = max(budget, 1e-3)
    prm.max_time_in_seconds = max(WALL_SAFETY_FACTOR * budget, 1.0)
    status = _STATUS.get(solver.solve(model), "UNKNOWN")
    if status not in ("OPTIMAL", "FEASIBLE"):
        return status, {}, -math.inf, math.inf
    n = len(model.proto.variables)
    values = {i: int(solver.value(model.get_int_var_from_proto_index(i))) for i in range(n)}
    return status, values, solver.best_objective_bound, solver.objective_value


def run_solver(model: cp_model.CpModel, problem: SearchProblem, budget: float) -> Solved:
    """Deterministic solve in two phases: CP-SAT's default search (quick first solutions, often
    proves small models) on a third of the budget, then, unless proven, the whole CP-SAT portfolio
    (LNS, LP and core searches) interleaved on one thread, warm-started from phase one.
    `budget` is in CP-SAT deterministic-time units (about seconds), so the result does not depend
    on the machine's speed."""
    status, values, bound, obj = _solve_once(model, problem, budget / 3, False)
    if status in ("OPTIMAL", "INFEASIBLE"):
        return Solved(status, values, bound)
    if values:
        model.clear_hints()
        for i, v in values.items():
            model.add_hint(model.get_int_var_from_proto_index(i), v)
    status2, values2, bound2, obj2 = _solve_once(model, problem, 2 * budget / 3, True)
    best_bound = max(bound, bound2)
    if status2 == "INFEASIBLE" or (status2 == "OPTIMAL" and obj2 <= obj):
        return Solved(status2, values2, bound2)
    if values2 and obj2 <= obj:
        return Solved("FEASIBLE", values2, best_bound)
    return Solved(status if values else status2, values, best_bound)


def piece_sum_bound(cost: list[list[int]], total: int, pieces: int, min_each: int,
                    pick=min) -> int:
    """Least (or, with pick=max, largest) sum of cost[a_i][n_i] over `pieces` consecutive pieces,
    n_i >= min_each granules each, that tile [0, total): a_1 = 0, a_{i+1} = a_i + n_i (a small DP
    over the granules used). The pieces of one op always tile its class in this order."""
    best: list[float | None] = [0] + [None] * total  # best[t]: best sum so far with t granules used
    for _ in range(pieces):
        best = [pick((best[t - n] + cost[t - n][n] for n in range(min_each, t + 1)
                      if best[t - n] is not None), default=None) for t in range(total + 1)]
    return int(best[total]) if best[total] is not None else 0


def cost_table(problem: SearchProblem, op: StageOp, full: int) -> list[list[int]]:
    """cost[a][n]: units of a piece of n own-class granules from class granule a on all SMs
    (a + n <= the class's granule count) [S1.lat] [S1.lat-pos]."""
    lo, hi = class_range(problem, op.token_class)
    c = hi - lo
    if op.scale is None:
        row = [to_units(op.latency_us[n][full]) for n in range(c + 1)]
        return [row[:c + 1 - a] for a in range(c + 1)]
    return [[to_units(op.piece_latency_us(a, n, full)) for n in range(c + 1 - a)] for a in range(c + 1)]


def least_by_count(cost: list[list[int]]) -> list[int]:
    """min over a of cost[a][n], per n: what a piece of n granules costs at least anywhere."""
    return [min(cost[a][n] for a in range(len(cost) - n)) for n in range(len(cost))]


def hull_cuts(table: list[int], lo: int, hi: int) -> list[tuple[int, int, int, int]]:
    """Facets (n1, f1, n2, f2) of the lower convex hull of the points (n, table[n]), lo <= n <= hi."""
    hull: list[tuple[int, int]] = []
    for pt in ((n, table[n]) for n in range(lo, hi + 1)):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (pt[0] - x1) >= (pt[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(pt)
    return [(*a, *c) for a, c in zip(hull, hull[1:], strict=False)]


def refine_hint(problem: SearchProblem, k: int, coarse: StageResult) -> dict | None:
    """A K-nano-batch solution equal to a K'-solution (K' divides K): each coarse nano-batch is cut
    into K/K' parts, splits and start times kept. None when a coarse nano-batch is too small."""
    s = coarse.structure
    if s is None or k % s.num_nano_batches:
        return None
    r = k // s.num_nano_batches
    bounds = [0]
    for a, c in zip(s.boundaries, s.boundaries[1:], strict=False):
        if c - a < r:
            return None
        bounds += [a + (c - a) * t // r for t in range(1, r + 1)]
    return {"b": bounds, "splits": s.splits, "start": coarse.start_units,
            "T": coarse.period_units, "span": coarse.span_units}


def solve_stage1(problem: SearchProblem, k: int, time_limit_s: float,
                 hint: dict | None = None) -> StageResult:
    ops = problem.ops
    g = problem.num_granules
    full = len(problem.sm_options) - 1
    opts = {o.name: sorted({p for p in problem.split_options if k % p == 0}) for o in ops}
    if k > g or any(not v for v in opts.values()):
        return StageResult("INFEASIBLE")
    lat = {o.name: [to_units(row[full]) for row in o.latency_us] for o in ops}
    # [a][n], own class only; a form class's extent is chosen here, so its table spans the batch
    cost = {o.name: ([lat[o.name][:g + 1 - a] for a in range(g + 1)] if o.token_class in FORM_CLASSES
                     else cost_table(problem, o, full)) for o in ops}
    # every start/end lies in [0, horizon]: an ASAP schedule's span is at most the sum of the chosen
    # pieces' durations (its longest path visits each piece once), so no optimum is cut off
    horizon, seq = 1, 0
    for o in ops:
        if o.token_class in FORM_CLASSES:  # p pieces, each at most the table's largest entry
            horizon += max(opts[o.name]) * max(lat[o.name])
            seq += cost[o.name][0][g] if o.token_class == "reduce" else 0  # the all-reduce form
            continue
        lo, hi = class_range(problem, o.token_class)
        least = 1 if (lo, hi) == (0, g) else 0
        horizon += max(piece_sum_bound(cost[o.name], hi - lo, p, least, max) for p in opts[o.name])
        seq += cost[o.name][0][hi - lo]
    m = cp_model.CpModel()
    # [S1.seq] T <= the sequential period: a worse structure is never used (stage 2 keeps the
    # sequential one as a candidate)
    period = m.new_int_var(0, min(horizon, seq), "T")
    span = m.new_int_var(0, horizon, "span")

    # [S1.sizes] integer boundaries, every nano-batch at least one granule
    b = [m.new_constant(0)] + [m.new_int_var(i, g - k + i, f"b{i}") for i in range(1, k)]
    b.append(m.new_constant(g))
    for i in range(k):
        m.add(b[i + 1] >= b[i] + 1)

    clamp_memo: dict[tuple[int, int, int], cp_model.IntVar] = {}

    def clamp(idx: int, lo: int, hi: int):
        """min(max(b_idx, lo), hi): the boundary clipped to a token class [S1.lat]."""
        key = (idx, lo, hi)
        if key not in clamp_memo:
            x = b[idx]
            if lo > 0:
                y = m.new_int_var(lo, g, f"max_b{idx}_{lo}")
                m.add_max_equality(y, [x, lo])
                x = y
            if hi < g:
                y = m.new_int_var(0, hi, f"min_b{idx}_{hi}")
                m.add_min_equality(y, [x, hi])
                x = y
            clamp_memo[key] = x
        return clamp_memo[key]

    count_memo: dict[tuple[int, int, int, int], tuple[cp_model.IntVar, object]] = {}

    def own_count(lo: int, hi: int, a: int, c: int):
        """(n, has-tokens literal or True) for nano-batches [a, c) against class [lo, hi)."""
        key = (lo, hi, a, c)
        if key not in count_memo:
            n = m.new_int_var(0, g, f"n_{lo}_{hi}_{a}_{c}")
            m.add(n == clamp(c, lo, hi) - clamp(a, lo, hi))
            if lo == 0 and hi == g:
                count_memo[key] = (n, True)  # class "all": >= 1 granule by [S1.sizes]
            else:
                z = m.new_bool_var(f"z_{lo}_{hi}_{a}_{c}")
                m.add(n >= 1).only_enforce_if(z)
                m.add(n == 0).only_enforce_if(~z)
                count_memo[key] = (n, z)
        return count_memo[key]

    # [S1.form] the all-gather form takes nano-batches [0, j) for one chosen j: F = b_j granules
    form_f = None
    if problem.has_forms:
        w = [m.new_bool_var(f"form_{j}") for j in range(k + 1)]
        m.add_exactly_one(w)
        form_f = m.new_int_var(0, g, "F")
        for j in range(k + 1):
            m.add(form_f == b[j]).only_enforce_if(w[j])
    below_memo: dict[int, cp_model.IntVar] = {}

    def below_f(idx: int):
        """min(b_idx, F): the gather-class granules before boundary idx [S1.form]."""
        if idx not in below_memo:
            y = m.new_int_var(0, g, f"minF_b{idx}")
            m.add_min_equality(y, [b[idx], form_f])
            below_memo[idx] = y
        return below_memo[idx]

    form_memo: dict[tuple[str, int, int], tuple[cp_model.IntVar, object]] = {}

    def form_count(cls: str, a: int, c: int):
        """(n, has-tokens literal) of class gather or reduce on nano-batches [a, c) [S1.form]."""
        key = (cls, a, c)
        if key not in form_memo:
            n = m.new_int_var(0, g, f"n_{cls}_{a}_{c}")
            gathered = below_f(c) - below_f(a)
            m.add(n == (gathered if cls == "gather" else b[c] - b[a] - gathered))
            z = m.new_bool_var(f"z_{cls}_{a}_{c}")
            m.add(n >= 1).only_enforce_if(z)
            m.add(n == 0).only_enforce_if(~z)
            form_memo[key] = (n, z)
        return form_memo[key]

    gt_memo: dict[tuple[int, int], object] = {}

    def above(idx: int, lo: int):
        """Literal b_idx > lo (True/False when constant)."""
        if idx == 0:
            return False
        if idx == k:
            return g > lo
        if (idx, lo) not in gt_memo:
            z = m.new_bool_var(f"gt_b{idx}_{lo}")
            m.add(b[idx] >= lo + 1).only_enforce_if(z)
            m.add(b[idx] <= lo).only_enforce_if(~z)
            gt_memo[(idx, lo)] = z
        return gt_memo[(idx, lo)]

    x: dict[tuple[str, int], cp_model.IntVar] = {}
    piece: dict[tuple[str, int, int], tuple] = {}  # (op, p, i) -> (start, end, present-on-stream)
    by_stream: dict[str, list] = {}
    for o in ops:
        for p in opts[o.name]:
            x[o.name, p] = m.new_bool_var(f"x_{o.name}_{p}")
        m.add_exactly_one(x[o.name, p] for p in opts[o.name])  # [S1.split]
        form = o.token_class in FORM_CLASSES
        lo, hi = (0, g) if form else class_range(problem, o.token_class)
        cls = hi - lo
        table = lat[o.name]
        all_class = lo == 0 and hi == g and not form
        if o.scale is None:
            d_lo, d_hi = min(table), max(table)
            cuts = hull_cuts(table, 1 if all_class else 0, cls)
        else:  # [S1.lat-pos] cost[a][n]; flat index a*(C+1) + n, only cells with a + n <= C
            flat = [max(map(max, cost[o.name]))] * (cls + 1) ** 2
            for a_, row in enumerate(cost[o.name]):
                flat[a_ * (cls + 1):a_ * (cls + 1) + len(row)] = row
            cells = cp_model.Domain.from_values([a_ * (cls + 1) + n_ for a_ in range(cls + 1)
                                                 for n_ in range(cls + 1 - a_)])
            d_lo, d_hi = min(map(min, cost[o.name])), max(map(max, cost[o.name]))
            # [S1.cut] on the least cost over all starts: still a lower bound for every piece
            cuts = hull_cuts(least_by_count(cost[o.name]), 1 if all_class else 0, cls)
        for p in opts[o.name]:
            xp = x[o.name, p]
            actives = []
            for i in range(p):
                a, c = piece_batches(k, p, i)
                tag = f"{o.name}_{p}_{i}"
                n, z = form_count(o.token_class, a, c) if form else own_count(lo, hi, a, c)
                dur = m.new_int_var(d_lo, d_hi, f"d_{tag}")
                if o.scale is None:
                    m.add_element(n, table, dur)  # [S1.lat] latency_us[n][full] by table lookup
                else:  # [S1.lat-pos] cost[a][n], a = clamp(b_a) - lo: the piece's start in its class
                    cell = m.new_int_var_from_domain(cells, f"cell_{tag}")
                    m.add(cell == (cls + 1) * (clamp(a, lo, hi) - lo) + n)
                    m.add_element(cell, flat, dur)
                for n1, f1, n2, f2 in cuts:  # [S1.cut] redundant: dur above the table's convex hull
                    m.add((n2 - n1) * dur >= (n2 - n1) * f1 + (f2 - f1) * (n - n1))
                if z is True:
                    q = xp
                else:  # [S1.real] on the stream only when chosen and it has tokens of its class
                    q = m.new_bool_var(f"q_{tag}")
                    m.add(q <= xp)
                    m.add(q <= z)
                    m.add(q >= xp + z - 1)
                s = m.new_int_var(0, horizon, f"s_{tag}")
                e = m.new_int_var(0, horizon, f"e_{tag}")
                m.add(e == s + dur)
                m.add(s == 0).only_enforce_if(~xp)  # unchosen variants: pin (symmetry)
                iv = m.new_optional_interval_var(s, dur, e, q, f"iv_{tag}")
                active = m.new_int_var(0, d_hi, f"a_{tag}")
                m.add(active == dur).only_enforce_if(xp)
                m.add(active == 0).only_enforce_if(~xp)
                actives.append(active)
                m.add(span >= e).only_enforce_if(q)  # span = last end (first start pinned >= 0)
                piece[o.name, p, i] = (s, e, q)
                by_stream.setdefault(o.kind, []).append((iv, s, e, q, active))
            # [S1.load] redundant: the class's tokens are fixed and p pieces tile them in order, so
            # they cost at least this (exact DP over (a, n), so it holds with a position scale too)
            if not form:  # a form class's token count is not fixed: no such bound
                least = piece_sum_bound(cost[o.name], cls, p, 1 if all_class else 0)
                m.add(sum(actives) >= least * xp)

    for kind, items in by_stream.items():
        m.add_no_overlap([it[0] for it in items])  # [S1.stream] one FIFO stream per kind
        first = m.new_int_var(0, horizon, f"first_{kind}")
        last = m.new_int_var(0, horizon, f"last_{kind}")
        for _, s, e, q, _ in items:
            m.add(first <= s).only_enforce_if(q)
            m.add(last >= e).only_enforce_if(q)
        m.add(last - first <= period)  # [S1.fifo] layer l's pieces end before layer l+1's start
        m.add(sum(it[4] for it in items) <= period)  # [S1.load] redundant: busy time <= T

    for o in ops:
        lo_v = class_range(problem, o.token_class)[0]
        for dep in o.deps:
            for pv in opts[o.name]:
                for pu in opts[dep.op]:
                    for i in range(pv):
                        av, cv = piece_batches(k, pv, i)
                        s_v = piece[o.name, pv, i][0]
                        for j in range(pu):
                            au, cu = piece_batches(k, pu, j)
                            if dep.scope == "token":
                                lits = [] if max(av, au) < min(cv, cu) else None
                            elif au >= cv:
                                lits = None
                            elif lo_v == 0:
                                lits = []
                            else:  # prefix of a prefill op: [D, b_cv) meets [b_au, b_cu)
                                lits = [above(cu, lo_v), above(cv, lo_v)]
                                if any(v is False for v in lits):
                                    lits = None
                                else:
                                    lits = [v for v in lits if v is not True]
                            if lits is None:
                                continue
                            e_u = piece[dep.op, pu, j][1]
                            enf = [x[o.name, pv], x[dep.op, pu], *lits]
                            if dep.prev_layer:
                                m.add(s_v + period >= e_u).only_enforce_if(enf)  # [S1.wrap]
                            else:
                                m.add(s_v >= e_u).only_enforce_if(enf)  # [S1.prec]

    if hint is not None and all(hint["splits"][o.name] in opts[o.name] for o in ops):
        m.add_hint(period, hint["T"])
        m.add_hint(span, hint["span"])
        for i in range(1, k):
            m.add_hint(b[i], hint["b"][i])
        for o in ops:
            for p in opts[o.name]:
                m.add_hint(x[o.name, p], p == hint["splits"][o.name])
            p = hint["splits"][o.name]
            for i in range(p):
                m.add_hint(piece[o.name, p, i][0], hint["start"][f"{o.name}.{i}"])
    weight = horizon + 1  # span <= horizon < weight: the sum is lexicographic (T, then span)
    m.minimize(weight * period + span)
    solver = run_solver(m, problem, time_limit_s)
    status = solver.status
    if status not in ("OPTIMAL", "FEASIBLE"):
        return StageResult(status)

    bounds = tuple(int(solver.value(v)) for v in b)
    splits = {o.name: next(p for p in opts[o.name] if solver.value(x[o.name, p])) for o in ops}
    starts: dict[str, int] = {}
    order: dict[str, list[tuple]] = {}
    for idx, o in enumerate(ops):
        p = splits[o.name]
        for i in range(p):
            s, e, q = piece[o.name, p, i]
            name = f"{o.name}.{i}"
            starts[name] = int(solver.value(s))
            if solver.value(q):
                order.setdefault(o.kind, []).append((starts[name], int(solver.value(e)), idx, i, name))
    stream_order = {kind: tuple(t[-1] for t in sorted(v)) for kind, v in order.items()}
    t_val = int(solver.value(period))
    bound = t_val if status == "OPTIMAL" else int(math.ceil(solver.bound - 1e-6)) // weight
    gathered = int(solver.value(form_f)) if form_f is not None else problem.gather_granules
    return StageResult(status, Structure(k, bounds, splits, stream_order, gathered), t_val,
                       int(solver.value(span)), min(bound, t_val), starts)

