"""Solve a TP schedule whose search is pushed into the all-gather form (an experiment, not a shipped
schedule): the profile's o_proj and attn_allreduce are charged `--factor` times their latency while
the search runs, so it puts every nano-batch it can into the gather form; the schedule's prediction
is therefore for those inflated costs. Used to measure the gather form end to end on the GPUs
(benchmarks/RESULTS.md, session 11).

    python benchmarks/probes/forced_gather.py --model llama3-70b --tp 4 --profile P -o OUT.yaml
"""

from __future__ import annotations

import argparse

from nfrt.schedule import save_schedule

from nfsearch.config import SolveConfig
from nfsearch.plan import plan
from nfsearch.profile import Profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--factor", type=float, default=3.0)
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    real = Profile.latency_us

    def inflated(self, op, *a, **kw):
        v = real(self, op, *a, **kw)
        return v * args.factor if op in ("o_proj", "attn_allreduce") else v

    Profile.latency_us = inflated  # only this process, only while it solves
    r = plan(SolveConfig(model=args.model, tp=args.tp, profile=args.profile, gather_form=True))
    s = r.schedule
    print(f"gather_tokens {s.metadata.gather_tokens} of {s.metadata.dense_batch}; {r.solution.message}")
    print(f"wrote {save_schedule(s, args.output)}")


if __name__ == "__main__":
    main()
