"""Human-readable views of a schedule: a summary table and a Gantt chart of one layer period."""

from __future__ import annotations

from pathlib import Path

from nfrt.atomic import atomic_write
from nfrt.schedule import Schedule

from nfsearch.errors import NfsearchError

KIND_COLOURS = {"compute": "#4C72B0", "memory": "#DD8452", "network": "#55A868", "other": "#8C8C8C"}


def summary(schedule: Schedule) -> str:
    m = schedule.metadata
    b = m.batch
    lines = [
        f"model {m.model}  gpu {m.gpu} ({m.num_sms} SMs)  tp {m.tp}  workload {m.workload}",
        f"dense batch {m.dense_batch}: {b.decode_tokens} decode tokens (mean context {b.decode_context}), "
        f"{b.prefill_tokens} prefill tokens (mean prompt {b.prefill_context})",
        f"profile {m.profile.source} ({m.profile.hash[:12]})  solver {m.solver.name} {m.solver.policy} "
        f"{m.solver.status}" + (f" gap {m.solver.gap:.3f}" if m.solver.gap is not None else "")
        + (f" in {m.solver.solve_time_s:.1f} s" if m.solver.solve_time_s is not None else "")
        + ("  (with the K = 2 structure family)" if m.solver.structure_family else ""),
        "nano-batches: " + ", ".join(f"{nb.name}[{nb.start},{nb.end})" for nb in schedule.nano_batches),
        "",
        f"{'stream':<9} {'SMs':>4}  nano-ops (issue order)",
    ]
    sizes = {p.name: p.num_sms for p in schedule.partitions}
    for st in schedule.streams:
        ops = " ".join(f"{n.name}[{n.tokens[0]},{n.tokens[1]})" for n in st.nano_ops)
        lines.append(f"{st.name:<9} {sizes[st.partition]:>4}  {ops}")
    p = schedule.prediction
    if p is not None:
        lines += [
            "",
            f"predicted: layer period {p.period_us:.1f} us, iteration {p.iteration_us / 1e3:.2f} ms, "
            f"{p.tokens_per_s_per_gpu:,.0f} tokens/s/GPU = {100 * p.fraction_of_bound:.1f}% of the bound "
            f"({p.optimal_tokens_per_s_per_gpu:,.0f})",
        ]
        if p.speedup_vs_sequential is not None:
            lines.append(f"predicted speedup over sequential: {p.speedup_vs_sequential:.3f}x")
    return "\n".join(lines)


def _kind_of(schedule: Schedule, nano_op_name: str) -> str:
    layer_kind = {op.name: op.kind for op in schedule.layer}
    kinds = [layer_kind[o] for o in schedule.nano_op(nano_op_name).ops]
    for k in ("compute", "network", "memory"):
        if k in kinds:
            return k
    return "other"


def gantt(schedule: Schedule, path: str | Path) -> Path:
    """Draw one layer period as a PNG: a row per stream, nano-ops coloured by kind, SMs labelled."""
    if schedule.prediction is None or not schedule.prediction.timeline:
        raise NfsearchError("schedule has no predicted timeline to draw (hand-written or sequential)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise NfsearchError("--gantt needs matplotlib: pip install 'nfsearch[plot]'") from None
    streams = [s.name for s in schedule.streams]
    sms = {s.name: next(p.num_sms for p in schedule.partitions if p.name == s.partition)
           for s in schedule.streams}
    period = schedule.prediction.period_us
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.8 * len(streams)))
    for e in schedule.prediction.timeline:
        y = streams.index(e.stream)
        kind = _kind_of(schedule, e.nano_op)
        ax.barh(y, e.end_us - e.start_us, left=e.start_us, height=0.6, color=KIND_COLOURS[kind],
                edgecolor="black", linewidth=0.5)
        if e.end_us - e.start_us > 0.03 * period:
            ax.text((e.start_us + e.end_us) / 2, y, e.nano_op, ha="center", va="center", fontsize=7,
                    color="white")
    t0 = min(e.start_us for e in schedule.prediction.timeline)
    ax.axvline(t0 + period, color="red", linestyle="--", linewidth=1)
    ax.text(t0 + period, len(streams) - 0.5, " next layer starts", color="red", fontsize=8, va="top")
    ax.set_yticks(range(len(streams)), [f"{s} ({sms[s]} SMs)" for s in streams])
    ax.invert_yaxis()
    ax.set_xlabel("time within one layer (us)")
    m = schedule.metadata
    ax.set_title(f"{m.model} on {m.gpu}, {m.workload}, dense batch {m.dense_batch}: "
                 f"period {period:.1f} us")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in KIND_COLOURS.items() if k != "other"],
              loc="lower right", fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
