"""Plan every built-in model for one GPU and print one comparison table.

    python examples/plan_all.py --gpu h200 [--workload splitwise] [--tp 1]

Uses the shipped profile for the GPU when there is one, else the analytic roofline profile.
"""

from __future__ import annotations

import argparse

from nfsearch.gpus import resolve_gpu
from nfsearch.models import builtin_models
from nfsearch.plan import SolveConfig, plan
from nfsearch.workload import parse_workload, smallest_tp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--workload", default=SolveConfig.workload)
    ap.add_argument("--tp", type=int, default=None,
                    help="tensor-parallel degree (default: the least at which each model fits)")
    ap.add_argument("--include-tiny", action="store_true")
    args = ap.parse_args()
    print(f"{'model':<14} {'tp':>2} {'profile':<9} {'K':>2} {'splits':<34} {'SMs (stream)':<28} "
          f"{'speedup':>7} {'bound %':>7} {'tok/s/GPU':>10} {'solve s':>7}")
    for model in builtin_models():
        if model.name.startswith("tiny") and not args.include_tiny:
            continue
        tp = args.tp or smallest_tp(model, parse_workload(args.workload), resolve_gpu(args.gpu),
                                    round_to=SolveConfig.granularity_tokens)
        r = plan(SolveConfig(model=model.name, gpu=args.gpu, workload=args.workload, tp=tp))
        s, p = r.solution, r.schedule.prediction
        splits = ",".join(f"{k}:{v}" for k, v in s.splits.items())
        sms = ",".join(f"{k}:{v}" for k, v in s.partitions.items() if s.stream_order.get(k))
        print(f"{model.name:<14} {tp:>2} {r.profile.meta.source:<9} {s.num_nano_batches:>2} "
              f"{splits:<34} {sms:<28} "
              f"{p.speedup_vs_sequential:>7.3f} {100 * p.fraction_of_bound:>7.1f} "
              f"{p.tokens_per_s_per_gpu:>10,.0f} {s.solve_time_s:>7.1f}")


if __name__ == "__main__":
    main()
