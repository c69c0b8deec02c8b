"""How far a profile point timed in a burst is from the same op run back to back (power limit).

The profiler times each point as a CUDA graph of N launches (~0.5 ms), one warm-up replay and 7
timed replays: a few ms of load, mostly at boost clock. A schedule replays for tens of ms at the
power limit. For each (model, op, tokens, SMs) below this prints: the profile's stored latency, the
profiler's own burst timing now (`GpuTimer._time_point`, after a 0.5 s pause), and the same graph
replayed back to back for `--ms` ms, the median per-launch time in windows of elapsed time (so the
settling time constant shows), plus the SM clock after the burst and after the sustained run.

Second part: the MoE expert GEMMs over tokens every 64 from 896 to 2048 on all SMs (profile value,
burst, sustained), to see the grouped GEMM's tile steps the profile's 1024/1536/2048 grid misses.

    python benchmarks/probes/sustained_points.py [--ms 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from nfrt.partition import make_partitions

from nfsearch.models import resolve_model
from nfsearch.profile import load_profile
from nfsearch.profiler.grid import full_grid
from nfsearch.profiler.measure import GpuTimer

WINDOWS_MS = ((0, 5), (5, 20), (20, 50), (50, 100), (100, 200), (200, 1e9))


def sustained(timer: GpuTimer, stream, g, n: int, ms: float) -> tuple[list[float], float]:
    """Per-launch us in each window of elapsed time, over `ms` of back-to-back replays; clock after."""
    one = statistics.median(timer._replays_us(g, stream, 3))
    k = max(10, int(ms * 1e3 / one))
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(k + 1)]
    with torch.cuda.stream(stream):
        ev[0].record(stream)
        for i in range(k):
            g.replay()
            ev[i + 1].record(stream)
    stream.synchronize()
    mhz = timer.clock.mhz(stream)
    t = [ev[0].elapsed_time(e) for e in ev]
    out = []
    for lo, hi in WINDOWS_MS:
        d = [(t[i + 1] - t[i]) * 1e3 / n for i in range(k) if lo <= t[i] < hi]
        out.append(statistics.median(d) if d else float("nan"))
    return out, mhz


def point(timer: GpuTimer, prof, op: str, tokens: int, ctx: int, sms: int, ms: float) -> str:
    parts = make_partitions([sms]) if sms < timer.grid.num_sms else None
    stream = parts[0].stream if parts is not None else torch.cuda.Stream(timer.dev)
    try:
        time.sleep(0.5)
        burst, burst_mhz = timer._time_point(stream, op, tokens, ctx, sms)
        n = timer._launches(burst)
        g = timer._capture(stream, timer._launcher(op, tokens, ctx), n)
        win, mhz = sustained(timer, stream, g, n, ms)
        del g
    finally:
        torch.cuda.synchronize()
        if parts is not None:
            parts.close()
    try:
        stored = prof.latency_us(op, tokens, ctx, sms)
    except Exception:  # noqa: BLE001 -- a point outside the profile's grid
        stored = float("nan")
    ws = " ".join(f"{w:8.1f}" for w in win)
    return (f"{op:15s} {tokens:5d} {ctx:5d} {sms:4d} | profile {stored:8.1f} | burst {burst:8.1f} "
            f"@{burst_mhz:5.0f} | sustained {ws} @{mhz:5.0f} | last/burst {win[-1] / burst:5.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=float, default=300.0)
    args = ap.parse_args()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    gpu = "h200" if "H200" in torch.cuda.get_device_name(0) else "h100-sxm"
    print(torch.cuda.get_device_name(0), "windows (ms):", WINDOWS_MS)
    for model, pts in (
        ("llama3-8b", [("qkv_proj", 2048, 0, num_sms), ("gate_up", 2048, 0, num_sms),
                       ("gate_up", 1024, 0, num_sms), ("gate_up", 1024, 0, 104),
                       ("gate_up", 1024, 0, 64), ("down", 1024, 0, 96),
                       ("o_proj", 512, 0, num_sms), ("attn_decode", 256, 1024, 32),
                       ("attn_decode", 512, 1024, num_sms), ("attn_prefill", 1024, 1024, num_sms)]),
        ("mixtral-8x7b", [("expert_gate_up", 2048, 0, num_sms), ("expert_down", 2048, 0, num_sms),
                          ("expert_gate_up", 1024, 0, 96), ("qkv_proj", 2048, 0, num_sms)]),
    ):
        cfg = resolve_model(model)
        timer = GpuTimer(cfg, 1, full_grid(num_sms))
        prof = load_profile(f"profiles/{gpu}/{model}-tp1.json")
        # the router fills topk_ids (near-uniform routing) before the expert ops, as in the profiler
        if cfg.is_moe:
            timer._launcher("router", 4096, 0)(0)
        print(f"== {model}: op tokens ctx sms | profile | burst @MHz | sustained per window @MHz")
        for op, t, c, s in pts:
            print(point(timer, prof, op, t, c, s, args.ms), flush=True)
        if cfg.is_moe:
            print(f"== {model} MoE sweep on {num_sms} SMs")
            for t in range(896, 2049, 64):
                for op in ("expert_gate_up", "expert_down"):
                    print(point(timer, prof, op, t, 0, num_sms, 100.0), flush=True)
        del timer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
