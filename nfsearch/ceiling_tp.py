"""`nfsearch ceiling` under tensor parallelism: the overlap ceiling with the network as a third unit.

One process per GPU (`nfsearch.ceiling_measure` relaunches the command under torchrun, as
`nfsearch profile --tp N` does); every rank runs its shard of the layer through the profiler's
`GpuTimer`, in lockstep, and rank 0 logs and returns the record. Units of the schedule's batch
(`tp_units`): C = the compute ops, M = decode attention, N = the all-reduces (attn_allreduce,
mlp_allreduce) over the whole batch, other = the rest. Measured, sustained as at tp 1
(`nfsearch.profiler.corun`):

- C, M, N and the other ops, each looped in a CUDA graph and replayed alone on all SMs (N on the
  all-SM communicator, `use_comm(None)`);
- the sequential triple: the C, M and N graphs replayed alternately on one stream;
- pairs side by side on the placed layout (`nfrt.partition.make_layout`, `top` placed SMs):
  compute|memory on every split as at tp 1, compute|network and memory|network with the network on
  the top n SMs (n = the partition sizes NCCL can fill, <= 32 CTAs; its communicator capped at n,
  `use_comm(n)` before its graph is captured) and the partner on the other top - n;
- each pair side alone on its partition first (the co-run's solo): these are the rates of the
  optimistic three-way modes of `nfsearch.ceiling.network_ceiling`, over c + m + n = top.

Every count that decides how many collectives a rank issues (launches per graph, replays) goes
through `timer.agree` (the max over the ranks), so the ranks issue identical collective sequences;
every decision about what to measure depends only on the schedule and the GPU model, the same on
every rank. The times are rank 0's.
"""

from __future__ import annotations

import datetime as _dt
import gc
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from nfrt.schedule import Schedule

from nfsearch.ceiling import PairRate, UnitRate, network_ceiling
from nfsearch.ceiling_measure import CeilingConfig, Unit, tp_units, unit_launcher


def measure_tp(cfg: CeilingConfig, schedule: Schedule, group: Any,
               log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """This rank's part of the measurement; the record on rank 0, None on the others."""
    import torch
    from nfrt.partition import make_layout
    from nfrt.tp import MAX_NCCL_CTAS

    from nfsearch.profiler.corun import alternating_us, corun_us, looped, solo_us
    from nfsearch.profiler.grid import full_grid
    from nfsearch.profiler.measure import GpuTimer

    compute, memory, network, other = tp_units(schedule)
    meta = schedule.metadata
    leader = group.rank == 0
    say = log if leader else (lambda s: None)
    dev = group.device
    timer = GpuTimer(meta.model_config, meta.tp,
                     full_grid(torch.cuda.get_device_properties(dev).multi_processor_count), group=group)
    agree, sec = timer.agree, cfg.seconds
    ops_of = {"compute": compute, "memory": memory, "network": network}
    say(f"{meta.tp} x {torch.cuda.get_device_name(dev)}; {meta.model} tp {meta.tp} {meta.workload}: "
        f"{meta.batch}")
    say(f"compute unit {compute}\nmemory unit {memory}\nnetwork unit {network}\nother {other}")

    def alone(ops: Unit, stream: torch.cuda.Stream, seconds: float):
        """(graph, launches per replay, us per replay alone) of `ops` looped on `stream`."""
        g, n = looped(timer, stream, unit_launcher(timer, schedule, ops))
        return g, n, solo_us(g, stream, seconds, agree)

    full = torch.cuda.Stream(dev)
    timer.use_comm(None)  # the network unit on all SMs' communicator
    gc_, nc, c_rep = alone(compute, full, sec)
    gm, nm, m_rep = alone(memory, full, sec)
    gn, nn, n_rep = alone(network, full, sec)
    c_us, m_us, n_us = c_rep / nc, m_rep / nm, n_rep / nn
    o_us = 0.0
    if other:
        go, no, o_rep = alone(other, full, sec)
        o_us = o_rep / no
        del go
    # the sequential triple: C, M, N alternating on one stream (N synchronises the ranks: agreed count)
    triple_us = alternating_us([(gc_, c_rep), (gm, m_rep), (gn, n_rep)], full, sec, agree)
    seq_us = triple_us * (c_us + m_us + n_us) / (c_rep + m_rep + n_rep)  # per C + M + N
    del gc_, gm, gn
    torch.cuda.synchronize(dev)
    say(f"alone on all SMs (sustained): C {c_us:.1f} us, M {m_us:.1f} us, N {n_us:.1f} us, other "
        f"{o_us:.1f} us; C, M, N alternating: {seq_us:.1f} us per triple (C + M + N = "
        f"{c_us + m_us + n_us:.1f})")

    layout = make_layout(dev.index)
    top = layout.aligned
    net_sms = [s for s in timer.grid.sms if s <= MAX_NCCL_CTAS and top - s >= top // 3]
    plan = [("compute", "memory", cs, top - cs) for cs in timer.grid.sms if top // 3 <= cs <= top - 8]
    plan += [(b, "network", top - ns, ns) for b in ("compute", "memory") for ns in net_sms]
    alone_all = {"compute": c_us, "memory": m_us, "network": n_us}
    pairs: list[PairRate] = []
    solo: dict[tuple[str, int], float] = {}  # (unit, SMs) -> us alone on that partition (the fastest)
    try:
        for b_unit, t_unit, b_sms, t_sms in plan:
            bs, ts = layout.stream(0, b_sms), layout.stream(top - t_sms, t_sms)
            if t_unit == "network":  # NCCL's CTAs capped at the partition it runs on
                timer.use_comm(t_sms)
            gb, nb, b_solo = alone(ops_of[b_unit], bs, sec / 2)
            gt, nt, t_solo = alone(ops_of[t_unit], ts, sec / 2)
            corun_us(gb, bs, b_solo, gt, ts, t_solo, sec, agree)  # to the power-capped steady state
            b_co, t_co = corun_us(gb, bs, b_solo, gt, ts, t_solo, sec, agree)
            p = PairRate(b_unit, t_unit, b_sms, t_sms, b_co / nb, t_co / nt)
            pairs.append(p)
            for u, s, us in ((b_unit, b_sms, b_solo / nb), (t_unit, t_sms, t_solo / nt)):
                solo[u, s] = min(us, solo.get((u, s), us))
            fa, fb = alone_all[b_unit] / p.bottom_us, alone_all[t_unit] / p.top_us
            say(f"  {b_unit}|{t_unit} {b_sms:3d}/{t_sms:3d}: {b_unit} {p.bottom_us:8.1f} us (alone there "
                f"{b_solo / nb:8.1f}), {t_unit} {p.top_us:8.1f} us (alone there {t_solo / nt:8.1f});  "
                f"{fa:.3f} + {fb:.3f} = {fa + fb:.3f}")
            del gb, gt
            torch.cuda.synchronize(dev)
            gc.collect()
    finally:
        torch.cuda.synchronize(dev)
        layout.close()
        gc.collect()
        torch.cuda.empty_cache()
    rates = [UnitRate(u, s, us) for (u, s), us in sorted(solo.items())]
    ceil = network_ceiling(c_us, m_us, n_us, o_us, seq_us, pairs, rates, top)
    say(f"best mix for one C + M + N: {ceil.mix.time_us:.1f} us = "
        + " + ".join(f"{n} {u:.1f}" for n, u in ceil.mix.modes)
        + f"\n  (measured modes only: {ceil.pairs_mix.time_us:.1f} us = "
        + " + ".join(f"{n} {u:.1f}" for n, u in ceil.pairs_mix.modes) + ")"
        + f"\nceiling over the sequential triple: {ceil.units:.3f}x; with the other ops "
          f"serial {ceil.other_serial:.3f}x, free {ceil.other_free:.3f}x")
    if not leader:
        return None
    return {"date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "schedule": cfg.schedule,
            "model": meta.model, "workload": meta.workload, "tp": meta.tp, "batch": asdict(meta.batch),
            "seconds": sec, "compute_unit": compute, "memory_unit": memory, "network_unit": network,
            "other_unit": other, **ceil.to_dict()}
