"""The two-stage MILP search against an independent brute force on tiny problems."""

from __future__ import annotations

import dataclasses
import itertools
import time

import networkx as nx
import numpy as np
import pytest

from nfsearch.errors import NfsearchError
from nfsearch.search import Dep, SearchProblem, StageOp, solve
from nfsearch.search.stage1 import solve_stage1
from nfsearch.search.stage2 import solve_stage2

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


# ---- independent brute force ------------------------------------------------------------------

def _pieces(pb, k, bounds, splits):
    """name -> (op, dense granule range, own-class granules)."""
    out = {}
    for o in pb.ops:
        lo, hi = {"all": (0, pb.num_granules), "decode": (0, pb.decode_granules),
                  "prefill": (pb.decode_granules, pb.num_granules)}[o.token_class]
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


def brute_stage1(pb):
    best = float("inf")
    g = pb.num_granules
    for k in range(1, pb.max_nano_batches + 1):
        opts = [p for p in pb.split_options if k % p == 0]
        for inner in itertools.combinations(range(1, g), k - 1):
            bounds = (0, *inner, g)
            for choice in itertools.product(opts, repeat=len(pb.ops)):
                splits = dict(zip((o.name for o in pb.ops), choice, strict=True))
                pieces = _pieces(pb, k, bounds, splits)
                deps = _deps(pb, pieces)
                dur = {n: o.latency_us[tok][-1] for n, (o, _, tok, _) in pieces.items()}
                per_stream = {}
                for n, (o, _, tok, _) in pieces.items():
                    if tok:
                        per_stream.setdefault(o.kind, []).append(n)
                streams = list(per_stream)
                for combo in itertools.product(*(list(_orders(per_stream[s], deps)) for s in streams)):
                    best = min(best, _min_period(dur, deps, dict(zip(streams, combo, strict=True))))
    return best


def brute_stage2(pb, s):
    """No interference: the best partition sizes for a fixed structure."""
    pieces = _pieces(pb, s.num_nano_batches, s.boundaries, s.splits)
    deps = _deps(pb, pieces)
    streams = list(s.stream_order)
    best = float("inf")
    for js in itertools.product(range(len(SMS)), repeat=len(streams)):
        if sum(SMS[j] for j in js) > pb.num_sms:
            continue
        col = dict(zip(streams, js, strict=True))
        dur = {n: (o.latency_us[tok][col[o.kind]] if tok else 0.0) for n, (o, _, tok, _) in pieces.items()}
        best = min(best, _min_period(dur, deps, s.stream_order))
    return best


# ---- tests ------------------------------------------------------------------------------------

def test_stage1_matches_brute_force():
    rng = np.random.default_rng()
    for _ in range(2):
        pb = tiny(rng)
        milp = min(r.period_units for r in (solve_stage1(pb, k, 20) for k in (1, 2)) if r.ok) / 100
        assert milp == pytest.approx(brute_stage1(pb), abs=0.011)


def test_stage2_matches_brute_force_without_interference():
    rng = np.random.default_rng()
    pb = tiny(rng)
    r1 = solve_stage1(pb, 2, 20)
    r2 = solve_stage2(pb, r1.structure, 20)
    assert r2.status == "OPTIMAL"
    assert r2.period_units / 100 == pytest.approx(brute_stage2(pb, r1.structure), abs=0.011)
    assert sum(r2.partitions.values()) <= pb.num_sms


def test_stage2_with_interference_is_bracketed_and_consistent():
    rng = np.random.default_rng()
    slow = {("compute", "memory"): (1.5, 1.5, 1.5), ("memory", "compute"): (2.0, 2.0, 2.0)}
    pb = tiny(rng, interference=slow)
    r1 = solve_stage1(pb, 2, 20)
    t2 = solve_stage2(pb, r1.structure, 20).period_units / 100
    lower = brute_stage2(pb, r1.structure)  # nothing charged
    worst = dataclasses.replace(pb, ops=tuple(dataclasses.replace(o, latency_us=tuple(
        tuple(v * 2.0 for v in row) for row in o.latency_us)) for o in pb.ops))
    assert lower - 0.011 <= t2 <= brute_stage2(worst, r1.structure) + 0.011  # everything charged
    sol = solve(pb)
    for a in sol.nano_ops:  # a nano-op not charged meets no nano-op of another stream
        if a.overlapped:
            continue
        for b in sol.nano_ops:
            for d in (-1, 0, 1):
                if b.stream != a.stream:
                    shift = d * sol.period_us
                    assert a.end_us <= b.start_us + shift + 1e-6 or b.end_us + shift <= a.start_us + 1e-6


def test_sequential_policy_is_the_sum_of_solo_latencies():
    rng = np.random.default_rng()
    pb = tiny(rng, policy="sequential")
    sol = solve(pb)
    total = sum(o.latency_us[{"all": 4, "decode": 2, "prefill": 2}[o.token_class]][-1] for o in pb.ops)
    assert sol.period_us == pytest.approx(total)
    assert sol.iteration_us == pytest.approx(pb.num_layers * total + pb.tail_us)
    assert sol.num_nano_batches == 1 and list(sol.partitions.values()) == [pb.num_sms]


def test_auto_never_slower_than_sequential_and_deterministic():
    rng = np.random.default_rng()
    slow = {("compute", "memory"): (1.3, 1.2, 1.1), ("memory", "compute"): (1.4, 1.3, 1.2)}
    pb = tiny(rng, interference=slow)
    a, b = solve(pb), solve(pb)
    seq = solve(dataclasses.replace(pb, policy="sequential"))
    assert a.period_us <= seq.period_us + 1e-9 and a.iteration_us <= seq.iteration_us + 1e-9
    assert dataclasses.replace(a, solve_time_s=0) == dataclasses.replace(b, solve_time_s=0)
    assert a.status == "OPTIMAL" and a.objective_gap == 0.0


def test_infeasible_and_timeout_paths_explain():
    rng = np.random.default_rng()
    sol = solve(tiny(rng, split_options=(3,)))  # no split count divides K = 1 or 2
    assert sol.status == "INFEASIBLE" and "sequential" in sol.message
    sol = solve(realistic(time_limit_s=0.002))
    assert sol.status in ("UNKNOWN", "FEASIBLE")
    assert sol.message and sol.period_us <= solve(realistic(policy="sequential")).period_us + 1e-9


@pytest.mark.parametrize("change, field", [
    (lambda p: dataclasses.replace(p, sm_options=(1, 2)), "sm_options"),
    (lambda p: dataclasses.replace(p, ops=(dataclasses.replace(p.ops[0], latency_us=((0.0,),)),
                                           *p.ops[1:])), "latency_us"),
    (lambda p: dataclasses.replace(p, ops=(p.ops[0], dataclasses.replace(p.ops[1], deps=(Dep("nope"),)),
                                           *p.ops[2:])), "nope"),
    (lambda p: dataclasses.replace(p, ops=(p.ops[1], p.ops[0], *p.ops[2:])), "topological"),
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
