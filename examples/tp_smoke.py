"""Smoke run of a tensor-parallel schedule: load it on N GPUs, check that the nano-batched forward
equals its sequential twin, capture both as CUDA graphs and time interleaved replays.

    torchrun --nproc-per-node 4 examples/tp_smoke.py schedules/llama3-70b-h200-tp4-splitwise-overlap.yaml

(`nfsearch bench --schedule S` does this with the bound and a JSON record; this script is the
smallest program that loads a TP schedule into the runtime.) Random weights; rank 0 prints.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from nfrt.engine import Engine
from nfrt.schedule import load_schedule
from nfrt.tp import apply_no_multicast


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("schedule")
    p.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    apply_no_multicast()
    schedule = load_schedule(a.schedule)
    if a.layers:
        from nfsearch.bench import truncate

        schedule = truncate(schedule, a.layers)
    eng = Engine.from_schedule(schedule, device="cuda")
    tp = eng.model.tp
    twin = eng.sequential_twin()
    batch = eng.synthetic_batch(seed=1)
    nano, seq = eng.run(batch), twin.run(batch)
    err = ((nano - seq).abs().max() / seq.abs().max()).item()
    eng.prepare(batch)
    eng.capture()
    twin.prepare(batch)
    twin.capture()
    times: dict[str, list[float]] = {"nano": [], "sequential": []}
    for i in range(a.iters + 2):
        for name, e in (("nano", eng), ("sequential", twin)):
            tp.barrier()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            e.replay()
            end.record()
            end.synchronize()
            if i >= 2:
                times[name].append(start.elapsed_time(end))
    if tp.rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        tokens = schedule.metadata.dense_batch
        meta = schedule.metadata
        print(f"{meta.model} tp {tp.size}, {meta.num_layers} layers: nano vs sequential rel err {err:.2e}")
        for k, v in med.items():
            print(f"  {k:10s} {v:8.2f} ms  {tokens / v * 1e3 / tp.size:10.0f} tokens/s/GPU")
        print(f"  speedup {med['sequential'] / med['nano']:.3f}x")
    tp.barrier()
    eng.close()
    twin.close()
    tp.close()


if __name__ == "__main__":
    main()
