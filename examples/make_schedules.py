"""Re-make the shipped schedules: every built-in model on h100-sxm and h200, splitwise workload,
at the least tensor-parallel degree whose weights fit (TP > 1 plans use the analytic profile where
no measured one is shipped), plus the issue-6 const row, the measured TP rows of issue 8 and
llama2-70b at TP 8 (issue 9, analytic profile); the rows in FAMILY with the K = 2 structure family.

    python examples/make_schedules.py [--check]

--check solves again and compares with the files in schedules/ byte for byte, ignoring only the
solve time in the metadata; exits 1 on a difference. Also writes benchmarks/solve_times.md.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path

from nfrt.atomic import atomic_write_text
from nfrt.schedule import dumps, save_schedule

from nfsearch import workload
from nfsearch.gpus import resolve_gpu
from nfsearch.models import builtin_models, resolve_model
from nfsearch.plan import REPO_ROOT, SolveConfig, default_output, plan
from nfsearch.workload import parse_workload

GPUS = ("h100-sxm", "h200")
WORKLOAD = "splitwise"
_SOLVE_TIME = re.compile(r"(solve_time_s:) *[-+0-9.eE]+")


def normalised(text: str) -> str:
    """The schedule text without the one wall-clock field."""
    return _SOLVE_TIME.sub(r"\1 <ignored>", text)


def smallest_tp(model: str, gpu: str, load: str = WORKLOAD) -> int:
    return workload.smallest_tp(resolve_model(model), parse_workload(load), resolve_gpu(gpu),
                                round_to=SolveConfig.granularity_tokens)


# the benchmark rows of issue 6 that are not splitwise
EXTRA = (("llama3-8b", "const:1024:512"),)
# the tensor-parallel rows of issue 8 (measured TP profiles) and issue 9 (llama2-70b at TP 8, the
# paper's setting; no 8-GPU profile exists, so the analytic one): (model, gpu, tp, workload,
# policy); the overlap policy keeps the best searched schedule even where auto returns the
# sequential one (predicted slower, or less than min_gain faster): benchmarked to test the cost
# model, and the searched TP schedules the multi-GPU tests run
EXTRA_TP = (("llama3-70b", "h200", 4, WORKLOAD, "auto"), ("llama3-70b", "h200", 4, WORKLOAD, "overlap"),
            ("mixtral-8x7b", "h200", 2, WORKLOAD, "auto"), ("mixtral-8x7b", "h200", 2, WORKLOAD, "overlap"),
            *(("llama2-70b", "h200", 8, w, "auto")
              for w in ("splitwise", "lmsys", "sharegpt", "const:1024:512")))


# solved with the K = 2 structure family ([S1.family], `--structure-family`): the rows where its pick
# measured faster than stage 1's beside it (benchmarks/RESULTS.md, session 14: H100 splitwise
# 1.083-1.089x against 1.050-1.057x; H200 const 1.080-1.084x against 1.076-1.077x). On H200
# splitwise it measured the same as without (1.035-1.044x against 1.038-1.045x); elsewhere it
# picks nothing new.
FAMILY = (("llama3-8b", "h100-sxm", "splitwise"), ("llama3-8b", "h200", "const:1024:512"))
# a wider selection margin [sel.margin] where the prediction is measured off by more than the
# default 1%: on the H100 the const batch's sequential layer stays below the power limit while an
# overlapped one reaches it, so the profile prices the sequential layer 5-8% long and overlap looks
# better than it is; its K = 2 pick from the 09:01 profile was predicted 1.048x and measured 0.986x
# (benchmarks/RESULTS.md, sessions 12 and 14)
MIN_GAIN = {("llama3-8b", "h100-sxm", "const:1024:512"): 0.06}
# solves whose result depends on the machine's speed: on a slow 2-core machine a sub-solve of
# qwen2-72b TP 2 hits the wall-clock safety net (docs/formulation.md, "Selection, prediction,
# determinism"), on a faster one it does not (T 1838.9 against 1843.04 us, session 14). The shipped
# file is the slow machine's; tests/test_shipped_schedules.py holds these to their predicted period
# within 1% instead of byte for byte.
MACHINE_DEPENDENT = (("qwen2-72b", "h200", 2, "splitwise"),)


def configs() -> list[SolveConfig]:
    out = [SolveConfig(model=m.name, gpu=g, workload=WORKLOAD, tp=smallest_tp(m.name, g))
           for g in GPUS for m in builtin_models() if not m.name.startswith("tiny")]
    out += [SolveConfig(model=m, gpu=g, workload=w, tp=smallest_tp(m, g, w)) for g in GPUS for m, w in EXTRA]
    out += [SolveConfig(model=m, gpu=g, workload=w, tp=tp, policy=pol) for m, g, tp, w, pol in EXTRA_TP]
    return [replace(c, structure_family=(c.model, c.gpu, c.workload) in FAMILY,
                    min_gain=MIN_GAIN.get((c.model, c.gpu, c.workload), c.min_gain)) for c in out]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    rows, bad = [], 0
    for cfg in configs():
        r = plan(cfg)
        path = default_output(cfg, r.schedule.metadata.model_config, r.gpu)
        rows.append((cfg.model, cfg.gpu, cfg.tp, cfg.workload, cfg.policy, r.profile.meta.source,
                     r.solution.solve_time_s, r.solution.status, r.schedule.prediction.speedup_vs_sequential))
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
        import datetime

        day = datetime.date.today().isoformat()
        lines = ["# Solve times of the shipped schedules", "",
                 f"`python examples/make_schedules.py`, {day}, on the development machine (2 CPU cores, "
                 "Python 3.11, OR-Tools 9.15). Bar: each at most 60 s.", "",
                 "| model | gpu | tp | workload | policy | profile | solve s | status | predicted speedup |",
                 "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {m} | {g} | {tp} | {w} | {pol} | {src} | {t:.1f} | {s} | {x:.3f} |"
                  for m, g, tp, w, pol, src, t, s, x in rows]
        atomic_write_text(out, "\n".join(lines) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
