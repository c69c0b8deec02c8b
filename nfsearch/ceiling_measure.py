"""`nfsearch ceiling`: how much overlapping a layer's compute and memory work can gain on this GPU.

Before trusting (or blaming) a searched schedule, measure what overlap can buy at all. For one
schedule's batch this times, sustained at the GPU's power limit, with the runtime's own ops
(`nfrt.model.Model.run_op` through the profiler's `GpuTimer`: random weights, KV pages scattered
over a 2 GiB pool per layer):

- C: one layer's compute ops (its GEMMs and prefill attention over the whole batch), looped in a
  CUDA graph and replayed alone on all SMs; M: one layer's decode attention, the same way; the
  other ops (norms, RoPE, KV append) alone;
- the sequential pair: the C and M graphs replayed alternately on one stream;
- every placed split (c SMs for compute at the bottom, the rest of the placed SMs for memory at the
  top, as `nfrt.partition.make_layout` places an engine's streams): both graphs replayed
  concurrently, after a warm-up co-run to the power-capped steady state, as the profiler's
  interference co-runs do (`nfsearch.profiler.corun`).

`nfsearch.ceiling.overlap_ceiling` turns these into the ceiling on the overlap's speedup (its
docstring has the linear program). The other ops are then measured as a third unit (C, M and O
alternating as the sequential layer; compute|other and memory|other side by side, the other ops on
the top o SMs; compute, other and memory three ways from the best splits), and
`nfsearch.ceiling.other_ceiling` gives the ceiling with them overlappable at their measured rates,
under the record's `other_unit_ceiling`. A tensor-parallel schedule (tp N > 1) re-runs the command
as N processes under torchrun, one per GPU, and adds the network (the layer's all-reduces) as a
third unit (`nfsearch.ceiling_tp`; the other ops stay serial or free). The JSON record goes to
`--out` (atomic write; rank 0 under TP). This module imports no torch at import time: the CLI
registers it on machines without a GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nfrt.schedule import Schedule, load_schedule

from nfsearch.bench import DEFAULT_OUT, require_cuda, stamped_path, write_record
from nfsearch.ceiling import PairRate, SplitRate, TripleRate, other_ceiling, overlap_ceiling
from nfsearch.errors import NfsearchError

Unit = list[tuple[str, int, int]]  # (op, tokens, context)


@dataclass(frozen=True)
class CeilingConfig:
    schedule: str
    seconds: float = 0.6  # each sustained replay (the co-runs; solo runs take half)
    out: str = DEFAULT_OUT

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise NfsearchError(f"--seconds must be positive, got {self.seconds!r}")


def _classify(schedule: Schedule) -> dict[str, Unit]:
    """compute, memory, network and other ops of one layer of the schedule's batch, as (op, tokens,
    context); ops with no tokens in this batch are left out."""
    b = schedule.metadata.batch
    point = {"all": (b.dense_batch, 0), "prefill": (b.prefill_tokens, b.prefill_context),
             "decode": (b.decode_tokens, b.decode_context)}
    out: dict[str, Unit] = {"compute": [], "memory": [], "network": [], "other": []}
    for o in schedule.layer:
        kind = o.kind if o.kind in ("compute", "network") else "other"
        if o.kind == "memory" and o.token_class == "decode":
            kind = "memory"
        out[kind].append((o.name, *point[o.token_class]))
    out = {k: [x for x in u if x[1] > 0] for k, u in out.items()}
    need = ("compute", "memory", "network") if schedule.metadata.tp > 1 else ("compute", "memory")
    if any(not out[k] for k in need):
        raise NfsearchError("ceiling: the batch needs compute work and decode attention to overlap"
                            + (" and all-reduces" if schedule.metadata.tp > 1 else "") + ", got "
                            + " and ".join(f"{k} {[n for n, *_ in out[k]]}" for k in need))
    return out


def units(schedule: Schedule) -> tuple[Unit, Unit, Unit]:
    """(compute, memory, other) ops of one layer of a tp-1 schedule's batch: compute = the compute
    ops, memory = the decode-class memory ops (decode attention), other = the rest (norms, RoPE, KV
    append). Ops with no tokens in this batch are left out."""
    if schedule.metadata.tp != 1:
        raise NfsearchError(f"ceiling: units() is for one GPU, the schedule has tp "
                            f"{schedule.metadata.tp} (tp_units)")
    u = _classify(schedule)
    return u["compute"], u["memory"], u["other"]


def tp_units(schedule: Schedule) -> tuple[Unit, Unit, Unit, Unit]:
    """(compute, memory, network, other) of a tensor-parallel schedule: as `units`, with the
    network unit the layer's all-reduces (attn_allreduce, mlp_allreduce) over the whole batch."""
    if schedule.metadata.tp < 2:
        raise NfsearchError(f"ceiling: tp_units() is for tp > 1, the schedule has tp {schedule.metadata.tp}")
    u = _classify(schedule)
    return u["compute"], u["memory"], u["network"], u["other"]


def unit_launcher(timer: Any, schedule: Schedule, ops: Unit) -> Callable[[int], None]:
    """fn(i) issuing launch i of every op of `ops` through the profiler's `GpuTimer`. A launcher
    binds its op's batch and ops run on the batch bound when captured: the prefill-class ops are
    bound last (the GEMMs read only hidden rows, valid in any batch)."""
    token_class = {o.name: o.token_class for o in schedule.layer}
    fns = {op: timer._launcher(op, t, ctx)
           for op, t, ctx in sorted(ops, key=lambda x: token_class[x[0]] == "prefill")}
    return lambda i: [fns[op](i) for op, *_ in ops]


def measure(cfg: CeilingConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The record: units, every split's co-run and the ceilings (see the module docstring)."""
    schedule = load_schedule(cfg.schedule)
    compute, memory, other = units(schedule)
    require_cuda("ceiling")  # before the GPU-only imports (Triton)
    import torch
    from nfrt.partition import make_layout

    from nfsearch.profiler.corun import alternating_us, looped, solo_us
    from nfsearch.profiler.grid import full_grid
    from nfsearch.profiler.measure import GpuTimer

    timer = GpuTimer(schedule.metadata.model_config, 1,
                     full_grid(torch.cuda.get_device_properties(0).multi_processor_count))
    sec = cfg.seconds
    log(f"{torch.cuda.get_device_name(0)}; {schedule.metadata.model} {schedule.metadata.workload}: "
        f"{schedule.metadata.batch}")
    log(f"compute unit {compute}\nmemory unit {memory}\nother {other}")

    unit = functools.partial(unit_launcher, timer, schedule)

    full = torch.cuda.Stream()
    gc, nc = looped(timer, full, unit(compute))
    gm, nm = looped(timer, full, unit(memory))
    c_us, m_us = solo_us(gc, full, sec) / nc, solo_us(gm, full, sec) / nm
    o_us, seq_layer_us = 0.0, 0.0
    # the sequential pair: C then M, alternating
    pair_us = alternating_us([(gc, nc * c_us), (gm, nm * m_us)], full, sec)
    seq_us = pair_us * (c_us + m_us) / (nc * c_us + nm * m_us)  # per C + M, in the pair's proportions
    if other:
        go, no = looped(timer, full, unit(other))
        o_us = solo_us(go, full, sec) / no
        # the sequential layer: C, M, O alternating (the third unit's baseline)
        reps = [(gc, nc * c_us), (gm, nm * m_us), (go, no * o_us)]
        seq_layer_us = alternating_us(reps, full, sec) * (c_us + m_us + o_us) / sum(us for _, us in reps)
        del go
    del gc, gm
    log(f"alone on all SMs (sustained): C {c_us:.1f} us, M {m_us:.1f} us, other {o_us:.1f} us; "
        f"C then M alternating: {seq_us:.1f} us per pair (C + M = {c_us + m_us:.1f})"
        + (f"; C, M, O alternating: {seq_layer_us:.1f} us" if other else ""))

    layout = make_layout(0)
    top = layout.aligned
    splits: list[SplitRate] = []
    alone: list[dict[str, float]] = []
    pairs: list[PairRate] = []
    triples: list[TripleRate] = []
    try:
        for cs in [s for s in timer.grid.sms if top // 3 <= s <= top - 8]:
            ms = top - cs
            (tc, tc_alone), (tm, tm_alone) = placed_corun(timer, schedule, layout,
                                                          [(compute, 0, cs), (memory, top - ms, ms)], sec)
            s = SplitRate(cs, ms, tc, tm)
            splits.append(s)
            alone.append({"tc_alone_us": tc_alone, "tm_alone_us": tm_alone})
            a, b = c_us / s.tc_us, m_us / s.tm_us
            log(f"  split {cs:3d}/{ms:3d}: C {s.tc_us:8.1f} us (alone there {tc_alone:8.1f}), "
                f"M {s.tm_us:8.1f} us (alone there {tm_alone:8.1f});  a {a:.3f} + b {b:.3f} = {a + b:.3f}")
        if other:  # the three splits of the most overlap (a + b) seed the three-way co-runs
            best = sorted(splits, key=lambda s: -(c_us / s.tc_us + m_us / s.tm_us))[:3]
            pairs, triples = _other_units(timer, schedule, layout, {"compute": compute, "memory": memory,
                                                                     "other": other}, best, sec, log)
    finally:
        layout.close()
    ceil = overlap_ceiling(c_us, m_us, o_us, seq_us, splits)
    log(f"best mix for one C + one M: {ceil.mix.time_us:.1f} us = "
        + " + ".join(f"{n} {u:.1f}" for n, u in ceil.mix.modes)
        + f"\nceiling over the sequential pair: {ceil.cm:.3f}x; with the other ops "
          f"serial {ceil.other_serial:.3f}x, free {ceil.other_free:.3f}x")
    third: dict[str, Any] = {}
    if other:
        oc = other_ceiling(c_us, m_us, o_us, seq_layer_us, splits, pairs, triples)
        third = {"other_unit_ceiling": oc.to_dict()}
        log(f"with the other ops as a third unit: {oc.mix.time_us:.1f} us = "
            + " + ".join(f"{n} {u:.1f}" for n, u in oc.mix.modes)
            + f"\nceiling over the sequential layer (C, M, O alternating): {oc.layer:.3f}x")
    meta = schedule.metadata
    return {"date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "schedule": cfg.schedule,
            "model": meta.model, "workload": meta.workload, "batch": asdict(meta.batch), "seconds": sec,
            "compute_unit": compute, "memory_unit": memory, "other_unit": other,
            **ceil.to_dict(), "alone": alone, **third}


def placed_corun(timer: Any, schedule: Schedule, layout: Any, sides: list[tuple[Unit, int, int]],
                 sec: float) -> list[tuple[float, float]]:
    """(us per launch co-running, us per launch alone there) of each (ops, first SM slot, SMs) side:
    each looped on its own placed partition (its launcher made right before its capture: a launcher
    binds its op's batch), timed alone, then all side by side after a warm-up co-run to the
    power-capped steady state, as the profiler's interference co-runs do."""
    import torch

    from nfsearch.profiler.corun import corun_many_us, looped, solo_us

    streams = [layout.stream(first, n) for _, first, n in sides]
    graphs = [looped(timer, st, unit_launcher(timer, schedule, ops))
              for (ops, _, _), st in zip(sides, streams, strict=True)]  # (graph, launches per replay)
    runs = [(g, st, solo_us(g, st, sec / 2)) for (g, _), st in zip(graphs, streams, strict=True)]
    corun_many_us(runs, sec)
    co = corun_many_us(runs, sec)
    out = [(c / k, alone / k) for c, (_, k), (_, _, alone) in zip(co, graphs, runs, strict=True)]
    del graphs, runs
    torch.cuda.synchronize()
    return out


def _other_units(timer: Any, schedule: Schedule, layout: Any, ops: dict[str, Unit],
                 best_splits: list[SplitRate], sec: float,
                 log: Callable[[str], None]) -> tuple[list[PairRate], list[TripleRate]]:
    """The other ops beside the rest (`placed_corun`): compute|other and memory|other with the other
    ops on the top o SMs (o = the grid's sizes up to half the placed SMs), the partner on the rest;
    then three-way from each of `best_splits`, o = 8 and 16 SMs taken from the compute side and
    from the memory side: compute at the bottom, the other ops next, memory at the top."""
    top = layout.aligned

    def corun(placed: list[tuple[str, int, int]]) -> list[float]:
        return [co for co, _ in placed_corun(timer, schedule, layout,
                                             [(ops[u], first, n) for u, first, n in placed], sec)]

    pairs: list[PairRate] = []
    for partner in ("compute", "memory"):
        for o in [s for s in timer.grid.sms if s <= top // 2]:
            b_us, t_us = corun([(partner, 0, top - o), ("other", top - o, o)])
            pairs.append(PairRate(partner, "other", top - o, o, b_us, t_us))
            log(f"  {partner}|other {top - o:3d}/{o:3d}: {partner} {b_us:8.1f} us, other {t_us:8.1f} us")
    triples: list[TripleRate] = []
    for s in best_splits:
        for o in (8, 16):
            for c, m in ((s.compute_sms - o, s.memory_sms), (s.compute_sms, s.memory_sms - o)):
                if c < 8 or m < 8:
                    continue
                tc, to, tm = corun([("compute", 0, c), ("other", c, o), ("memory", top - m, m)])
                triples.append(TripleRate(c, o, m, tc, to, tm))
                log(f"  3-way {c:3d}/{o:3d}/{m:3d}: compute {tc:8.1f} us, other {to:8.1f} us, "
                    f"memory {tm:8.1f} us")
    return pairs, triples


def _measure_tp(cfg: CeilingConfig, schedule: Schedule, argv: list[str] | None,
                log: Callable[[str], None]) -> dict[str, Any] | int:
    """Under tp > 1: outside torchrun, run this command as tp processes and return their exit code
    (`nfsearch.launch.relaunch`, as `nfsearch profile --tp N`); inside, measure in lockstep with
    the other ranks (nfsearch/ceiling_tp.py) and return the record on rank 0, 0 on the others."""
    from nfsearch.models import check_tp

    tp = schedule.metadata.tp
    tp_units(schedule)  # a bad batch fails here, before starting tp processes
    check_tp(schedule.metadata.model_config, tp)
    require_cuda("ceiling")
    from nfsearch.launch import relaunch

    code = relaunch(tp, argv)
    if code is not None:
        return code
    from nfrt.tp import TPGroup

    from nfsearch.ceiling_tp import measure_tp

    group = TPGroup.from_env("cuda")  # sets this rank's device (LOCAL_RANK)
    try:
        rec = measure_tp(cfg, schedule, group, log)
    finally:
        group.close()
    return 0 if rec is None else rec


def record_path(out_dir: str, rec: dict[str, Any]) -> Path:
    """<out>/ceiling-<model>-<gpu slug, else name>[-tp<N>]-<workload>-<UTC date and time>.json"""
    from nfsearch.gpus import gpu_slug_for_device_name

    gpu = gpu_slug_for_device_name(rec["gpu"]) or rec["gpu"]
    gpu += f"-tp{rec['tp']}" if rec.get("tp", 1) > 1 else ""
    return stamped_path(out_dir, ("ceiling", rec["model"], gpu, rec["workload"]), rec["date"])


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = CeilingConfig(schedule="")
    p = sub.add_parser("ceiling", help="measure how much overlapping a schedule's compute and memory "
                                       "work (and, under TP, its all-reduces) can gain on this GPU, at most")
    p.add_argument("--schedule", required=True,
                   help="a schedule YAML file (its batch is measured; tp N > 1: N processes, one per GPU)")
    p.add_argument("--seconds", type=float, default=d.seconds,
                   help="length of each sustained co-run (default: %(default)s)")
    p.add_argument("--out", default=d.out, help="folder of the JSON record (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the record)")
    p.set_defaults(func=run_ceiling)


def run_ceiling(args: argparse.Namespace) -> int:
    cfg = CeilingConfig(schedule=args.schedule, seconds=args.seconds, out=args.out)
    log = ((lambda s: print(s, file=sys.stderr, flush=True)) if args.json
           else (lambda s: print(s, flush=True)))
    schedule = load_schedule(cfg.schedule)
    if schedule.metadata.tp > 1:
        rec = _measure_tp(cfg, schedule, getattr(args, "argv", None), log)
        if isinstance(rec, int):  # the relaunching process's exit code, or a rank other than 0
            return rec
    else:
        rec = measure(cfg, log=log)
    path = write_record(rec, record_path(cfg.out, rec), "ceiling")
    if args.json:
        print(json.dumps(rec, indent=2))
    else:
        print(f"record: {path}")
    return 0
