"""`solve(problem) -> Solution`: validate, run stage 1 for every K, stage 2 on each K's structure,
compare with the sequential schedule, and return the best. Labels refer to docs/formulation.md."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from nfsearch.errors import NfsearchError
from nfsearch.search.family import k2_family
from nfsearch.search.problem import FORM_CLASSES, KINDS, TOKEN_CLASSES, NanoOp, SearchProblem, Solution
from nfsearch.search.stage1 import StageResult, refine_hint, solve_stage1
from nfsearch.search.stage2 import charged, piece_ranges, shared_sm_edges, solve_stage2
from nfsearch.search.timeline import (
    SCALE,
    Structure,
    all_pieces,
    class_range,
    granules_of,
    layer_span_us,
    unrolled_makespan,
)


def validate(problem: SearchProblem) -> None:
    """Raise NfsearchError naming the first malformed field."""
    def bad(msg: str) -> NfsearchError:
        return NfsearchError(f"search problem: {msg}")

    g = problem.num_granules
    if not isinstance(g, int) or g < 1:
        raise bad(f"num_granules must be a positive integer, got {g!r}")
    if not 0 <= problem.decode_granules <= g:
        raise bad(f"decode_granules {problem.decode_granules} must be in 0..num_granules ({g})")
    if not 0 <= problem.gather_granules <= g:
        raise bad(f"gather_granules {problem.gather_granules} must be in 0..num_granules ({g})")
    sms = problem.sm_options
    if not sms or any(b <= a for a, b in zip(sms, sms[1:], strict=False)) or sms[0] < 1:
        raise bad(f"sm_options must be positive and strictly ascending, got {sms}")
    if not 0 <= problem.concurrent_sms <= problem.num_sms:
        raise bad(f"concurrent_sms must be in 0..num_sms ({problem.num_sms}), got {problem.concurrent_sms}")
    if sms[-1] != problem.num_sms:
        raise bad(f"sm_options must end at num_sms ({problem.num_sms}), got {sms}")
    if problem.granularity_tokens < 1 or problem.num_layers < 1 or problem.max_nano_batches < 1:
        raise bad("granularity_tokens, num_layers and max_nano_batches must be >= 1")
    if problem.tail_us < 0 or not problem.time_limit_s > 0:
        raise bad("tail_us must be >= 0 and time_limit_s > 0")
    if not problem.split_options or any(not isinstance(p, int) or p < 1 for p in problem.split_options):
        raise bad(f"split_options must be positive integers, got {problem.split_options}")
    if problem.policy not in ("auto", "sequential", "overlap"):
        raise bad(f"policy {problem.policy!r} is not one of auto, sequential, overlap")
    if not (isinstance(problem.min_gain, int | float) and 0.0 <= problem.min_gain < 1.0):
        raise bad(f"min_gain must be a fraction in [0, 1), got {problem.min_gain!r}")
    for key, row in problem.interference.items():
        if len(key) != 2 or any(k not in KINDS for k in key):
            raise bad(f"interference key {key!r} must be a pair of {', '.join(KINDS)}")
        if len(row) != len(sms) or any(not (math.isfinite(f) and f >= 1.0) for f in row):
            raise bad(f"interference[{key}] needs {len(sms)} finite slowdowns >= 1, got {row}")
    if not problem.ops:
        raise bad("ops is empty")
    seen: dict[str, int] = {}
    for idx, o in enumerate(problem.ops):
        if o.name in seen:
            raise bad(f"duplicate op name {o.name!r}")
        if o.kind not in KINDS:
            raise bad(f"op {o.name!r}: kind {o.kind!r} is not one of {', '.join(KINDS)}")
        if o.token_class not in TOKEN_CLASSES:
            raise bad(f"op {o.name!r}: token_class {o.token_class!r} is not one of "
                      f"{', '.join(TOKEN_CLASSES)}")
        if o.token_class in FORM_CLASSES and o.scale is not None:
            raise bad(f"op {o.name!r}: an op of class {o.token_class} cannot have a position scale")
        lat = o.latency_us
        if len(lat) != g + 1 or any(len(r) != len(sms) for r in lat):
            raise bad(f"op {o.name!r}: latency_us must be {g + 1} rows (0..num_granules) of "
                      f"{len(sms)} columns (sm_options)")
        if any(not (math.isfinite(v) and v >= 0) for r in lat for v in r) or any(lat[0]):
            raise bad(f"op {o.name!r}: latency_us must be finite, >= 0, and 0 for 0 granules")
        if o.scale is not None:
            lo, hi = class_range(problem, o.token_class)
            c = hi - lo
            if len(o.scale) != c + 1 or any(len(r) != c + 1 - a for a, r in enumerate(o.scale)):
                raise bad(f"op {o.name!r}: scale must be {c + 1} rows (start granule a = 0..{c} of its "
                          f"{o.token_class} class), row a holding {c + 1} - a factors (n = 0..{c} - a)")
            if any(not (math.isfinite(v) and v >= 0) for r in o.scale for v in r):
                raise bad(f"op {o.name!r}: scale factors must be finite and >= 0")
        seen[o.name] = idx
    names = ", ".join(seen)
    for idx, o in enumerate(problem.ops):
        for d in o.deps:
            if d.op not in seen:
                raise bad(f"op {o.name!r}: dep {d.op!r} is not an op; ops: {names}")
            if d.scope not in ("token", "prefix"):
                raise bad(f"op {o.name!r}: dep scope {d.scope!r} is not one of token, prefix")
            if not d.prev_layer and seen[d.op] >= idx:
                raise bad(f"op {o.name!r}: in-layer dep {d.op!r} does not come earlier in ops "
                          "(ops must be in a topological order)")


@dataclass(frozen=True)
class _Candidate:
    status: str
    result: StageResult | None  # None for the sequential schedule
    structure: Structure
    partitions: dict[str, int]  # stream -> the largest SM count of its nano-ops
    sizes: dict[str, int]  # non-empty nano-op -> its SM count
    start_us: dict[str, float]
    dur_us: dict[str, float]
    flags: dict[str, bool]
    period_us: float
    span_us: float
    iteration_us: float
    stage1_period_us: float
    gap: float


def with_forms(problem: SearchProblem, s: Structure) -> SearchProblem:
    """The problem with the structure's form boundary filled in [S1.form]: what stage 2, the
    prediction and the schedule see (class ranges are then fixed)."""
    if s.gather_granules == problem.gather_granules:
        return problem
    return replace(problem, gather_granules=s.gather_granules)


def _sequential(problem: SearchProblem) -> _Candidate:
    """One nano-batch, one stream ("compute") on all SMs: the period is the sum of solo latencies."""
    g = problem.num_granules
    s0 = Structure(1, (0, g), {o.name: 1 for o in problem.ops}, {}, problem.gather_granules)
    ranges = piece_ranges(problem, s0)
    dur = {f"{o.name}.0": o.piece_latency_us(*ranges[f"{o.name}.0"], -1) for o in problem.ops}
    order = tuple(n for n in dur if ranges[n][1] > 0)
    s = Structure(1, (0, g), s0.splits, {"compute": order}, problem.gather_granules)
    start, t = {}, 0.0
    for n in dur:
        start[n] = t
        t += dur[n]
    return _Candidate("OPTIMAL", None, s, {"compute": problem.num_sms}, dict.fromkeys(order, problem.num_sms),
                      start, dur, dict.fromkeys(order, False), t, t,
                      problem.num_layers * t + problem.tail_us, t, 0.0)


def _from_stage2(problem: SearchProblem, r: StageResult, r1: StageResult, window: int) -> _Candidate:
    sizes, dur, flags = charged(problem, r, window)
    s = r.structure
    # [S2.polish] may have grown sizes: a stream's partition is the largest size its nano-ops use
    parts = {k: max(sizes[n] for n in order) for k, order in s.stream_order.items() if order}
    start = {n: u / SCALE for n, u in r.start_units.items()}
    first = min((start[n] for order in s.stream_order.values() for n in order), default=0.0)
    start = {n: t - first for n, t in start.items()}
    t = r.period_units / SCALE
    gap = (r.period_units - r.period_bound_units) / r.period_units if r.period_units else 0.0
    shared = shared_sm_edges(problem, s, sizes, start, dur, t)
    return _Candidate(r.status, r, s, parts, sizes, start, dur, flags, t, layer_span_us(s, start, dur),
                      unrolled_makespan(problem, s, dur, shared) + problem.tail_us,
                      r1.period_units / SCALE, gap)


def _solution(problem: SearchProblem, c: _Candidate, status: str, msg: str, t0: float) -> Solution:
    s = c.structure
    stream_of = {n: k for k, order in s.stream_order.items() for n in order}
    nano = tuple(NanoOp(p.name, p.op, p.index, granules_of(s.boundaries, p), stream_of[p.name],
                        c.sizes[p.name], c.start_us[p.name],
                        c.start_us[p.name] + c.dur_us[p.name], c.flags[p.name])
                 for p in all_pieces(problem, s.num_nano_batches, s.splits) if p.name in stream_of)
    return Solution(status, s.num_nano_batches, s.boundaries, dict(s.splits), nano,
                    {k: v for k, v in s.stream_order.items() if v}, dict(c.partitions), c.period_us,
                    c.span_us, c.iteration_us, c.stage1_period_us, c.gap, time.monotonic() - t0, msg,
                    s.gather_granules)


def standard_problem(problem: SearchProblem) -> SearchProblem:
    """The problem without the all-gather form [S1.form]: gather-class ops and the deps on them
    dropped, reduce-class ops back to class all (the standard all-reduce layer)."""
    dropped = {o.name for o in problem.ops if o.token_class == "gather"}
    ops = tuple(replace(o, token_class="all" if o.token_class == "reduce" else o.token_class,
                        deps=tuple(d for d in o.deps if d.op not in dropped))
                for o in problem.ops if o.name not in dropped)
    return replace(problem, ops=ops, gather_granules=0)


def solve(problem: SearchProblem) -> Solution:
    """The best schedule of `problem`. With form classes [S1.form] the search runs twice, each with
    the whole time limit: on the standard all-reduce layer (`standard_problem`) and with the choice
    of form; the better wins (ties: the standard layer), so offering the all-gather form never
    returns a worse schedule than the standard layer's own search, at twice the solve time."""
    validate(problem)
    if not problem.has_forms or problem.policy == "sequential":
        return _search(problem)
    t0 = time.monotonic()
    std = _search(standard_problem(problem))
    both = _search(problem)

    def key(s: Solution) -> tuple[int, int]:
        return round(s.period_us * SCALE), round(s.layer_span_us * SCALE)

    best = both if key(both) < key(std) else std
    note = (f"; the all-reduce layer alone: T={std.period_us:g} us, with the all-gather form: "
            f"T={both.period_us:g} us")
    return replace(best, solve_time_s=time.monotonic() - t0, message=best.message + note)


def _search(problem: SearchProblem) -> Solution:
    t0 = time.monotonic()
    seq = _sequential(problem)
    if problem.policy == "sequential":
        return _solution(problem, seq, "OPTIMAL", "sequential policy: one stream, all SMs", t0)

    ks = list(range(1, min(problem.max_nano_batches, problem.num_granules) + 1))
    # Each sub-solve gets a fixed share of the limit in deterministic time, so the same problem
    # gives the same schedule on any machine (wall-clock shares would not).
    share = problem.time_limit_s / (2 * len(ks))
    stage1: dict[int, StageResult] = {}
    for k in ks:  # the outer loop of the MILP over K
        hints = [refine_hint(problem, k, stage1[d]) for d in ks if d < k and k % d == 0 and stage1[d].ok]
        hints = [h for h in hints if h is not None]
        hint = min(hints, key=lambda h: (h["T"], h["span"]), default=None)
        stage1[k] = solve_stage1(problem, k, share, hint)

    cands = [seq]
    statuses = [r.status for r in stage1.values()]
    notes = []
    for k in ks:
        r1 = stage1[k]
        if not r1.ok:
            notes.append(f"K={k}: stage 1 {r1.status.lower()}")
            continue
        window = max(2, math.ceil(r1.span_units / max(r1.period_units, 1)))
        fixed = with_forms(problem, r1.structure)
        r2 = solve_stage2(fixed, r1.structure, share, window)
        statuses.append(r2.status)
        if r2.ok:
            cands.append(_from_stage2(fixed, r2, r1, window))
            notes.append(f"K={k}: T1={r1.period_units / SCALE:g} T2={r2.period_units / SCALE:g} us")
        else:
            notes.append(f"K={k}: stage 1 T1={r1.period_units / SCALE:g} us, stage 2 {r2.status.lower()}")

    if problem.structure_family and 2 in ks:  # [S1.family]: stage 2 on each, same budget as one K
        family = k2_family(problem)
        fam: list[tuple[str, _Candidate]] = []
        for label, s in family:
            r2 = solve_stage2(problem, s, share / len(family), 2)
            statuses.append(r2.status)
            if r2.ok:
                fam.append((label, _from_stage2(problem, r2, stage1[2] if stage1[2].ok else r2, 2)))
        if fam:
            label, c = min(fam, key=lambda x: (round(x[1].period_us * SCALE), round(x[1].span_us * SCALE)))
            cands.append(c)
            notes.append(f"K=2 family: {len(fam)} of {len(family)} feasible, best {label} "
                         f"T2={c.period_us:g} us")

    # auto is never predicted slower than sequential: candidates must beat it on both counts, the
    # iteration by min_gain [sel.margin]
    need_us = seq.iteration_us * (1.0 - problem.min_gain)
    ok = [c for c in cands if c.result is None
          or (c.period_us <= seq.period_us + 1e-9 and c.iteration_us <= need_us + 1e-9)]
    if problem.policy == "overlap":  # the best overlapped schedule even when predicted slower (to measure it)
        ok = [c for c in cands if c.result is not None] or ok
    best = min(ok, key=lambda c: (round(c.period_us * SCALE), round(c.span_us * SCALE),
                                  c.structure.num_nano_batches, c.result is not None))
    summary = "; ".join(notes) + f"; sequential T={seq.period_us:g} us"
    if len(cands) == 1:
        proven = all(st == "INFEASIBLE" for st in statuses)
        why = ("no structure beats the sequential schedule (every MILP infeasible)" if proven else
               f"no MILP solution within time_limit_s={problem.time_limit_s:g}")
        return _solution(problem, seq, "INFEASIBLE" if proven else "UNKNOWN",
                         f"{why}; returning the sequential schedule ({summary})", t0)
    status = "OPTIMAL" if all(st in ("OPTIMAL", "INFEASIBLE") for st in statuses) else "FEASIBLE"
    chosen = "sequential" if best.result is None else f"K={best.structure.num_nano_batches}"
    if best.structure.gather_granules:
        chosen += f", all-gather form on granules [0, {best.structure.gather_granules})"
    return _solution(with_forms(problem, best.structure), best, status, f"chose {chosen} ({summary})", t0)
