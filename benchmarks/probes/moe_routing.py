"""Why the mixtral rows run 15-25% over the profile: the routing the engine's random-weight model
produces vs the uniform routing the profiler times the expert GEMMs with.

Runs the schedule's synthetic batch eagerly through the engine (random weights, seed 0), records
every layer's expert histogram (share of token-expert pairs of the busiest expert, and of the
busiest two), then times the last layer's expert_gate_up and expert_down (CUDA graph of 10
launches, median of 10 replays: about 0.1 s back to back, at the power limit) with (a) the engine's
routing, (b) uniform random top-2 routing, (c) every token on experts 0 and 1, and prints the
profile's latency beside them. Last, with the engine's routing, the way the profiler times a point
that long: a graph of one launch, a warm-up replay, the median of 7 replays, after a 1 s pause
(the GPU at boost clock).

    python benchmarks/probes/moe_routing.py schedules/mixtral-8x7b-h200-tp1-splitwise.yaml
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from nfrt.engine import Engine
from nfrt.schedule import load_schedule

from nfsearch.profile import load_profile


def timed(fn, reps: int = 10, launches: int = 10) -> float:
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for _ in range(launches):
                fn()
        g.replay()
    s.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(s):
            a.record()
            g.replay()
            b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / launches)  # us per launch
    return statistics.median(out)


def main(path: str) -> None:
    sched = load_schedule(path)
    eng = Engine.from_schedule(sched)
    m, cfg = eng.model, eng.model.config
    batch = eng.synthetic_batch()
    n = sched.metadata.batch.dense_batch
    shares: list[tuple[float, float]] = []
    router = m._ops["router"]

    def recording(layer: int, s: int, e: int) -> None:
        router(layer, s, e)
        c = torch.bincount(m.topk_ids[s:e].reshape(-1).long(), minlength=cfg.num_experts).float()
        top = torch.sort(c, descending=True).values / c.sum()
        shares.append((float(top[0]), float(top[:2].sum())))

    m._ops["router"] = recording
    eng.run(batch)
    m._ops["router"] = router
    print(f"{torch.cuda.get_device_name(0)}; {sched.metadata.model} tp {sched.metadata.tp}, {n} tokens, "
          f"{cfg.num_experts} experts, top {cfg.top_k} (uniform: busiest share {1 / cfg.num_experts:.3f})")
    for i in range(0, len(shares), max(1, len(shares) // 8)):
        print(f"  router call {i:3d}: busiest expert {shares[i][0]:.3f}, busiest two {shares[i][1]:.3f}")
    print(f"  mean over {len(shares)} calls: busiest {statistics.mean(x for x, _ in shares):.3f}, "
          f"busiest two {statistics.mean(y for _, y in shares):.3f}")
    layer = cfg.num_layers - 1
    engine_ids = m.topk_ids[:n].clone()
    uniform = torch.stack([torch.randperm(cfg.num_experts, device=m.topk_ids.device)[:cfg.top_k]
                           for _ in range(n)]).to(m.topk_ids.dtype)
    two = torch.tensor([0, 1], device=uniform.device, dtype=uniform.dtype).expand(n, cfg.top_k).contiguous()
    prof = load_profile(f"profiles/{sched.metadata.gpu}/{sched.metadata.model}-tp{sched.metadata.tp}.json")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for op in ("expert_gate_up", "expert_down"):
        row = [f"{op:15s} profile {prof.latency_us(op, n, 0, num_sms):7.1f} us"]
        for label, ids in (("engine", engine_ids), ("uniform", uniform), ("experts 0,1", two)):
            m.topk_ids[:n].copy_(ids)
            row.append(f"{label} {timed(lambda op=op: m.run_op(layer, op, 0, n)):7.1f}")
        m.topk_ids[:n].copy_(engine_ids)
        time.sleep(1.0)
        short = timed(lambda op=op: m.run_op(layer, op, 0, n), reps=7, launches=1)
        row.append(f"profiler-style {short:7.1f}")
        print("  ".join(row))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "schedules/mixtral-8x7b-h200-tp1-splitwise.yaml")
