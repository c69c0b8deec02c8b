"""Stage 2 on hand-picked K = 2 structures, written as schedules (an experiment, not the search).

Stage 1 picks one structure per K from solo all-SM latencies; stage 2 then sizes its partitions.
This probe runs stage 2 on every K = 2 structure of one family, whatever stage 1 would pick: the
decode-first nano-batch ends at granule b, qkv, o_proj and ffn_up are cut in two, ffn_down and
prefill attention are cut or not, and the compute stream runs nano-batch 1's ops while nano-batch
0's decode attention runs beside them (the shape of every searched dense schedule so far). It
prints each structure's stage-2 period and writes the best `--write` of them as schedules. The
search's own version of this family (prefill attention always whole) is
`nfsearch.search.family.k2_family`, behind `nfsearch solve --structure-family`; this probe, which
came first, is kept as the record of the session-14 runs and their labels.

    python benchmarks/probes/hand_structures.py --model llama3-8b --gpu h100-sxm \\
        --profile P.json --workload splitwise --write 3 --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

from nfrt.schedule import save_schedule

from nfsearch.bound import compute_bound
from nfsearch.config import SolveConfig
from nfsearch.models import resolve_model
from nfsearch.plan import build_problem, choose_profile, gpu_from_profile, to_schedule
from nfsearch.search.stage1 import solve_stage1
from nfsearch.search.stage2 import solve_stage2
from nfsearch.search.timeline import SCALE, Structure
from nfsearch.search.twostage import _from_stage2, _sequential, _solution
from nfsearch.workload import compose_batch, parse_workload


def family(num_granules: int, decode_granules: int):
    """(name, Structure) of the family in the module docstring."""
    for b in range(decode_granules, num_granules):
        for down, prefill in itertools.product((1, 2), (1, 2)):
            splits = {"qkv": 2, "attn_decode": 2, "attn_prefill": prefill, "o_proj": 2, "ffn_up": 2,
                      "ffn_down": down}
            attn = ["attn_prefill.0"] if prefill == 1 else ["attn_prefill.0", "attn_prefill.1"]
            if prefill == 2 and b <= decode_granules:  # nano-batch 0 holds no prefill token
                attn = ["attn_prefill.1"]
            down1 = ["ffn_down.1"] if down == 2 else []
            compute = ["qkv.0", "qkv.1", *attn, "o_proj.1", "ffn_up.1", *down1, "o_proj.0", "ffn_up.0",
                       "ffn_down.0"]
            yield (f"b{b}-down{down}-prefill{prefill}",
                   Structure(2, (0, b, num_granules), splits,
                             {"compute": tuple(compute), "memory": ("attn_decode.0",)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--gpu", default="h100-sxm")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--workload", default="splitwise")
    ap.add_argument("--seconds", type=float, default=7.5, help="stage-2 time limit per structure")
    ap.add_argument("--write", type=int, default=0, help="write the best N as schedules")
    ap.add_argument("--only", default=None, help="write this structure (e.g. b7-down2-prefill1) instead")
    ap.add_argument("--out", default="benchmarks/runs")
    a = ap.parse_args()
    cfg = SolveConfig(model=a.model, gpu=a.gpu, profile=a.profile, workload=a.workload)
    model = resolve_model(cfg.model)
    profile, note = choose_profile(model, cfg)
    gpu = gpu_from_profile(profile)
    workload = parse_workload(cfg.workload)
    comp = compose_batch(model, workload, gpu, tp=1, dense_batch=cfg.dense_batch,
                         round_to=cfg.granularity_tokens)
    prob = build_problem(model, comp.batch, profile, gpu, 1, cfg)
    bound = compute_bound(model, gpu, 1, workload, comp.batch.dense_batch)
    seq = _sequential(prob)
    print(f"{note}; {comp.batch}; sequential T = {seq.period_us:.1f} us")
    r1 = solve_stage1(prob, 2, a.seconds, None)
    w = max(2, math.ceil(r1.span_units / max(r1.period_units, 1)))
    r2 = solve_stage2(prob, r1.structure, a.seconds, w)
    print(f"stage 1's K = 2 pick {r1.structure.boundaries} {r1.structure.splits}: T2 = "
          f"{r2.period_units / SCALE:.1f} us ({seq.period_us * SCALE / r2.period_units:.3f}x)")
    found = []
    for name, s in family(prob.num_granules, prob.decode_granules):
        r = solve_stage2(prob, s, a.seconds, 2)
        if not r.ok:
            print(f"{name}: stage 2 {r.status.lower()}")
            continue
        t = r.period_units / SCALE
        found.append((t, name, r))
        print(f"{name}: T2 = {t:.1f} us ({seq.period_us / t:.3f}x)", flush=True)
    seq_sol = _solution(prob, seq, "OPTIMAL", "sequential", time.monotonic())
    chosen = ([x for x in found if x[1] == a.only] if a.only else sorted(found, key=lambda x: x[0])[:a.write])
    for t, name, r in chosen:
        sol = _solution(prob, _from_stage2(prob, r, r, 2), r.status, f"hand structure {name}",
                        time.monotonic())
        sched = to_schedule(cfg, model, comp, gpu, profile, prob, sol, seq_sol, bound)
        path = Path(a.out) / f"{model.name}-{gpu.name}-{cfg.workload}-hand-{name}.yaml"
        save_schedule(sched, path)
        print(f"wrote {path} (T2 {t:.1f} us, predicted {sched.prediction.speedup_vs_sequential:.3f}x)")


if __name__ == "__main__":
    main()
