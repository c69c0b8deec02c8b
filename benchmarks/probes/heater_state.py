"""What each heater of the sustained table draws, and whether the layer heater's data degenerates.

For MODEL (TP 1) on this GPU, three heaters replayed back to back for 3 s each, on all SMs:
(a) two bf16 8192^3 GEMMs; (b) the model's layer on the splitwise batch run on the timer's own
activations, each replay reading what the last one wrote (the first layer heater, session 12);
(c) the layer as `nfsearch.profiler.held.heater` runs it now: on a model copy, each replay from the
same random hidden and residual. While each runs: the median board power and SM clock from
nvidia-smi, sampled every 0.2 s from 1 s in; after it: the median replay time of 10 more, and the
state the layer left (for b and c): the mean |cosine| between 256 tokens' normed rows, and for an
MoE model the busiest expert's share of the token-expert pairs (uniform: 1 / num_experts).

    python benchmarks/probes/heater_state.py mixtral-8x7b
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace

import torch

from nfsearch.gpus import resolve_gpu
from nfsearch.models import resolve_model
from nfsearch.profiler import held
from nfsearch.profiler.grid import full_grid, heat_points, with_heat
from nfsearch.profiler.measure import GpuTimer


def state(m, tokens: int) -> str:
    x = m.normed[:tokens].float()
    x = x[:256] / x[:256].norm(dim=1, keepdim=True)
    out = f"normed mean |cos| {float((x @ x.T).abs().mean()):.3f}"
    if m.config.is_moe:
        ids = m.topk_ids[:tokens].reshape(-1).long()
        share = float(torch.bincount(ids, minlength=m.config.num_experts).max()) / ids.numel()
        out += f", busiest expert {share:.3f} of pairs (uniform {1 / m.config.num_experts:.3f})"
    return out


def smi(index: int) -> tuple[float, float]:
    """(board power W, SM clock MHz) now, from nvidia-smi."""
    out = subprocess.run(["nvidia-smi", "-i", str(index), "--query-gpu=power.draw,clocks.sm",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True, check=False)
    watts, mhz = out.stdout.strip().split(", ")
    return float(watts), float(mhz)


def measure(name: str, g, stream, seconds: float = 3.0) -> None:
    """Replay `g` back to back for `seconds`, sampling power and clock from a thread every 0.2 s
    (the host blocks in the replay loop once the launch queue is full); report the medians of the
    samples after the first second, and the median of 10 replays timed after."""
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    with torch.cuda.stream(stream):
        ev[0].record(stream)
        g.replay()
        ev[1].record(stream)
    stream.synchronize()
    n = max(1, int(seconds * 1e3 / ev[0].elapsed_time(ev[1])))
    samples: list[tuple[float, float, float]] = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not done.is_set():
            samples.append((time.perf_counter() - t0, *smi(stream.device.index or 0)))
            time.sleep(0.2)
    th = threading.Thread(target=sample)
    th.start()
    with torch.cuda.stream(stream):
        for _ in range(n):
            g.replay()
    stream.synchronize()
    done.set()
    th.join()
    late = [x for x in samples if 1.0 <= x[0] <= seconds - 0.2] or samples
    watts = statistics.median(x[1] for x in late)
    mhz = statistics.median(x[2] for x in late)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(11)]
    with torch.cuda.stream(stream):
        for i in range(10):
            ev[i].record(stream)
            g.replay()
        ev[10].record(stream)
    stream.synchronize()
    us = statistics.median(ev[i].elapsed_time(ev[i + 1]) * 1e3 for i in range(10))
    print(f"{name}: median {watts:.0f} W, SM clock {mhz:.0f} MHz over {len(late)} samples while replayed "
          f"({n} replays); replay {us:.0f} us after", flush=True)


def main() -> None:
    model = resolve_model(sys.argv[1] if len(sys.argv) > 1 else "mixtral-8x7b")
    props = torch.cuda.get_device_properties(0)
    gpu = resolve_gpu("h200" if "H200" in props.name else "h100-sxm")
    base = full_grid(props.multi_processor_count, 8, 8, gpu.placeable_sms)
    grid = with_heat(base, model, 1, "splitwise", gpu)
    timer = GpuTimer(model, 1, grid)
    points = heat_points(model, 1, grid)
    tokens = grid.heat_batch[0] + grid.heat_batch[2]
    print(f"{model.name} on {props.name}: heat batch {grid.heat_batch}, {len(points)} layer ops", flush=True)

    timer.grid = replace(grid, heat="", heat_batch=())
    g, hs, keep = held.heater(timer)
    measure("(a) two 8192^3 GEMMs", g, hs)
    del g, keep
    timer.grid = grid

    m, hs = timer.m, torch.cuda.Stream(timer.dev)  # (b): the timer's own activations, fed back
    runs = [(timer.batch_of(op, c), op, t) for op, t, c in points]
    for buf, _, _ in runs:
        m.bind(buf)

    def fed_back(i: int) -> None:
        for buf, op, t in runs:
            m.batch = buf
            m.run_op(0, op, 0, t)
    g = timer._capture(hs, fed_back, 1, shared_pool=False)
    print(f"(b) before: {state(m, tokens)}")
    measure("(b) layer, fed back", g, hs)
    print(f"(b) after: {state(m, tokens)}", flush=True)
    del g
    timer._bound = None

    g, hs, keep = held.heater(timer)
    measure("(c) layer, fresh each replay", g, hs)
    print(f"(c) after: {state(keep[0], tokens)}", flush=True)


if __name__ == "__main__":
    main()
