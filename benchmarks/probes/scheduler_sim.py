"""CPU simulation of the continuous-batching scheduler (`nfrt.scheduler`) on the e2e benchmark's load.

Drives the real `Scheduler` with the real page allocator (`nfrt.kvcache.PageAllocator`; no model,
no GPU) on the shape and load of `nfsearch bench --e2e` for llama3-8b splitwise on an H200 (benchmarks/runs/
llama3-8b-h200-splitwise-20261121T110722Z-e2e.json): dense batch 2048 = 320 decode slots + 1728
prefill tokens in up to 224 prefill rows, a decode-only drain of 320 slots, 56132 KV pages of 16
positions (one of them the scratch page), 1500 requests with lengths from
`nfsearch.bench_e2e.synthetic_lengths` (means 1155/211, seed 0). Every sampled token counts as read
back at once (its output is appended when it is scheduled): the scheduler plans only from
`num_computed`/`num_sampled`, so the plans are those of the real loop.

Per phase (as `nfrt.loop_stats`: `ramp_up` before the first full iteration, `steady`, `drain` =
planned with nothing left to prefill) it prints dense and decode-only iterations and, per dense
iteration, the mean prompt tokens (decode slots + prefill region), decodes in decode slots, decodes
spilled into the prefill region (runs of length 1 past the prompt), and padding.

Estimated time, a cost model taken from that record (its `loop.dense_forward_median_us` and the
decode-only shape's median forward): a dense iteration costs 60.9 ms, plus 7.8 ms if it has any
spilled decode run (68.7 ms median with such runs vs 60.9 ms without); a decode-only iteration costs
13.8 ms. Host time is ignored (the loop overlaps it with the device).

    python benchmarks/probes/scheduler_sim.py                    # the scheduler in this tree
    python benchmarks/probes/scheduler_sim.py --rev 0ad4d02      # runtime/nfrt/scheduler.py at a git rev
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

from nfrt.kvcache import PageAllocator

from nfsearch.bench_e2e import synthetic_lengths

DENSE_MS, SPILL_MS, DECODE_ONLY_MS = 60.9, 7.8, 13.8
PHASES = ("ramp_up", "steady", "drain")
ROOT = Path(__file__).resolve().parents[2]


def load_scheduler(rev: str | None):
    """The `nfrt.scheduler` module of this tree, or its source at git revision `rev`."""
    if rev is None:
        import nfrt.scheduler
        return nfrt.scheduler
    src = subprocess.run(["git", "show", f"{rev}:runtime/nfrt/scheduler.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType(f"scheduler_at_{rev}")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:runtime/nfrt/scheduler.py", "exec"), mod.__dict__)
    return mod


def blank() -> dict[str, float]:
    return dict.fromkeys(("dense", "decode_only", "prompt", "slot_decodes", "spilled", "padding",
                          "with_spill", "est_ms"), 0)


def simulate(mod, args) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    alloc = PageAllocator(args.pages - 1, args.page_size)  # the scratch page is not handed out
    sched = mod.Scheduler(alloc, args.pages - 1, args.decode_slots, args.prefill_tokens, args.prefill_rows,
                          args.max_seq_len, drain_slots=args.drain_slots)
    pairs = synthetic_lengths(args.input_mean, args.output_mean, args.num_requests, args.seed)
    reqs = [mod.Request(i, (1,) * a, b) for i, (a, b) in enumerate(pairs)]
    for r in reqs:
        err = sched.add(r)
        if err is not None:
            raise SystemExit(err)
    dense = args.decode_slots + args.prefill_tokens
    phases = {p: blank() for p in PHASES}
    full_seen, k, max_decoders, max_wait = False, 0, 0, 0
    last_served: dict[int, int] = {}
    while (plan := sched.schedule(k)) is not None:
        tokens = plan.num_tokens
        if plan.drain:
            phase = "drain"
        else:
            full_seen |= tokens == dense
            phase = "steady" if full_seen else "ramp_up"
        d = phases[phase]
        if plan.decode_only:
            d["decode_only"] += 1
            d["est_ms"] += DECODE_ONLY_MS
        else:
            spilled = sum(1 for i in plan.prefill if i.start >= i.request.prompt_len)
            d["dense"] += 1
            d["prompt"] += sum(min(i.length, i.request.prompt_len - i.start)
                               for i in plan.decode + plan.prefill if i.start < i.request.prompt_len)
            d["slot_decodes"] += sum(1 for i in plan.decode if i.start >= i.request.prompt_len)
            d["spilled"] += spilled
            d["padding"] += dense - tokens
            d["with_spill"] += spilled > 0
            d["est_ms"] += DENSE_MS + (SPILL_MS if spilled else 0.0)
        for it in plan.decode + plan.prefill:
            r = it.request
            if it.start >= r.prompt_len and r.index in last_served:  # a decoder served again
                max_wait = max(max_wait, plan.iteration - last_served[r.index] - 1)
            last_served[r.index] = plan.iteration
            if it.sample_row >= 0:
                r.outputs.append(0)  # read back at once
        max_decoders = max(max_decoders, sum(1 for r in sched.running if not r.prefilling))
        k += 1
    assert all(r.done for r in reqs), "a request did not finish"
    assert alloc.free_pages == args.pages - 1, "pages left held"
    return phases, {"iterations": k, "max_decoders": max_decoders, "max_decoder_wait": max_wait}


def report(phases, extra) -> str:
    lines = [f"{'phase':8} {'dense':>6} {'dec-only':>8} {'prompt/it':>9} {'slot-dec/it':>11} "
             f"{'spilled/it':>10} {'pad/it':>7} {'w/spill':>7} {'est_s':>7}"]
    total = blank()
    for name, d in [*phases.items(), ("total", None)]:
        if d is None:
            d = total
        else:
            for key in total:
                total[key] += d[key]
        n = max(d["dense"], 1)
        lines.append(f"{name:8} {d['dense']:6d} {d['decode_only']:8d} {d['prompt'] / n:9.1f} "
                     f"{d['slot_decodes'] / n:11.1f} {d['spilled'] / n:10.2f} {d['padding'] / n:7.1f} "
                     f"{d['with_spill']:7d} {d['est_ms'] / 1e3:7.2f}")
    lines.append(f"iterations {extra['iterations']}, most decoders running after a plan "
                 f"{extra['max_decoders']}, longest wait of a decoder {extra['max_decoder_wait']} iterations")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", help="simulate runtime/nfrt/scheduler.py at this git revision "
                   "(default: this tree)")
    p.add_argument("--decode-slots", type=int, default=320)
    p.add_argument("--prefill-tokens", type=int, default=1728)
    p.add_argument("--prefill-rows", type=int, default=224)
    p.add_argument("--drain-slots", type=int, default=320)
    p.add_argument("--pages", type=int, default=56132, help="KV pages, the scratch page included")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=8192)
    p.add_argument("--num-requests", type=int, default=1500)
    p.add_argument("--input-mean", type=int, default=1155)
    p.add_argument("--output-mean", type=int, default=211)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    mod = load_scheduler(args.rev)
    print(f"scheduler: {args.rev or 'working tree'}; {args.num_requests} requests, means "
          f"{args.input_mean}/{args.output_mean}, seed {args.seed}; shape {args.decode_slots} decode slots + "
          f"{args.prefill_tokens} prefill tokens in {args.prefill_rows} rows, drain {args.drain_slots}; "
          f"{args.pages} pages of {args.page_size}")
    phases, extra = simulate(mod, args)
    print(report(phases, extra))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
