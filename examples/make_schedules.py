"""Re-make the shipped schedules: every built-in model on h100-sxm and h200, splitwise workload.

    python examples/make_schedules.py [--check]

--check solves again and compares with the files in schedules/ byte for byte, ignoring only the
solve time in the metadata; exits 1 on a difference. Also writes benchmarks/solve_times.md.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from nfrt.schedule import dumps, save_schedule

from nfsearch.models import builtin_models
from nfsearch.plan import REPO_ROOT, SolveConfig, default_output, plan

GPUS = ("h100-sxm", "h200")
WORKLOAD = "splitwise"
_SOLVE_TIME = re.compile(r"^(\s*solve_time_s:).*$", re.MULTILINE)


def normalised(text: str) -> str:
    """The schedule text without the one wall-clock field."""
    return _SOLVE_TIME.sub(r"\1 <ignored>", text)


def configs() -> list[SolveConfig]:
    return [SolveConfig(model=m.name, gpu=g, workload=WORKLOAD) for g in GPUS for m in builtin_models()
            if not m.name.startswith("tiny")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    rows, bad = [], 0
    for cfg in configs():
        r = plan(cfg)
        path = default_output(cfg, r.schedule.metadata.model_config, r.gpu)
        rows.append((cfg.model, cfg.gpu, r.solution.solve_time_s, r.solution.status))
        if args.check:
            same = path.exists() and normalised(path.read_text()) == normalised(dumps(r.schedule))
            print(f"{'same' if same else 'DIFFERENT':<9} {path.relative_to(REPO_ROOT)}")
            bad += not same
        else:
            save_schedule(r.schedule, path)
            print(f"wrote {path.relative_to(REPO_ROOT)}  "
                  f"({r.solution.solve_time_s:.1f} s, {r.solution.status})")
    if not args.check:
        out = Path(REPO_ROOT / "benchmarks" / "solve_times.md")
        lines = ["# Solve times of the shipped schedules", "",
                 "`python examples/make_schedules.py` on the development machine (2 CPU cores).", "",
                 "| model | gpu | solve s | status |", "|---|---|---|---|"]
        lines += [f"| {m} | {g} | {t:.1f} | {s} |" for m, g, t, s in rows]
        out.write_text("\n".join(lines) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
