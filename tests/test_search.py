"""The two-stage MILP search against an independent brute force on tiny problems."""

from __future__ import annotations

import dataclasses
import itertools
import time

import networkx as nx
import numpy as np
import pytest

pytest.importorskip("ortools")  # the GPU image has no OR-Tools; the solver runs on the CPU
from ortools.linear_solver import pywraplp

from nfsearch.emit import place
from nfsearch.errors import NfsearchError
from nfsearch.search import Dep, SearchProblem, StageOp, solve
from nfsearch.search.stage1 import solve_stage1
from nfsearch.search.stage2 import solve_stage2
from nfsearch.search.timeline import Structure

SMS = (1, 2, 4)


def _table(rng, g, kind):
    a, b = int(rng.integers(1, 5)), int(rng.integers(1, 6))
    rows = [(0, 0, 0)]
    for n in range(1, g + 1):
        base = a + b * n
        # compute slows in proportion to SMs lost; memory saturates at 2 of 4 SMs
        rows.append(tuple(base * 4 // s if kind == "compute" else base * (2 if s == 1 else 1) for s in SMS))
    return tuple(tuple(float(v) for v in r) for r in rows)


def tiny(rng, g=4, d=2, interference=None, **kw):
    ops = (
        StageOp("qkv", "compute", "all", ("qkv_proj",), (Dep("o_proj", prev_layer=True),),
                _table(rng, g, "compute")),
        StageOp("attn_d", "memory", "decode", ("attn_decode",), (Dep("qkv"),), _table(rng, g, "memory")),
        StageOp("attn_p", "compute", "prefill", ("attn_prefill",), (Dep("qkv", "prefix"),),
                _table(rng, g, "compute")),
        StageOp("o_proj", "compute", "all", ("o_proj",), (Dep("attn_d"), Dep("attn_p")),
                _table(rng, g, "compute")),
    )
    kw.setdefault("max_nano_batches", 2)
    kw.setdefault("split_options", (1, 2))
    return SearchProblem(ops, g, 16, d, 4, SMS, interference or {}, num_layers=3, tail_us=5.0,
                         time_limit_s=30.0, **kw)


def _scale(rng, c):
    """A random position scale for a class of c granules: multiples of 1/4 in [1/4, 3], so scaled
    integer latencies stay exact in the solver's 0.01 us units."""
    return tuple(tuple(float(rng.integers(1, 13)) / 4 for _ in range(c + 1 - a)) for a in range(c + 1))


def with_scales(rng, pb, names):
    """`pb` with a random position scale on the ops `names`."""
    def cls(o):
        lo, hi = _crange(pb, o.token_class)
        return hi - lo

    return dataclasses.replace(pb, ops=tuple(dataclasses.replace(o, scale=_scale(rng, cls(o)))
                                             if o.name in names else o for o in pb.ops))


# ---- independent brute force ------------------------------------------------------------------

def _crange(pb, token_class):
    """[lo, hi) granules of a class (problem.py): decode first; gather = [0, gather_granules)."""
    return {"all": (0, pb.num_granules), "decode": (0, pb.decode_granules),
            "prefill": (pb.decode_granules, pb.num_granules), "gather": (0, pb.gather_granules),
            "reduce": (pb.gather_granules, pb.num_granules)}[token_class]


def _cost(pb, o, granules, j):
    """Solo latency of op o on dense granules [start, end) on sm_options[j], per problem.py: its
    own-class granules [a, a + n) of the class, latency_us[n][j] * scale[a][n]."""
    lo, hi = _crange(pb, o.token_class)
    own = [x for x in range(*granules) if lo <= x < hi]
    n = len(own)
    a = own[0] - lo if own else (0 if granules[1] <= lo else hi - lo)
    return o.latency_us[n][j] * (1.0 if o.scale is None else o.scale[a][n])


def _pieces(pb, k, bounds, splits):
    """name -> (op, dense granule range, own-class granules)."""
    out = {}
    for o in pb.ops:
        lo, hi = _crange(pb, o.token_class)
        p = splits[o.name]
        for i in range(p):
            a, c = bounds[i * k // p], bounds[(i + 1) * k // p]
            out[f"{o.name}.{i}"] = (o, (a, c), max(0, min(c, hi) - max(a, lo)), lo)
    return out


def _deps(pb, pieces):
    """(u, v, crosses a layer) per the problem.py docstrings."""
    edges = []
    for v, (o, (a, c), _, lo) in pieces.items():
        for d in o.deps:
            rng = (a, c) if d.scope == "token" else (lo, c)
            for u, (ou, (ua, uc), _, _) in pieces.items():
                if ou.name == d.op and max(rng[0], ua) < min(rng[1], uc):
                    edges.append((u, v, d.prev_layer))
    return edges


def _min_period(dur, deps, orders):
    """Max cycle ratio: every edge u->v weighs dur[u]; fifo / cross-layer edges subtract T."""
    t_of: dict[tuple[str, str], int] = {}
    for u, v, prev in deps:
        t_of[u, v] = min(t_of.get((u, v), 1), int(prev))
    for order in orders.values():
        for u, v in zip(order, order[1:], strict=False):
            t_of[u, v] = 0
        t_of[order[-1], order[0]] = min(t_of.get((order[-1], order[0]), 1), 1)
    g = nx.DiGraph(list(t_of))
    best = 0.0
    for cyc in nx.simple_cycles(g):
        w = sum(dur[n] for n in cyc)
        t = sum(t_of[cyc[i], cyc[(i + 1) % len(cyc)]] for i in range(len(cyc)))
        if t == 0:
            if w > 0:
                return float("inf")
            continue
        best = max(best, w / t)
    return best


def _orders(names, deps):
    direct = {(u, v) for u, v, prev in deps if not prev}
    for perm in itertools.permutations(names):
        pos = {n: i for i, n in enumerate(perm)}
        if all(pos[u] < pos[v] for u, v in direct if u in pos and v in pos):
            yield perm


def brute_stage1(pb, forms=None):
    """Least period over K, boundaries, splits, stream orders and, with form classes, the form
    boundary F: one of the nano-batch boundaries, or only the values `forms` (those that are
    boundaries)."""
    best = float("inf")
    g = pb.num_granules
    has_forms = any(o.token_class in ("gather", "reduce") for o in pb.ops)
    for k in range(1, pb.max_nano_batches + 1):
        opts = [p for p in pb.split_options if k % p == 0]
        for inner in itertools.combinations(range(1, g), k - 1):
            bounds = (0, *inner, g)
            fs = [b for b in bounds if forms is None or b in forms] if has_forms else [pb.gather_granules]
            for f, choice in itertools.product(fs,
                                               itertools.product(opts, repeat=len(pb.ops))):
                pb = dataclasses.replace(pb, gather_granules=f)
                splits = dict(zip((o.name for o in pb.ops), choice, strict=True))
                pieces = _pieces(pb, k, bounds, splits)
                deps = _deps(pb, pieces)
                dur = {n: _cost(pb, o, rng, -1) for n, (o, rng, _, _) in pieces.items()}
                per_stream = {}
                for n, (o, _, tok, _) in pieces.items():
                    if tok:
                        per_stream.setdefault(o.kind, []).append(n)
                streams = list(per_stream)
                for combo in itertools.product(*(list(_orders(per_stream[s], deps)) for s in streams)):
                    best = min(best, _min_period(dur, deps, dict(zip(streams, combo, strict=True))))
    return best


def _lp_min_period(pb, pieces, deps, orders, dur, placement):
    """Least T of the periodic schedule with the window span <= 2T, starts >= 0, and each memory
    nano-op M placed in a gap: after item `lo` and before item `hi` of the compute stream's
    sequence over layers l-1, l, l+1 (items are (name, layer offset); None: unbounded). GLOP LP."""
    lp = pywraplp.Solver.CreateSolver("GLOP")
    inf = lp.infinity()
    t = lp.NumVar(0, inf, "T")
    st = {n: lp.NumVar(0, inf, f"s_{n}") for n in pieces}
    for u, v, prev in deps:
        lp.Add(st[v] >= st[u] + dur[u] - (t if prev else 0))
    for order in orders.values():
        for u, v in zip(order, order[1:], strict=False):
            lp.Add(st[v] >= st[u] + dur[u])
        lp.Add(st[order[0]] + t >= st[order[-1]] + dur[order[-1]])
    for n in pieces:
        if dur[n] > 0:
            lp.Add(st[n] + dur[n] <= 2 * t)
    for mem, (lo, hi) in placement.items():
        if lo is not None:
            lp.Add(st[mem] >= st[lo[0]] + dur[lo[0]] + lo[1] * t)
        if hi is not None:
            lp.Add(st[mem] + dur[mem] <= st[hi[0]] + hi[1] * t)
    lp.Minimize(t)
    return t.solution_value() if lp.Solve() == pywraplp.Solver.OPTIMAL else float("inf")


def brute_stage2(pb, s, scale=1.0):
    """Every SM count of every nano-op (interference 1.0; latencies times `scale`). Concurrent
    compute and memory nano-ops need size sum <= num_sms: a memory nano-op then sits in a gap
    between the compute nano-ops (of layers l-1, l, l+1) it conflicts with."""
    pieces = _pieces(pb, s.num_nano_batches, s.boundaries, s.splits)
    deps = _deps(pb, pieces)
    real = [n for n, (_, _, tok, _) in pieces.items() if tok]
    comp, mem = s.stream_order.get("compute", ()), s.stream_order.get("memory", ())
    best = float("inf")
    for js in itertools.product(range(len(pb.sm_options)), repeat=len(real)):
        size = {n: pb.sm_options[j] for n, j in zip(real, js, strict=True)}
        dur = dict.fromkeys(pieces, 0.0)
        dur.update({n: _cost(pb, pieces[n][0], pieces[n][1], j) * scale
                    for n, j in zip(real, js, strict=True)})
        gaps = []
        for m in mem:
            seq = [(c, d) for d in (-1, 0, 1) for c in comp if size[c] + size[m] > pb.num_sms]
            gaps.append([(seq[i - 1] if i else None, seq[i] if i < len(seq) else None)
                         for i in range(len(seq) + 1)])
        for choice in itertools.product(*gaps):
            best = min(best, _lp_min_period(pb, pieces, deps, s.stream_order, dur,
                                            dict(zip(mem, choice, strict=True))))
    return best


def tiny2(rng, sms=(1, 3, 4), interference=None):
    """3 ops, K = 2 hand-fixed: compute qkv.0, o_proj.0, o_proj.1; memory attn_d.0, attn_d.1."""
    g = 4

    def table(kind):
        a, b = int(rng.integers(1, 5)), int(rng.integers(1, 6))
        return ((0.0,) * len(sms),) + tuple(
            tuple(float((a + b * n) * (4 / s if kind == "compute" else 1.6 if s == 1 else 1 + 0.1 * (s < 4)))
                  for s in sms) for n in range(1, g + 1))

    ops = (
        StageOp("qkv", "compute", "all", ("qkv_proj",), (Dep("o_proj", prev_layer=True),), table("compute")),
        StageOp("attn_d", "memory", "decode", ("attn_decode",), (Dep("qkv"),), table("memory")),
        StageOp("o_proj", "compute", "all", ("o_proj",), (Dep("attn_d"),), table("compute")),
    )
    pb = SearchProblem(ops, g, 16, 3, 4, sms, interference or {}, num_layers=3, tail_us=5.0,
                       max_nano_batches=2, split_options=(1, 2), time_limit_s=30.0)
    st = Structure(2, (0, 2, 4), {"qkv": 1, "attn_d": 2, "o_proj": 2},
                   {"compute": ("qkv.0", "o_proj.0", "o_proj.1"), "memory": ("attn_d.0", "attn_d.1")})
    return pb, st


def _meet(a, b, period, window=(-1, 0, 1)):
    """a (layer l) and b (some layer l + d, d in window) run at the same time."""
    return any(a.start_us < b.end_us + d * period - 1e-6 and b.start_us + d * period < a.end_us - 1e-6
               for d in window)


def _check_sm_sums(sol, num_sms, window=(-1, 0, 1)):
    """Nano-ops of different streams that run at the same time (layers l-1, l, l+1) fit the GPU; the
    network partition counts for a nano-op that meets a network nano-op [S2.sms-net] and for every
    compute/memory pair that meets [S2.sms] (memory partitions sit below the network one)."""
    ops = sol.nano_ops
    nets = [a for a in ops if a.stream == "network"]
    net = max((a.num_sms for a in nets), default=0)

    def beside_net(a):
        return any(_meet(a, k, sol.period_us, window) for k in nets)

    by = {a.name: a for a in ops}
    for order in sol.stream_order.values():  # a stream runs one nano-op at a time
        for x, y in zip(order, order[1:], strict=False):
            assert by[x].end_us <= by[y].start_us + 1e-6, (x, y)
    for a in ops:
        assert a.num_sms <= num_sms
        if a.stream != "network" and beside_net(a):
            assert a.num_sms + net <= num_sms, a
        for b in ops:
            if a.stream == b.stream or "network" in (a.stream, b.stream):
                continue
            if _meet(a, b, sol.period_us, window):
                assert a.num_sms + b.num_sms + net <= num_sms, (a, b)


# ---- tests ------------------------------------------------------------------------------------

def test_stage1_matches_brute_force():
    rng = np.random.default_rng()
    for g, d, kmax in ((4, 2, 2), (4, 1, 2), (6, int(rng.integers(1, 6)), 3)):
        pb = tiny(rng, g=g, d=d, max_nano_batches=kmax)
        milp = min(r.period_units for r in (solve_stage1(pb, k, 20) for k in range(1, kmax + 1)) if r.ok)
        assert milp / 100 == pytest.approx(brute_stage1(pb), abs=0.011)


def tiny_forms(rng, g=3, f=0, **kw):
    """A TP-like layer whose attention output has two forms [S1.form]: gather (all-gather, column O)
    on the granules below F, reduce (all-reduce) on the rest; F chosen by the search."""
    ops = (
        StageOp("qkv", "compute", "all", ("qkv_proj",),
                (Dep("ar", prev_layer=True), Dep("col", prev_layer=True)), _table(rng, g, "compute")),
        StageOp("ag", "network", "gather", ("attn_allgather",), (Dep("qkv"),), _table(rng, g, "memory")),
        StageOp("col", "compute", "gather", ("o_proj_col",), (Dep("ag"),), _table(rng, g, "compute")),
        StageOp("ar", "network", "reduce", ("attn_allreduce",), (Dep("qkv"),), _table(rng, g, "memory")),
    )
    kw.setdefault("max_nano_batches", 2)
    kw.setdefault("split_options", (1, 2))
    return SearchProblem(ops, g, 16, 0, 4, SMS, {}, num_layers=3, tail_us=5.0, time_limit_s=30.0,
                         gather_granules=f, **kw)


def test_stage1_chooses_the_form_boundary_optimally():
    rng = np.random.default_rng()
    for _ in range(3):
        pb = tiny_forms(rng)
        results = [solve_stage1(pb, k, 20) for k in (1, 2)]
        best = min((r for r in results if r.ok), key=lambda r: r.period_units)
        assert best.period_units / 100 == pytest.approx(brute_stage1(pb), abs=0.011)
        f = best.structure.gather_granules
        assert f in best.structure.boundaries  # a nano-batch boundary: whole nano-batches per form
        # never worse than the all-reduce layer alone (F = 0), nor than all tokens gathered (F = G)
        assert best.period_units / 100 <= brute_stage1(pb, forms=(0,)) + 0.011
        assert best.period_units / 100 <= brute_stage1(pb, forms=(pb.num_granules,)) + 0.011


def test_solve_with_forms_names_the_boundary_and_prices_both_forms():
    rng = np.random.default_rng()
    pb = dataclasses.replace(tiny_forms(rng, g=4), time_limit_s=4.0)
    # A factor of 100 leaves no near tie whatever the random tables (compute entries at most 24 per
    # granule, network entries at least 2), so no mixed split can come out as good.
    # A gather form far dearer than the reduce form: the search keeps every token in reduce
    dear = dataclasses.replace(pb, ops=tuple(
        dataclasses.replace(o, latency_us=tuple(tuple(100 * v for v in r) for r in o.latency_us))
        if o.token_class == "gather" else o for o in pb.ops))
    sol = solve(dear)
    assert sol.gather_granules == 0
    assert not any(n.op in ("ag", "col") for n in sol.nano_ops)
    # and the reduce form far dearer: every token takes the gather form, no reduce-form nano-op runs
    cheap = dataclasses.replace(pb, ops=tuple(
        dataclasses.replace(o, latency_us=tuple(tuple(100 * v for v in r) for r in o.latency_us))
        if o.token_class == "reduce" else o for o in pb.ops))
    sol = solve(cheap)
    assert sol.gather_granules == pb.num_granules
    assert not any(n.op == "ar" for n in sol.nano_ops)
    assert {n.op for n in sol.nano_ops} == {"qkv", "ag", "col"}
    assert "all-gather form" in sol.message


@pytest.mark.parametrize("sms", [(1, 3, 4), (2, 4)])
def test_stage2_matches_brute_force_without_interference(sms):
    rng = np.random.default_rng()
    pb, st = tiny2(rng, sms)
    r2 = solve_stage2(pb, st, 20)
    assert r2.status == "OPTIMAL"
    assert r2.period_units / 100 == pytest.approx(brute_stage2(pb, st), abs=0.011)
    assert set(r2.sizes) == {"qkv.0", "o_proj.0", "o_proj.1", "attn_d.0", "attn_d.1"}
    assert all(v in sms for v in r2.sizes.values())
    assert r2.partitions == {k: max(r2.sizes[n] for n in o) for k, o in st.stream_order.items()}


def test_stage2_with_interference_is_bracketed_and_consistent():
    rng = np.random.default_rng()
    slow = {("compute", "memory"): (1.5, 1.5), ("memory", "compute"): (2.0, 2.0)}
    pb, st = tiny2(rng, (2, 4), interference=slow)
    t2 = solve_stage2(pb, st, 20).period_units / 100
    lower = brute_stage2(pb, st)  # nothing charged
    assert lower - 0.011 <= t2 <= brute_stage2(pb, st, scale=2.0) + 0.011  # everything charged
    pb = tiny(rng, interference={k: (*v, v[-1]) for k, v in slow.items()})
    sol = solve(pb)
    _check_sm_sums(sol, pb.num_sms)
    for a in sol.nano_ops:  # a nano-op not charged meets no nano-op of another stream
        if a.overlapped:
            continue
        for b in sol.nano_ops:
            for d in (-1, 0, 1):
                if b.stream != a.stream:
                    shift = d * sol.period_us
                    assert a.end_us <= b.start_us + shift + 1e-6 or b.end_us + shift <= a.start_us + 1e-6


def _latency_row(pb, n):
    op = next(o for o in pb.ops if o.name == n.op)
    lo, hi = _crange(pb, op.token_class)
    return op.latency_us[max(0, min(n.granules[1], hi) - max(n.granules[0], lo))]


def _check_idle_get_fastest(pb, sol, window=(-1, 0, 1)):
    """A nano-op that overlaps nothing runs on its fastest size (all SMs when that is fastest)."""
    idle = 0
    for a in sol.nano_ops:
        if any(a.start_us < b.end_us + d * sol.period_us - 1e-6 and b.start_us + d * sol.period_us
               < a.end_us - 1e-6 for b in sol.nano_ops if b.stream != a.stream for d in window):
            continue
        idle += 1
        row = _latency_row(pb, a)
        assert row[pb.sm_options.index(a.num_sms)] == min(row)
        if row[-1] < min(row[:-1]):
            assert a.num_sms == pb.num_sms
        assert a.end_us - a.start_us == pytest.approx(min(row))
    return idle


def test_idle_nano_op_gets_all_sms():
    rng = np.random.default_rng()
    # memory is fastest on all SMs here too, so every idle nano-op must take all 4
    pb = tiny(rng, interference={("memory", "compute"): (1.2, 1.2, 1.2)})
    pb = dataclasses.replace(pb, ops=tuple(dataclasses.replace(o, latency_us=tuple(
        tuple(v * 4 / s for v, s in zip(row, SMS, strict=True)) for row in o.latency_us))
        if o.kind == "memory" else o for o in pb.ops))
    sol = solve(pb)
    assert _check_idle_get_fastest(pb, sol) >= 1
    assert any(n.num_sms == pb.num_sms for n in sol.nano_ops)
    _check_sm_sums(sol, pb.num_sms)


def tiny_tp(rng):
    """tiny() plus a network all-reduce after o_proj (the next layer's qkv waits for it)."""
    slow = {("compute", "memory"): (1.2, 1.1, 1.1), ("memory", "compute"): (1.3, 1.2, 1.1),
            ("compute", "network"): (1.1, 1.1, 1.1)}
    pb = tiny(rng, interference=slow)
    net = tuple((0.0, 0.0, 0.0) if n == 0 else (3.0 + n, 1.0 + n, 1.0 + n)
                for n in range(pb.num_granules + 1))
    ops = (dataclasses.replace(pb.ops[0], deps=(Dep("ar", prev_layer=True),)), *pb.ops[1:],
           StageOp("ar", "network", "all", ("attn_allreduce",), (Dep("o_proj"),), net))
    return dataclasses.replace(pb, ops=ops)


def test_network_partition_and_concurrent_sizes_fit():
    rng = np.random.default_rng()
    pb = tiny_tp(rng)
    sol = solve(pb)
    assert sol.status in ("OPTIMAL", "FEASIBLE")
    net = {n.num_sms for n in sol.nano_ops if n.stream == "network"}
    assert len(net) <= 1  # one static partition for the whole network stream
    _check_sm_sums(sol, pb.num_sms)
    for k, order in sol.stream_order.items():
        assert sol.partitions[k] == max(n.num_sms for n in sol.nano_ops if n.name in order)


def _replayed_makespan(pb, sol):
    """ASAP makespan of num_layers layers of the graph the runtime replays: the emitted physical
    streams (FIFO, also across layers) and every emitted dependency, with the solution's durations."""
    placed = place(pb, sol)
    dur = {n.name: n.end_us - n.start_us for n in sol.nano_ops}
    preds = {n: [] for n in dur}
    for ps in placed.streams:
        for a, b in zip(ps.nano_ops, ps.nano_ops[1:], strict=False):
            preds[b].append((a, False))
        preds[ps.nano_ops[0]].append((ps.nano_ops[-1], True))
    for d in placed.dependencies:
        preds[d.after].append((d.before, d.prev_layer))
    g = nx.DiGraph([(u, v) for v, ps in preds.items() for u, prev in ps if not prev])
    g.add_nodes_from(dur)
    order = list(nx.topological_sort(g))
    prev_end, makespan = {}, 0.0
    for _ in range(pb.num_layers):
        end = {}
        for n in order:
            ready = [prev_end.get(u, 0.0) if prev else end[u] for u, prev in preds[n]]
            end[n] = max(ready, default=0.0) + dur[n]
        makespan, prev_end = max(makespan, *end.values()), end
    return makespan


def test_prediction_is_the_replayed_graph():
    """iteration_us = the ASAP makespan of what the runtime replays, including the events emit adds
    between nano-ops on shared SMs (the prediction once ran such pairs side by side)."""
    # Decode attention is a little faster on 2 SMs than on all 4, prefill attention needs all 4,
    # and side by side both slow 1.5x: the best schedule runs them one after the other on streams
    # whose SMs they cannot share (period 26 against 27 sequential), ordered by an emitted event.
    def lat(f):
        return tuple(tuple(float(f(n, sm)) for sm in SMS) for n in range(5))

    ops = (StageOp("qkv", "compute", "all", ("qkv_proj",), (Dep("o_proj", prev_layer=True),),
                   lat(lambda n, sm: 4 * n / sm)),
           StageOp("attn_d", "memory", "decode", ("attn_decode",), (Dep("qkv"),),
                   lat(lambda n, sm: n * {1: 10, 2: 5, 4: 5.5}[sm])),
           StageOp("attn_p", "compute", "prefill", ("attn_prefill",), (Dep("qkv"),),
                   lat(lambda n, sm: 16 * n / sm)),
           StageOp("o_proj", "compute", "all", ("o_proj",), (Dep("attn_d"), Dep("attn_p")),
                   lat(lambda n, sm: 4 * n / sm)))
    slow = {("compute", "memory"): (1.5,) * 3, ("memory", "compute"): (1.5,) * 3}
    pb = SearchProblem(ops, 4, 16, 2, 4, SMS, slow, num_layers=3, tail_us=5.0, max_nano_batches=1)
    sol = solve(pb)
    assert sol.period_us == pytest.approx(26.0) and len(sol.stream_order) == 2
    assert sol.iteration_us == pytest.approx(3 * 26.0 + 5.0)  # not 3 * 18 + 5: they never co-run
    rng = np.random.default_rng()
    for case in (pb, tiny(rng, interference=slow), tiny_tp(rng)):
        sol = solve(case)
        assert _replayed_makespan(case, sol) + case.tail_us == pytest.approx(sol.iteration_us)


def test_network_partition_is_reserved_only_beside_network_nano_ops():
    """[S2.sms-net] binds only while a nano-op meets a network nano-op: away from the collectives a
    GEMM takes the SMs the network partition holds (the static reservation cost every TP schedule
    those SMs for the whole layer). Seeds 0 and 40 are instances whose best schedule overlaps the
    all-reduce at all (most tiny ones run sequentially); fresh random ones must emit too."""
    for seed in (0, 40):
        pb = tiny_tp(np.random.default_rng(seed))
        sol = solve(pb)
        nets = [n for n in sol.nano_ops if n.stream == "network"]
        assert nets, seed
        _check_sm_sums(sol, pb.num_sms)
        assert _replayed_makespan(pb, sol) + pb.tail_us == pytest.approx(sol.iteration_us)
        net = nets[0].num_sms
        wide = [n for n in sol.nano_ops if n.stream != "network" and n.num_sms + net > pb.num_sms]
        assert wide and not any(_meet(n, k, sol.period_us) for n in wide for k in nets)
        for a in sol.nano_ops:  # a compute/memory nano-op meeting nothing runs on its fastest size
            if a.stream != "network" and not any(_meet(a, b, sol.period_us) for b in sol.nano_ops
                                                 if b.stream != a.stream):
                assert _latency_row(pb, a)[pb.sm_options.index(a.num_sms)] == min(_latency_row(pb, a))
    rng = np.random.default_rng()
    for _ in range(3):
        pb = tiny_tp(rng)
        sol = solve(pb)
        place(pb, sol)  # raises where nano-ops on shared SMs cannot be ordered (emit) [S2.back]
        _check_sm_sums(sol, pb.num_sms)


def test_no_backward_cross_layer_order_on_shared_sms():
    """[S2.back] Seeds whose solutions, before the rule, ran the next layer's QKV on the network
    partition's SMs ahead of this layer's all-reduce: an order emit cannot express (it raised)."""
    for seed in (34, 37):
        pb = tiny_tp(np.random.default_rng(seed))
        sol = solve(pb)
        place(pb, sol)
        _check_sm_sums(sol, pb.num_sms)


def test_sequential_policy_is_the_sum_of_solo_latencies():
    rng = np.random.default_rng()
    pb = tiny(rng, policy="sequential")
    sol = solve(pb)
    total = sum(o.latency_us[{"all": 4, "decode": 2, "prefill": 2}[o.token_class]][-1] for o in pb.ops)
    assert sol.period_us == pytest.approx(total)
    assert sol.iteration_us == pytest.approx(pb.num_layers * total + pb.tail_us)
    assert sol.num_nano_batches == 1 and list(sol.partitions.values()) == [pb.num_sms]
    assert all(n.num_sms == pb.num_sms for n in sol.nano_ops)


def test_auto_never_slower_than_sequential_and_deterministic():
    rng = np.random.default_rng()
    slow = {("compute", "memory"): (1.3, 1.2, 1.1), ("memory", "compute"): (1.4, 1.3, 1.2)}
    pb = tiny(rng, interference=slow)
    a, b = solve(pb), solve(pb)
    seq = solve(dataclasses.replace(pb, policy="sequential"))
    assert a.period_us <= seq.period_us + 1e-9 and a.iteration_us <= seq.iteration_us + 1e-9
    assert dataclasses.replace(a, solve_time_s=0) == dataclasses.replace(b, solve_time_s=0)
    assert a.status == "OPTIMAL" and a.objective_gap == 0.0


def test_auto_keeps_a_searched_schedule_only_past_min_gain():
    """[sel.margin]: a searched schedule predicted g faster per iteration than sequential is kept
    for min_gain below g and replaced by the sequential one above it."""
    rng = np.random.default_rng()
    for _ in range(50):  # a random tiny problem where overlap pays
        pb = tiny(rng)
        seq = solve(dataclasses.replace(pb, policy="sequential"))
        got = solve(pb)
        gain = 1.0 - got.iteration_us / seq.iteration_us
        if gain > 0.02 and "chose K=" in got.message:
            break
    else:
        pytest.fail("no tiny problem where a searched schedule beats sequential by 2%")
    below = solve(dataclasses.replace(pb, min_gain=gain - 0.01))
    assert dataclasses.replace(below, solve_time_s=0) == dataclasses.replace(got, solve_time_s=0)
    above = solve(dataclasses.replace(pb, min_gain=gain + 0.01))
    assert above.iteration_us == pytest.approx(seq.iteration_us) and above.num_nano_batches == 1
    assert list(above.partitions.values()) == [pb.num_sms] and "chose sequential" in above.message
    for bad in (-0.1, 1.0):
        with pytest.raises(NfsearchError, match="min_gain must be a fraction"):
            solve(dataclasses.replace(pb, min_gain=bad))


def test_infeasible_and_timeout_paths_explain():
    rng = np.random.default_rng()
    sol = solve(tiny(rng, split_options=(3,)))  # no split count divides K = 1 or 2
    assert sol.status == "INFEASIBLE" and "sequential" in sol.message
    sol = solve(realistic(time_limit_s=0.002))
    assert sol.status in ("UNKNOWN", "FEASIBLE")
    assert sol.message and sol.period_us <= solve(realistic(policy="sequential")).period_us + 1e-9


def test_stage1_matches_brute_force_with_position_scale():
    """Pieces cost latency_us[n] * scale[a][n] by where they start: prefill (and, generically, an
    `all` op) with random scales; the MILP's optimum over K equals the enumeration."""
    rng = np.random.default_rng()
    for g, d, kmax in ((4, 1, 2), (5, int(rng.integers(1, 4)), 2), (6, int(rng.integers(1, 5)), 3)):
        pb = with_scales(rng, tiny(rng, g=g, d=d, max_nano_batches=kmax), ("attn_p", "o_proj"))
        milp = min(r.period_units for r in (solve_stage1(pb, k, 20) for k in range(1, kmax + 1)) if r.ok)
        assert milp / 100 == pytest.approx(brute_stage1(pb), abs=0.011)


def test_stage2_matches_brute_force_with_position_scale():
    rng = np.random.default_rng()
    pb, st = tiny2(rng, (2, 4))
    pb = with_scales(rng, pb, ("attn_d", "o_proj"))  # o_proj.1 and attn_d.1 start at a = 2
    r2 = solve_stage2(pb, st, 20)
    assert r2.status == "OPTIMAL"
    assert r2.period_units / 100 == pytest.approx(brute_stage2(pb, st), abs=0.011)


def test_position_scale_charges_each_piece_its_own_start():
    """Without interference every nano-op lasts exactly latency_us[n][j] * scale[a][n] of its own
    range and SM count; the sequential period is the sum over whole classes (a = 0)."""
    rng = np.random.default_rng()
    pb = with_scales(rng, tiny(rng, g=6, d=int(rng.integers(1, 5)), max_nano_batches=3,
                               split_options=(1, 3)), ("attn_p", "qkv"))
    sol = solve(pb)
    ops = {o.name: o for o in pb.ops}
    for n in sol.nano_ops:
        want = _cost(pb, ops[n.op], n.granules, pb.sm_options.index(n.num_sms))
        assert n.end_us - n.start_us == pytest.approx(want, abs=1e-9)
    seq = solve(dataclasses.replace(pb, policy="sequential"))
    assert seq.period_us == pytest.approx(sum(_cost(pb, o, (0, pb.num_granules), -1) for o in pb.ops))
    # a scale of all ones is the same problem as none: the same optimum
    ones = dataclasses.replace(pb, ops=tuple(dataclasses.replace(
        o, scale=None if o.scale is None else tuple((1.0,) * len(r) for r in o.scale)) for o in pb.ops))
    plain = dataclasses.replace(pb, ops=tuple(dataclasses.replace(o, scale=None) for o in pb.ops))
    assert solve(ones).period_us == pytest.approx(solve(plain).period_us, abs=0.011)


def _bad_scale(p, rows):
    return dataclasses.replace(p, ops=(*p.ops[:2], dataclasses.replace(p.ops[2], scale=rows), *p.ops[3:]))


@pytest.mark.parametrize("change, field", [
    (lambda p: dataclasses.replace(p, sm_options=(1, 2)), "sm_options"),
    (lambda p: dataclasses.replace(p, ops=(dataclasses.replace(p.ops[0], latency_us=((0.0,),)),
                                           *p.ops[1:])), "latency_us"),
    (lambda p: dataclasses.replace(p, ops=(p.ops[0], dataclasses.replace(p.ops[1], deps=(Dep("nope"),)),
                                           *p.ops[2:])), "nope"),
    (lambda p: dataclasses.replace(p, ops=(p.ops[1], p.ops[0], *p.ops[2:])), "topological"),
    # attn_p's prefill class has 2 granules: 3 rows of 3, 2, 1 factors
    (lambda p: _bad_scale(p, ((1.0,) * 3,) * 3), "scale must be 3 rows"),
    (lambda p: _bad_scale(p, ((1.0,) * 3, (1.0, float("nan")), (1.0,))), "scale factors"),
    (lambda p: _bad_scale(p, ((1.0,) * 3, (1.0, -0.5), (1.0,))), "scale factors"),
])
def test_malformed_problems_raise(change, field):
    with pytest.raises(NfsearchError, match=field):
        solve(change(tiny(np.random.default_rng())))


def realistic(g=32, **kw):
    """6 stage ops of a dense layer, H100-like: 17 SM options (multiples of 8, and 132)."""
    sms = (*range(8, 129, 8), 132)

    def gemm(per, over):
        return tuple(tuple(0.0 if n == 0 else round((over + per * n) * (132 / s) ** 0.5, 2) for s in sms)
                     for n in range(g + 1))

    def mem(per, over):
        return tuple(tuple(0.0 if n == 0 else round((over + per * n) / min(1.0, s / 48), 2) for s in sms)
                     for n in range(g + 1))

    ops = (
        StageOp("qkv", "compute", "all", ("qkv_proj",), (Dep("ffn_down", prev_layer=True),), gemm(6, 4)),
        StageOp("attn_decode", "memory", "decode", ("attn_decode",), (Dep("qkv"),), mem(20, 3)),
        StageOp("attn_prefill", "compute", "prefill", ("attn_prefill",), (Dep("qkv", "prefix"),),
                gemm(5, 3)),
        StageOp("o_proj", "compute", "all", ("o_proj",), (Dep("attn_decode"), Dep("attn_prefill")),
                gemm(4, 3)),
        StageOp("ffn_up", "compute", "all", ("gate_up",), (Dep("o_proj"),), gemm(14, 5)),
        StageOp("ffn_down", "compute", "all", ("down",), (Dep("ffn_up"),), gemm(7, 4)),
    )
    inter = {("compute", "memory"): (1.1,) * len(sms), ("memory", "compute"): (1.15,) * len(sms)}
    return SearchProblem(ops, g, 64, g // 2, 132, sms, inter, num_layers=32, tail_us=100.0,
                         max_nano_batches=4, **kw)


def test_realistic_instance_within_a_minute():
    pb = realistic(time_limit_s=55.0)
    t0 = time.monotonic()
    sol = solve(pb)
    wall = time.monotonic() - t0
    seq = solve(dataclasses.replace(pb, policy="sequential"))
    print(f"realistic: {wall:.1f} s, {sol.status}, K={sol.num_nano_batches}, T={sol.period_us:.1f} us "
          f"(sequential {seq.period_us:.1f})")
    assert wall < 60.0
    assert sol.status in ("OPTIMAL", "FEASIBLE")
    assert sol.period_us < seq.period_us  # this profile leaves room to overlap decode attention
    _check_sm_sums(sol, pb.num_sms)
    _check_idle_get_fastest(pb, sol)


def test_overlap_policy_keeps_the_best_overlapped_schedule():
    """Interference so strong that overlap never pays: auto returns the sequential schedule, the
    overlap policy the best searched one, predicted slower (it exists to measure the cost model)."""
    rng = np.random.default_rng()
    awful = {("compute", "memory"): (3.0, 3.0, 3.0), ("memory", "compute"): (3.0, 3.0, 3.0)}
    pb = tiny(rng, interference=awful)
    seq = solve(dataclasses.replace(pb, policy="sequential"))
    auto = solve(pb)
    over = solve(dataclasses.replace(pb, policy="overlap"))
    assert auto.period_us == pytest.approx(seq.period_us)
    assert "chose sequential" in auto.message
    assert "chose K=" in over.message
    assert over.period_us >= auto.period_us - 1e-9
    assert len({n.stream for n in over.nano_ops}) > 1 or over.num_nano_batches > 1
