"""Plan: model + workload + profile -> search problem -> solution -> schedule file.

`plan(config)` is what `nfsearch solve` runs. It imports no torch: planning runs on any laptop.
"""

from __future__ import annotations

import functools
import math
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from nfrt.config import BatchComposition, ModelConfig
from nfrt.layout import from_zero_chunks, position_sum, prefill_chunks
from nfrt.schedule import (
    LayerOp,
    Metadata,
    NanoBatch,
    NanoOp,
    OpDep,
    Prediction,
    ProfileInfo,
    Schedule,
    SolverInfo,
    Stream,
    TimelineEntry,
)

import nfsearch
from nfsearch.bound import Bound, compute_bound
from nfsearch.config import SolveConfig
from nfsearch.emit import place
from nfsearch.errors import NfsearchError
from nfsearch.gpus import GpuSpec, gpu_slug_for_device_name, partition_sizes, resolve_gpu
from nfsearch.models import resolve_model
from nfsearch.opgraph import GATHER_OPS, groups, layer_ops, op_tokens, tail_ops
from nfsearch.profile import Profile, default_profile_for, load_profile, shipped_profile_path
from nfsearch.search.problem import FORM_CLASSES, KINDS, Dep, SearchProblem, Solution, StageOp
from nfsearch.search.timeline import class_range
from nfsearch.workload import Composition, compose_batch, parse_workload

DEFAULT_GPU = "h200"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class PlanResult:
    schedule: Schedule
    solution: Solution
    sequential: Solution
    bound: Bound
    composition: Composition
    gpu: GpuSpec
    profile: Profile
    profile_note: str  # which profile was used and why


def detect_gpu_slug() -> str | None:
    """The local GPU's slug via nvidia-smi (no torch import), or None."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    return gpu_slug_for_device_name(first) if first else None


def gpu_from_profile(profile: Profile) -> GpuSpec:
    """The profile's GPU with its ceilings (measured ones for a measured profile)."""
    gpu = resolve_gpu(profile.meta.gpu)
    return gpu.with_overrides(peak_tflops=profile.meta.peak_tflops, hbm_gbps=profile.meta.hbm_gbps,
                              nvlink_gbps=profile.meta.nvlink_gbps)


def choose_profile(model: ModelConfig, cfg: SolveConfig) -> tuple[Profile, str]:
    if cfg.profile:
        prof = load_profile(cfg.profile)
        if prof.meta.model not in (model.name, "*"):
            raise NfsearchError(f"profile {cfg.profile} is for model {prof.meta.model}, not {model.name}")
        if prof.meta.tp != cfg.tp:
            raise NfsearchError(f"profile {cfg.profile} is for tp {prof.meta.tp}, not {cfg.tp}")
        return prof, f"profile {cfg.profile} ({prof.meta.source})"
    if cfg.gpu:
        slug, why = resolve_gpu(cfg.gpu).name, f"--gpu {cfg.gpu}"
    else:
        detected = detect_gpu_slug()
        slug, why = (detected, "detected GPU") if detected else (DEFAULT_GPU, "no GPU detected: default")
    prof = default_profile_for(model, resolve_gpu(slug), cfg.tp, gather=cfg.gather_form)
    return prof, f"{why} {slug}: {prof.meta.source} profile"


def _context(op, batch: BatchComposition) -> int:
    ctx = op_tokens(op, batch)[1]
    return ctx if ctx or op.token_class == "all" else 1


@functools.lru_cache(maxsize=64)
def _serving_chunks(prefill_tokens: int, prefill_context: int) -> tuple[tuple[int, int], ...]:
    return prefill_chunks(prefill_tokens, prefill_context)


def prefill_work(prefill_tokens: int, prefill_context: int, start: int, end: int) -> int:
    """Causal attention work of prefill tokens [start, end) of the batch layout: sum of (p + 1)
    over their prompt positions p. The prefill region of `prefill_tokens` tokens is laid out as
    `nfrt.batch.make_batch` (and `LLM.time_iteration`) lay it out: a stretch of back-to-back prompts
    of `prefill_context` tokens cut where real chunked prefill puts its tokens on average
    (`nfrt.layout.prefill_chunks`)."""
    return position_sum(_serving_chunks(prefill_tokens, prefill_context), start, end)


def reference_work(source: str, tokens: int, context: int) -> float:
    """Attention work of the layout `profile.latency_us("attn_prefill", tokens, context, ·)` stands
    for: the profiler times the first `tokens` tokens of length-`context` prompts from position 0
    (nfsearch/profiler/measure.py, `make_batch(layout="from_zero")`); the analytic model charges
    every token (context + 1) / 2 keys."""
    if source == "analytic":
        return tokens * (context + 1) / 2
    return float(position_sum(from_zero_chunks(tokens, context)))


def _latency_by_work(profile: Profile, tokens: int, full_sms: int, min_slope_us: float):
    """(f, slope): f(w) is the profile's full-GPU latency of `tokens` prefill tokens as a function of
    their work, piecewise linear through its grid contexts (the same token count at less or more
    work), made non-decreasing, flat below the least work and extended above the most with
    slope = max(the last segment's slope, min_slope_us) (proportional when there is one point and
    no minimum). The minimum is the slope found at a larger token count: fewer tokens run fewer
    blocks at once, so a unit of work never costs less (the profile's noise aside)."""
    pts: dict[float, list[float]] = {}
    for c in profile.context_grid("attn_prefill"):
        w = reference_work(profile.meta.source, tokens, max(c, 1))
        pts.setdefault(w, []).append(profile.latency_us("attn_prefill", tokens, c, full_sms))
    ws = sorted(pts)
    ls: list[float] = []
    for w in ws:  # equal work (contexts >= tokens) is one point; more work never faster
        ls.append(max(sum(pts[w]) / len(pts[w]), ls[-1] if ls else 0.0))
    if len(ws) > 1:
        slope = max((ls[-1] - ls[-2]) / (ws[-1] - ws[-2]), min_slope_us)
    else:
        slope = min_slope_us or ls[0] / ws[0]

    def f(w: float) -> float:
        if w <= ws[0]:
            return ls[0]
        if w >= ws[-1]:
            return ls[-1] + slope * (w - ws[-1])
        i = next(i for i in range(1, len(ws)) if w <= ws[i])
        return ls[i - 1] + (ls[i] - ls[i - 1]) * (w - ws[i - 1]) / (ws[i] - ws[i - 1])

    return f, slope


def prefill_scale(batch: BatchComposition, g: int, profile: Profile, full_sms: int,
                  latency_us: list[float]) -> tuple[tuple[float, ...], ...] | None:
    """StageOp.scale of prefill attention. A piece on prefill granules [a, a + n) does the work
    W = prefill_work(T, c, a*g, (a+n)*g) of its own prompt positions; latency_us[n] (full GPU) was
    profiled on a reference layout of the same token count, of work W_ref (`reference_work`). The
    piece costs latency_us[n] + f_n(W) - f_n(W_ref), f_n = the profile's latency of n*g tokens
    against work across its grid contexts (`_latency_by_work`): the profile's own marginal cost of
    work at that token count, so a piece deep in a prompt costs more and a fixed per-launch part is
    not scaled. scale = that / latency_us[n]. (A measured profile's reference layout starts at
    position 0, the batch's does not, so even scale[0][n] is not 1.)"""
    c = batch.prefill_tokens // g
    if c == 0:
        return None
    rows = [[1.0] * (c + 1 - a) for a in range(c + 1)]
    slope = 0.0
    for n in range(c, 0, -1):  # largest first: its slope is the floor of the smaller counts'
        f, slope = _latency_by_work(profile, n * g, full_sms, slope)
        base = latency_us[n]
        ref = f(reference_work(profile.meta.source, n * g, batch.prefill_context))
        for a in range(c + 1 - n):
            w = prefill_work(batch.prefill_tokens, batch.prefill_context, a * g, (a + n) * g)
            rows[a][n] = round(max(0.0, base + f(w) - ref) / base, 6) if base > 0 else 1.0
    return tuple(tuple(r) for r in rows)


def build_problem(model: ModelConfig, batch: BatchComposition, profile: Profile, gpu: GpuSpec, tp: int,
                  cfg: SolveConfig) -> SearchProblem:
    """Latency tables per stage op (group) over token granules and partition sizes."""
    g = cfg.granularity_tokens
    if batch.dense_batch % g or batch.decode_tokens % g:
        raise NfsearchError(f"dense batch {batch.dense_batch} and decode tokens {batch.decode_tokens} "
                            f"must be multiples of the {g}-token granule")
    num_granules = batch.dense_batch // g
    profiled = set(profile.sm_grid())
    # a partition narrower than the GPU must be placeable beside others (GpuSpec.placeable_sms)
    sms = tuple(s for s in partition_sizes(gpu)
                if (s in profiled and s <= gpu.placeable_sms) or s == gpu.num_sms)
    gather = cfg.gather_form
    specs = {op.name: op for op in layer_ops(model, tp, gather)}
    if gather:
        missing = [op for op in GATHER_OPS if op not in profile.ops()]
        if missing:
            raise NfsearchError(f"--gather-form: the profile has no {', '.join(missing)} (a "
                                f"{profile.meta.source} profile of {profile.meta.date}); add them with "
                                f"`nfsearch profile --tp {tp} --add-ops` on the GPUs, or solve without "
                                "--gather-form")
    stage_ops = []
    for name, grp in groups(model, tp, gather).items():
        # n granules of the group's own token class: every op of a group runs on those tokens
        # (an `all` op inside an attention group does not occur; see docs/architecture.md).
        # an attention op whose class is absent from the batch still needs a valid context
        # for its (never used) table rows
        contexts = [_context(specs[op_name], batch) for op_name in grp.ops]
        rows = tuple(
            tuple(round(sum(profile.latency_us(op_name, n * g, ctx, s)
                            for op_name, ctx in zip(grp.ops, contexts, strict=True)), 3) if n else 0.0
                  for s in sms)
            for n in range(num_granules + 1))
        deps = tuple(Dep(op=p, scope=scope, prev_layer=prev) for p, scope, prev in grp.deps)
        scale = None
        if "attn_prefill" in grp.ops:  # its cost depends on where its tokens sit in the prompts
            if len(grp.ops) > 1:  # one factor per piece would no longer be exact for the group
                raise NfsearchError(f"group {name!r}: attn_prefill must be alone in its group, got "
                                    f"{', '.join(grp.ops)}")
            scale = prefill_scale(batch, g, profile, gpu.num_sms, [r[-1] for r in rows])
        stage_ops.append(StageOp(name=name, kind=grp.kind, token_class=grp.token_class,
                                 graph_ops=tuple(grp.ops), deps=deps, latency_us=rows, scale=scale))
    interference = {(kind, other): tuple(profile.slowdown(kind, other, s) for s in sms)
                    for kind in KINDS for other in KINDS if kind != other}
    tail_us = 0.0
    for op in tail_ops(model, tp):
        tokens, context = op_tokens(op, batch)
        tail_us += profile.latency_us(op.name, tokens, context, gpu.num_sms) if tokens else 0.0
    return SearchProblem(
        ops=tuple(stage_ops), num_granules=num_granules, granularity_tokens=g,
        decode_granules=batch.decode_tokens // g, num_sms=gpu.num_sms, sm_options=sms,
        concurrent_sms=gpu.placeable_sms,
        interference=interference, num_layers=model.num_layers, tail_us=round(tail_us, 3),
        max_nano_batches=cfg.max_nano_batches, policy=cfg.policy, min_gain=cfg.min_gain,
        time_limit_s=cfg.time_limit_s, structure_family=cfg.structure_family)


def to_schedule(cfg: SolveConfig, model: ModelConfig, comp: Composition, gpu: GpuSpec, profile: Profile,
                problem: SearchProblem, sol: Solution, seq: Solution, bound: Bound) -> Schedule:
    g = problem.granularity_tokens
    batch = comp.batch
    problem = replace(problem, gather_granules=sol.gather_granules)  # what the solution was timed on
    gather = sol.gather_granules > 0
    groups_by_name = {op.name: op for op in problem.ops}
    nano = {n.name: n for n in sol.nano_ops}
    placed = place(problem, sol)
    stream_name = {name: ps.name for ps in placed.streams for name in ps.nano_ops}
    def tokens(n) -> tuple[int, int]:
        a, c = n.granules
        cls = groups_by_name[n.op].token_class
        if cls in FORM_CLASSES:  # F is a nano-batch boundary: show the tokens the form runs on
            lo, hi = class_range(problem, cls)
            a, c = max(a, lo), min(c, hi)
        return a * g, c * g

    streams = tuple(
        Stream(name=ps.name, kind=ps.kind, partition=ps.partition.name,
               nano_ops=tuple(NanoOp(name=name, ops=groups_by_name[nano[name].op].graph_ops,
                                     tokens=tokens(nano[name]), num_sms=ps.partition.num_sms)
                              for name in ps.nano_ops))
        for ps in placed.streams)
    bounds = sol.boundaries
    nano_batches = tuple(NanoBatch(name=f"nb{i}", start=bounds[i] * g, end=bounds[i + 1] * g)
                         for i in range(len(bounds) - 1))
    layer = tuple(LayerOp(name=op.name, kind=op.kind, token_class=op.token_class,
                          deps=tuple(OpDep(op=p, scope=s, prev_layer=prev) for p, s, prev in op.deps))
                  for op in layer_ops(model, cfg.tp, gather))
    # one dense batch per iteration for the whole TP group: per GPU, divide by tp
    tokens_per_s = batch.dense_batch / (sol.iteration_us * 1e-6) / cfg.tp
    optimal = bound.optimal_tokens_per_s_per_gpu
    timeline = tuple(TimelineEntry(nano_op=n.name, stream=stream_name[n.name], start_us=n.start_us,
                                   end_us=n.end_us)
                     for n in sorted(sol.nano_ops, key=lambda n: (n.start_us, n.name)))
    prediction = Prediction(
        period_us=sol.period_us, layer_span_us=sol.layer_span_us, iteration_us=sol.iteration_us,
        tokens_per_s_per_gpu=tokens_per_s, fraction_of_bound=tokens_per_s / optimal,
        optimal_tokens_per_s_per_gpu=optimal,
        speedup_vs_sequential=seq.iteration_us / sol.iteration_us, timeline=timeline)
    meta = Metadata(
        model=model.name, model_config=model, gpu=gpu.name, num_sms=gpu.num_sms, tp=cfg.tp,
        workload=cfg.workload, dense_batch=batch.dense_batch, batch=batch, num_layers=model.num_layers,
        profile=ProfileInfo(hash=profile.hash, source=profile.meta.source,
                            path=_profile_path(cfg, model, gpu, profile)),
        solver=SolverInfo(name="ortools-cp-sat", policy=cfg.policy, status=sol.status,
                          objective_us=sol.period_us, gap=sol.objective_gap, solve_time_s=sol.solve_time_s,
                          structure_family=cfg.structure_family),
        nfsearch_version=nfsearch.__version__, gather_tokens=sol.gather_granules * g)
    return Schedule(schema_version=1, metadata=meta, layer=layer,
                    partitions=tuple(ps.partition for ps in placed.streams), streams=streams,
                    nano_batches=nano_batches, dependencies=placed.dependencies, prediction=prediction)


def _profile_path(cfg: SolveConfig, model: ModelConfig, gpu: GpuSpec, profile: Profile) -> str:
    if cfg.profile:
        return _display_path(cfg.profile)
    shipped = shipped_profile_path(gpu.name, model.name, cfg.tp)
    return _display_path(str(shipped)) if shipped and profile.meta.source == "measured" else "analytic"


def _display_path(p: str) -> str:
    path = Path(p).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def default_output(cfg: SolveConfig, model: ModelConfig, gpu: GpuSpec) -> Path:
    workload = cfg.workload.replace(":", "-")
    suffix = ("" if cfg.policy == "auto" else f"-{cfg.policy}") + ("-gather" if cfg.gather_form else "")
    return REPO_ROOT / "schedules" / f"{model.name}-{gpu.name}-tp{cfg.tp}-{workload}{suffix}.yaml"


def plan(cfg: SolveConfig) -> PlanResult:
    """Solve `cfg` and build the schedule (not written: see `nfrt.schedule.save_schedule`)."""
    from nfsearch.search import solve  # OR-Tools loads only when something is solved

    model = resolve_model(cfg.model)
    profile, note = choose_profile(model, cfg)
    gpu = gpu_from_profile(profile)
    workload = parse_workload(cfg.workload)
    g = math.gcd(cfg.granularity_tokens, cfg.dense_batch)
    if g != cfg.granularity_tokens:
        cfg = replace(cfg, granularity_tokens=g)
    comp = compose_batch(model, workload, gpu, tp=cfg.tp, dense_batch=cfg.dense_batch, round_to=g)
    problem = build_problem(model, comp.batch, profile, gpu, cfg.tp, cfg)
    seq = solve(replace(problem, policy="sequential"))
    sol = seq if cfg.policy == "sequential" else solve(problem)
    # A time-out or an infeasible MILP still leaves the sequential schedule, which is always
    # feasible: it is written with the solver's status and message, never silently.
    bound = compute_bound(model, gpu, cfg.tp, workload, comp.batch.dense_batch)
    schedule = to_schedule(cfg, model, comp, gpu, profile, problem, sol, seq, bound)
    return PlanResult(schedule=schedule, solution=sol, sequential=seq, bound=bound, composition=comp,
                      gpu=gpu, profile=profile, profile_note=note)
