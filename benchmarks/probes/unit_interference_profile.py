"""A profile whose interference table is replaced by the unit co-runs of one `nfsearch ceiling` run.

Experiment of 2026-11-21 (benchmarks/RESULTS.md, 16:4x UTC): the profile's interference comes
from per-GEMM co-runs at one point (1024 tokens beside 512 x 1024 decode), aggregated per kind;
`nfsearch ceiling` (then benchmarks/probes/overlap_ceiling.py) measures the whole compute unit
beside the whole memory unit at a workload's own batch. This writes a copy of `--profile` whose
slowdowns are those unit co-runs (compute at c SMs: tc / compute unit alone on c SMs; memory at m
SMs: tm / memory unit alone on m SMs; the ends of the SM grid copied from the nearest measured
split), for solving that workload with them.

    python benchmarks/probes/unit_interference_profile.py --profile profiles/h100-sxm/llama3-8b-tp1.json \\
        --ceiling-log benchmarks/runs/ceiling-llama3-8b-h100-sxm-splitwise-20261121T1635.txt -o /tmp/p.json
"""

from __future__ import annotations

import argparse
import re

import pandas as pd

from nfsearch.profile import Profile, load_profile, save_profile

ROW = re.compile(r"\s+split\s+(\d+)/\s*(\d+): C\s+([\d.]+) us \(alone there\s+([\d.]+)\), "
                 r"M\s+([\d.]+) us \(alone there\s+([\d.]+)\)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--ceiling-log", required=True, help="the table nfsearch ceiling printed")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    prof = load_profile(args.profile)
    rows = []
    with open(args.ceiling_log) as f:
        for line in f:
            m = ROW.match(line)
            if m:
                c, mem = int(m[1]), int(m[2])
                rows.append((c, mem, float(m[3]) / float(m[4]), float(m[5]) / float(m[6])))
    if not rows:
        raise SystemExit(f"{args.ceiling_log}: no split rows")
    rows.sort()
    table = [("compute", "memory", c, max(1.0, sc)) for c, _, sc, _ in rows]
    table += [("memory", "compute", mem, max(1.0, sm)) for _, mem, _, sm in rows]
    grid = prof.sm_grid()
    table += [("compute", "memory", grid[0], max(1.0, rows[0][2])),
              ("compute", "memory", grid[-1], max(1.0, rows[-1][2])),
              ("memory", "compute", grid[-1], max(1.0, rows[0][3]))]
    inter = pd.DataFrame(table, columns=["kind", "other_kind", "num_sms", "slowdown"])
    save_profile(Profile(prof.meta, prof.latency, inter), args.output)
    print(f"wrote {args.output}: {len(table)} interference rows from {args.ceiling_log}")


if __name__ == "__main__":
    main()
