"""`nfsearch bench --timeline PNG`: where one layer's time goes inside the CUDA graph replay.

Traced twins of the benched engine (`Engine(..., trace=True)`: a `%globaltimer` stamp before and
after each nano-op, on its stream, captured with the graph) are replayed a few times; the per-slot
medians give each nano-op's measured start and end. The record holds, for one middle layer, every
nano-op's measured start/end/duration beside the predicted ones, per stream the busy time, the
idle gaps (waiting on an event, or not) and measured/predicted busy, and the mean layer period over
the middle layers. Variants: `nano` (the engine as benched), `nano_serialized` (the same streams
and partitions, every nano-op waiting for the one issued before it: solo on its partition, so
`nano` / `nano_serialized` per nano-op is the interference), `nano_green_full` (an all-SM
partition on a green context instead of an ordinary stream; only when the schedule has one beside
smaller ones), `sequential`. `stream_check` times the same GEMMs on an ordinary stream and on a
green context over all SMs, directly. Under tensor parallelism every rank replays the same traced
graphs (rank 0's stamps are the ones reported).

Imports torch only inside the measuring functions.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from nfrt.atomic import atomic_write
from nfrt.schedule import Schedule
from nfrt.trace import compare, layer_rows, stream_stats

from nfsearch.errors import NfsearchError

REPLAYS = 5
# Seconds of back-to-back (untraced-timing) replays per variant while nvidia-smi samples the SM
# clock: a power-capped GPU may clock the overlapped pipeline lower than the serialized or the
# sequential one, which no per-kernel profile sees. Skipped under TP (ranks would have to agree on
# the replay count).
SUSTAIN_S = 2.0


def _traced(engine, schedule: Schedule, use_partitions: bool, green_full: bool, batch,
            serialize: bool = False, sustain_s: float = 0.0) -> dict[str, Any]:
    import time

    import torch
    from nfrt.engine import Engine

    eng = Engine(schedule, engine.model, use_partitions=use_partitions, trace=True,
                 green_full_stream=green_full, serialize=serialize)
    try:
        eng.prepare(batch)
        eng.capture()
        eng.replay()
        stamps, times = [], []
        for _ in range(REPLAYS):
            eng.tracer.clear()
            if engine.model.tp is not None:  # under TP the ranks start each replay together
                engine.model.tp.barrier()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            eng.replay()
            e.record()
            stamps.append(eng.tracer.read())
            times.append(s.elapsed_time(e) * 1e3)
        med = [int(statistics.median(col)) for col in zip(*stamps, strict=True)]
        order = [(nop.name, schedule.streams[si].name, bool(eng.waits.get(nop.name)))
                 for si, nop in eng.order]
        out = {"stamps": med, "order": order, "num_layers": eng.config.num_layers,
               "iteration_us": statistics.median(times)}
        if sustain_s > 0 and engine.model.tp is None:
            events, t0 = [], time.time()
            while time.time() - t0 < sustain_s:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                eng.replay()
                e.record()
                events.append((s, e))
                if len(events) % 8 == 0:  # keep the host within a few replays of the device
                    e.synchronize()
            torch.cuda.synchronize()
            out["sustained"] = {"window": (t0, time.time()), "replays": len(events),
                                "iteration_us": statistics.median(a.elapsed_time(b) * 1e3 for a, b in events)}
        return out
    finally:
        eng.close()


def _stream_check(engine, tokens: int) -> dict[str, Any]:
    """GEMMs of `tokens` rows (qkv, gate_up, down shapes of layer 0) on an ordinary stream vs a green
    context over all SMs; median of 10 replays of a 10-launch graph each."""
    import torch
    from nfrt.partition import make_layout

    m = engine.model
    layout = make_layout(device=engine.device.index or 0)
    green = layout.stream(0, layout.total)
    plain = torch.cuda.Stream(engine.device)
    out: dict[str, Any] = {"tokens": tokens}
    try:
        for name, a_buf, w_key, o_buf in (("qkv_proj", m.normed, "qkv", m.qkv),
                                          ("gate_up", m.normed, "gate_up", getattr(m, "gate_up", None)),
                                          ("down", getattr(m, "act", None), "down", m.hidden)):
            if f"layers.0.{w_key}" not in m.w or a_buf is None or o_buf is None:
                continue  # a MoE model has no dense MLP weights
            w = m.w[f"layers.0.{w_key}"]
            a, o = a_buf[:tokens], o_buf[:tokens]
            res = {}
            for label, st in (("plain_us", plain), ("green_all_us", green)):
                with torch.cuda.stream(st):
                    torch.mm(a, w.t(), out=o)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, stream=st):
                        for _ in range(10):
                            torch.mm(a, w.t(), out=o)
                    g.replay()
                    times = []
                    for _ in range(10):
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record(st)
                        g.replay()
                        e.record(st)
                        times.append((s, e))
                st.synchronize()
                res[label] = statistics.median(s.elapsed_time(e) * 1e3 for s, e in times) / 10
                del g
            res["green_over_plain"] = res["green_all_us"] / res["plain_us"]
            out[name] = res
    finally:
        torch.cuda.synchronize()
        layout.close()
    return out


def measure_timeline(engine, use_partitions: bool, seed: int) -> dict[str, Any]:
    """Traced replays of the schedule (and variants) and the stream check; plain data."""
    from nfsearch.gpu_monitor import GpuMonitor

    s = engine.schedule
    batch = engine.synthetic_batch(seed=seed)
    out: dict[str, Any] = {"variants": {}}
    monitor = GpuMonitor(engine.device)
    try:
        v = out["variants"]
        v["nano"] = _traced(engine, s, use_partitions, False, batch, sustain_s=SUSTAIN_S)
        full = s.metadata.num_sms
        if use_partitions and any(p.num_sms == full for p in s.partitions) and any(
                p.num_sms != full for p in s.partitions):
            v["nano_green_full"] = _traced(engine, s, use_partitions, True, batch)
        if len(s.streams) > 1:  # every nano-op alone on its partition: solo times, no interference
            v["nano_serialized"] = _traced(engine, s, use_partitions, False, batch, serialize=True,
                                           sustain_s=SUSTAIN_S)
        v["sequential"] = _traced(engine, s.as_sequential(), False, False, batch, sustain_s=SUSTAIN_S)
    finally:
        windows = {name: d["sustained"]["window"] for name, d in out["variants"].items() if "sustained" in d}
        clocks = monitor.stop(windows)
    for name, d in out["variants"].items():
        if "sustained" in d and clocks:
            d["sustained"]["gpu"] = clocks[name]
    big = max((n for st in s.streams for n in st.nano_ops), key=lambda n: n.tokens[1] - n.tokens[0])
    out["stream_check"] = _stream_check(engine, big.tokens[1] - big.tokens[0])
    return out


def _period_us(v: dict[str, Any]) -> float | None:
    """Mean layer period: first nano-op start of layer L-2 minus that of layer 1, over L-3 layers."""
    n, L, st = len(v["order"]), v["num_layers"], v["stamps"]
    if L < 4:
        return None

    def first(layer: int) -> int:
        base = 2 + 2 * layer * n
        return min(st[base + 2 * i] for i in range(n))

    return (first(L - 2) - first(1)) / 1e3 / (L - 3)


def timeline_summary(schedule: Schedule, tl: dict[str, Any]) -> dict[str, Any]:
    """The record's `timeline`: per variant the middle layer's rows vs predicted, per stream stats."""
    pred = None
    if schedule.prediction is not None and schedule.prediction.timeline:
        pred = {e.nano_op: (e.start_us, e.end_us) for e in schedule.prediction.timeline}
    out: dict[str, Any] = {"stream_check": tl.get("stream_check"), "variants": {}}
    for name, v in tl["variants"].items():
        layer = v["num_layers"] // 2
        rows = layer_rows(v["stamps"], layer, v["order"], v["num_layers"])
        use_pred = pred if name != "sequential" else None
        stats = stream_stats(rows)
        if use_pred:
            for st in schedule.streams:
                if st.name in stats:
                    d = stats[st.name]
                    pb = sum(use_pred[n.name][1] - use_pred[n.name][0] for n in st.nano_ops
                             if n.name in use_pred)
                    d["predicted_busy_us"] = pb
                    d["busy_measured_over_predicted"] = d["busy_us"] / pb if pb else None
        span = max(r.end_us for r in rows)
        out["variants"][name] = {
            "layer": layer, "traced_iteration_us": v["iteration_us"], "layer_span_us": span,
            "layer_period_us": _period_us(v), "nano_ops": compare(rows, use_pred), "streams": stats}
        if "sustained" in v:  # the traced graph replayed back to back, with the GPU's clock meanwhile
            sus = v["sustained"]
            out["variants"][name]["sustained"] = {"seconds": sus["window"][1] - sus["window"][0],
                                                  "replays": sus["replays"],
                                                  "iteration_us": sus["iteration_us"], "gpu": sus.get("gpu")}
    if pred:
        out["predicted_period_us"] = schedule.prediction.period_us
        out["predicted_span_us"] = schedule.prediction.layer_span_us
    return out


def format_lines(tl: dict[str, Any]) -> list[str]:
    lines = []
    for name, v in tl["variants"].items():
        per = v["layer_period_us"]
        lines.append(f"timeline {name}: traced iteration {v['traced_iteration_us'] / 1e3:.3f} ms, layer "
                     f"{v['layer']} span {v['layer_span_us']:.0f} us"
                     + (f", mean period {per:.0f} us" if per else "")
                     + (f" (predicted {tl['predicted_period_us']:.0f})" if name != "sequential"
                        and tl.get("predicted_period_us") else ""))
        sus = v.get("sustained")
        if sus:
            g = sus.get("gpu") or {}
            lines.append(f"  sustained {sus['seconds']:.1f} s ({sus['replays']} replays): iteration "
                         f"{sus['iteration_us'] / 1e3:.3f} ms; GPU medians: "
                         + ", ".join(f"{k} {g.get(k)}" for k in ("sm_clock_mhz", "power_w", "samples")))
        for st, d in v["streams"].items():
            r = d.get("busy_measured_over_predicted")
            lines.append(f"  {st:<14} busy {d['busy_us']:7.0f} us"
                         + (f" / predicted {d['predicted_busy_us']:6.0f} = {r:.2f}" if r else "")
                         + f"; idle waiting on events {d['event_wait_gap_us']:5.0f} us, other gaps "
                           f"{d['other_gap_us']:5.0f} us")
    sc = tl.get("stream_check")
    if sc:
        lines.append(f"GEMMs of {sc['tokens']} tokens, ordinary stream vs green context over all SMs: "
                     + ", ".join(f"{k} {v['plain_us']:.0f} vs {v['green_all_us']:.0f} us"
                                 for k, v in sc.items() if isinstance(v, dict)))
    return lines


def draw_timeline(schedule: Schedule, record: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Predicted and measured Gantt charts of one layer, one panel each, on one time axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise NfsearchError("--timeline needs matplotlib: pip install 'nfsearch[plot]'") from None
    from nfsearch.show import KIND_COLOURS, _kind_of

    tl = record["timeline"]
    panels: list[tuple[str, list[dict[str, Any]], Schedule]] = []
    nano = tl["variants"]["nano"]["nano_ops"]
    if any("predicted_start_us" in r for r in nano):
        panels.append(("predicted (stage 2)", [dict(r, start_us=r["predicted_start_us"],
                                                    end_us=r["predicted_end_us"]) for r in nano], schedule))
    seq = schedule.as_sequential()
    for name, v in tl["variants"].items():
        panels.append((f"measured in graph: {name} (layer {v['layer']})", v["nano_ops"],
                       seq if name == "sequential" else schedule))
    xmax = max(r["end_us"] for _, rows, _ in panels for r in rows)
    heights = [max(1, len({r["stream"] for r in rows})) for _, rows, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 1.0 + 0.55 * sum(heights) + 0.5 * len(panels)),
                             gridspec_kw={"height_ratios": heights}, sharex=True)
    axes = axes if len(panels) > 1 else [axes]
    for ax, (title, rows, sch) in zip(axes, panels, strict=True):
        streams = [s.name for s in sch.streams if any(r["stream"] == s.name for r in rows)]
        for r in rows:
            y = streams.index(r["stream"])
            ax.barh(y, r["end_us"] - r["start_us"], left=r["start_us"], height=0.6,
                    color=KIND_COLOURS[_kind_of(sch, r["nano_op"])], edgecolor="black", linewidth=0.5)
            if r["end_us"] - r["start_us"] > 0.04 * xmax:
                ax.text((r["start_us"] + r["end_us"]) / 2, y, r["nano_op"], ha="center", va="center",
                        fontsize=7, color="white")
        ax.set_yticks(range(len(streams)), streams, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9, loc="left")
    axes[-1].set_xlabel("us from the layer's first nano-op start")
    axes[0].legend(handles=[Patch(color=c, label=k) for k, c in KIND_COLOURS.items()], loc="upper right",
                   fontsize=7)
    fig.suptitle(f"{record['model']}, {record['workload']}: one layer, predicted vs measured", fontsize=10)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
