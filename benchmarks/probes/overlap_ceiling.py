"""The 16:3x-16:4x UTC measurements of 2026-11-21 ran as this probe; it now lives in the package as
`nfsearch ceiling` (nfsearch/ceiling_measure.py: the same measurement; nfsearch/ceiling.py: the
linear program). Kept so that the device scripts of that session (benchmarks/h100_s6b.sh,
h200_s6c.sh, h200_s6e.sh) still run as written:

    python benchmarks/probes/overlap_ceiling.py --schedule schedules/llama3-8b-h100-sxm-tp1-splitwise.yaml \\
        --json ceiling.json

prints the same table and writes the record to `--json` (the CLI writes it under `--out`).
"""

from __future__ import annotations

import argparse
import json

from nfrt.atomic import atomic_write_text

from nfsearch.ceiling_measure import CeilingConfig, measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schedule", required=True)
    ap.add_argument("--seconds", type=float, default=CeilingConfig(schedule="").seconds)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rec = measure(CeilingConfig(schedule=args.schedule, seconds=args.seconds))
    print("CEILING " + json.dumps(rec), flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
