"""`nfsearch bench --e2e`: end-to-end serving throughput of a schedule on synthetic or traced requests.

Requests (all arriving at time 0, the offline setting of the NanoFlow paper): with `--workload W`,
`--num-requests N` synthetic ones whose prompt and output lengths are independent uniform integers
on [1, 2m - 1] for the workload's mean m (mean exactly m, nothing longer than twice it), prompt
token ids uniform over the vocabulary (`--seed`); with `--trace CSV`, one request per row
(columns `input_len,output_len`, or the Splitwise trace's `ContextTokens,GeneratedTokens`), the
first N rows when `--num-requests` is given. A request longer than the model's max_position is
shortened, prompt first, and counted in the record. Generation is greedy with random weights.

Throughput is the paper's: total tokens (input + output) of all requests over the wall time from
the first submission to the last completion, per GPU. Beside it: the iteration-level throughput of
the same schedule — the serving forward (the same CUDA graph) replayed back to back on the
schedule's own batch composition, dense_batch tokens per replay, timed after `--iteration-warm-s`
seconds of untimed replays so that the GPU runs at the clock it keeps under sustained load, as it
does while serving — and their ratio, which is what host overhead, padding, the batches' real
make-up and the final drain cost.

Where the time goes (`nfrt.loop_stats`, the LLM runs instrumented): iterations, slots and padding
per batch shape (`dense`, and `decode_only` for the drain) and per phase (ramp-up, steady, drain);
per shape the medians of the device times of an iteration in the loop (CUDA events: upload, the
forward's graph replay, sampling + read-back, the device's idle time before the iteration, start to
start period) and of the host's phases (plan, fill, enqueue, wait, collect). Every iteration's
numbers go to a CSV beside the record (`<record>-iterations.csv`, columns in
`nfrt.loop_stats.COLUMNS`). On CUDA, `nvidia-smi` samples the SM clock, power and temperature every
200 ms meanwhile: their medians during the serving and during the back-to-back forward tell clock
or thermal drift apart from a heavier batch.

No torch at import time (the CLI registers this on machines without a GPU).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nfsearch.errors import NfsearchError
from nfsearch.gpu_monitor import GpuMonitor

DEFAULT_NUM_REQUESTS = 1000
# Seconds of untimed back-to-back replays before the iteration-level timing: the serving run keeps
# the GPU at its power cap for a minute, and a forward timed from a cooler start runs at a higher
# SM clock (H200, 2026-11-21: 1815 MHz in a 2 s window against 1620 MHz while serving).
DEFAULT_ITERATION_WARM_S = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("end to end (--e2e)")
    g.add_argument("--e2e", action="store_true", help="serve requests through the schedule (nfrt.LLM)")
    g.add_argument("--workload", help="splitwise, lmsys, sharegpt or const:IN:OUT (default: the schedule's)")
    g.add_argument("--num-requests", type=int, default=None,
                   help=f"requests to serve (default: {DEFAULT_NUM_REQUESTS}, or every trace row)")
    g.add_argument("--trace", help="CSV of input_len,output_len per request instead of synthetic lengths")
    g.add_argument("--iteration-warm-s", type=float, default=DEFAULT_ITERATION_WARM_S,
                   help="untimed replays before timing the iteration level, seconds "
                        f"(default {DEFAULT_ITERATION_WARM_S:g}: the clock the GPU keeps under load)")
    g.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test, not a measurement)")


def synthetic_lengths(input_mean: int, output_mean: int, n: int, seed: int) -> list[tuple[int, int]]:
    """n (input, output) pairs, each uniform on [1, 2 * mean - 1] (see the module docstring)."""
    rng = random.Random(seed)
    return [(rng.randint(1, 2 * input_mean - 1), rng.randint(1, 2 * output_mean - 1)) for _ in range(n)]


def read_trace(path: str, n: int | None) -> list[tuple[int, int]]:
    names = (("input_len", "output_len"), ("ContextTokens", "GeneratedTokens"))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise NfsearchError(f"cannot read trace {path}: {e.strerror or e}") from None
    cols = next((c for c in names if rows and all(k in rows[0] for k in c)), None)
    if cols is None:
        raise NfsearchError(f"trace {path}: needs columns input_len,output_len "
                            "(or ContextTokens,GeneratedTokens)")
    out = []
    for i, row in enumerate(rows[:n] if n else rows):
        try:
            a, b = int(row[cols[0]]), int(row[cols[1]])
        except ValueError:
            raise NfsearchError(f"trace {path}: row {i + 2} has a non-integer length") from None
        if a < 1 or b < 1:
            raise NfsearchError(f"trace {path}: row {i + 2} has a length < 1")
        out.append((a, b))
    return out


def fit_lengths(pairs: list[tuple[int, int]], max_len: int) -> tuple[list[tuple[int, int]], int]:
    """Shorten requests to prompt + output - 1 <= max_len (prompt first); returns the count shortened."""
    out, cut = [], 0
    for a, b in pairs:
        b2 = min(b, max_len)
        a2 = min(a, max_len - b2 + 1)
        cut += (a2, b2) != (a, b)
        out.append((a2, b2))
    return out, cut


def run_e2e(args: argparse.Namespace) -> int:
    from nfrt.atomic import atomic_write_text
    from nfrt.schedule import load_schedule

    from nfsearch.bench import record_path, require_cuda, truncate, write_record
    from nfsearch.workload import parse_workload

    n = args.num_requests
    if n is not None and n < 1:
        raise NfsearchError(f"--num-requests must be >= 1, got {n}")
    warm_s = args.iteration_warm_s
    if not warm_s >= 0.0:
        raise NfsearchError(f"--iteration-warm-s must be >= 0, got {warm_s!r}")
    if args.device not in ("cuda", "cpu"):
        raise NfsearchError(f"--device must be cuda or cpu, got {args.device!r}")
    schedule = load_schedule(args.schedule)
    tp = max(schedule.metadata.tp, getattr(args, "tp", None) or 1)
    if tp > 1:  # nfrt.LLM serves from one process on one GPU
        raise NfsearchError(f"--e2e serves on one GPU (tp 1), not tp {tp} ({args.schedule} has tp "
                            f"{schedule.metadata.tp}): drop --e2e to bench the forward over {tp} GPUs, "
                            "or plan a tp 1 schedule")
    ran = truncate(schedule, args.layers)
    meta = ran.metadata
    if args.trace:
        pairs = read_trace(args.trace, n)
        source = f"trace {args.trace}"
    else:
        w = parse_workload(args.workload or meta.workload)
        pairs = synthetic_lengths(w.input_len, w.output_len, n or DEFAULT_NUM_REQUESTS, args.seed)
        source = f"synthetic {w.name} (uniform, means {w.input_len}/{w.output_len})"
    if args.device == "cuda":
        require_cuda()
    m = measure_e2e(ran, pairs, args.device, args.seed, args.partitions, warm_s)
    rec = {"kind": "e2e", "command": shlex.join(["nfsearch", *sys.argv[1:]]),
           "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "schedule": str(args.schedule),
           "model": meta.model, "layers": meta.num_layers, "model_layers": schedule.metadata.num_layers,
           "workload": args.workload or meta.workload, "requests": source, "tp": meta.tp,
           "batch": meta.batch.to_dict(), "env": {"gpu_slug": meta.gpu if args.device == "cuda" else "cpu"},
           **m}
    m["e2e_over_iteration"] = rec["e2e_over_iteration"] = (
        m["tokens_per_s_per_gpu"] / m["iteration"]["tokens_per_s"])
    default = record_path(args.out, rec)
    csv_text = rec.pop("iterations_csv_text")
    csv_path = default.with_name(default.stem + "-e2e-iterations.csv")
    rec["iterations_csv"] = str(csv_path)
    try:
        atomic_write_text(csv_path, csv_text)
    except OSError as e:
        raise NfsearchError(f"cannot write {csv_path}: {e.strerror or e}") from None
    path = write_record(rec, default.with_name(default.stem + "-e2e.json"))
    if args.json:
        print(json.dumps(rec, indent=2))
    else:
        print(format_e2e(rec, path))
    return 0


def measure_e2e(schedule, pairs: list[tuple[int, int]], device: str, seed: int,
                partitions: bool = True, warm_s: float = DEFAULT_ITERATION_WARM_S) -> dict[str, Any]:
    """Serve `pairs` through `nfrt.LLM` (random weights) and time the forward alone after
    (`warm_s` seconds of untimed replays first)."""
    from nfrt.llm import LLM

    llm = LLM(schedule, None, device=device, seed=seed, use_partitions=partitions, instrument=True)
    monitor = GpuMonitor(llm.device) if device == "cuda" else None
    try:
        return _serve(llm, schedule, pairs, seed, monitor, warm_s)
    finally:
        if monitor is not None:
            monitor.stop({})  # ends nvidia-smi also when serving raised (a no-op after stop)


def _serve(llm, schedule, pairs: list[tuple[int, int]], seed: int,
           monitor: GpuMonitor | None, warm_s: float = 0.0) -> dict[str, Any]:
    from tqdm import tqdm

    pairs, cut = fit_lengths(pairs, llm.max_seq_len)
    rng = random.Random(seed + 1)
    vocab = llm.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(a)] for a, _ in pairs]
    news = [b for _, b in pairs]
    total = sum(a + b for a, b in pairs)
    rejected, done_tokens = 0, 0
    bar = tqdm(total=total, desc="e2e", unit="tok", unit_scale=True, file=sys.stderr, disable=None)
    serve_start = time.time()
    t0 = time.perf_counter()
    for c in llm.stream(prompts, max_new_tokens=news):
        if c.error is not None:
            rejected += 1
            continue
        k = len(prompts[c.index]) + len(c.token_ids)
        done_tokens += k
        bar.update(k)
    wall = time.perf_counter() - t0
    serve_end = time.time()
    bar.close()
    stats = llm.stats
    csv_text = llm.loop.csv_text()
    it_start = time.time()
    warm_s = warm_s if llm.cuda else 0.0  # on a CPU a smoke test: no clock to settle
    it = llm.time_iteration(warm_s=warm_s)
    # the nvidia-smi window of the iteration level leaves out the untimed warm replays
    windows = {"serving": (serve_start, serve_end), "iteration_level": (it_start + warm_s, time.time())}
    gpu = monitor.stop(windows) if monitor is not None else None
    pages_ok = llm.free_pages == llm.usable_pages
    loop = stats["loop"]
    return {"num_requests": len(pairs), "rejected": rejected, "shortened": cut, "input_tokens":
            sum(a for a, _ in pairs), "output_tokens": sum(b for _, b in pairs), "served_tokens": done_tokens,
            "wall_s": wall, "tokens_per_s_per_gpu": done_tokens / wall / schedule.metadata.tp,
            "iterations": stats["iterations"],
            "iterations_decode_only": loop["shapes"]["decode_only"]["iterations"],
            "decode_only_slots": llm.drain.slots if llm.drain is not None else 0,
            # tokens over the slots the batches computed (dense_batch, or the decode-only shape's)
            "batch_utilization": stats["tokens"] / max(1, stats["slots"]),
            "kv_pages": llm.num_pages, "prefill_rows": llm.shape.prefill_rows, "pages_free_after": pages_ok,
            "first_launch_s": stats.get("first_launch_s"), "iteration": it, "loop": loop, "gpu_clocks": gpu,
            "iterations_csv_text": csv_text}


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1e3:.3f}"


def format_loop(rec: dict[str, Any]) -> list[str]:
    """The loop's breakdown: padding per phase, then per shape the medians of an iteration."""
    loop, it = rec["loop"], rec["iteration"]
    ph = loop["phases"]
    lines = ["padding slots (of slots computed): " + ", ".join(
        f"{p.replace('_', '-')} {ph[p]['padding']} of {ph[p]['slots']} ({ph[p]['iterations']} iterations)"
        for p in ("ramp_up", "steady", "drain"))]
    shapes = [(n, d) for n, d in loop["shapes"].items() if d["iterations"] and "median_us" in d]
    if not shapes:
        return lines
    head = f"{'per iteration, median ms':<44}" + "".join(
        f"{n.replace('_', '-') + ' (' + str(d['iterations']) + ')':>22}" for n, d in shapes)
    lines.append(head)
    rows = [("device: start-to-start period", "period"), ("  upload (3 copies + id gather)", "upload"),
            ("  forward (graph replay)", "forward"), ("  sampling + read-back", "sample"),
            ("  idle before it (nothing queued)", "idle"), ("host: plan (scheduler)", "plan"),
            ("  fill (pinned staging)", "fill"), ("  enqueue (upload, replay, sampling)", "enqueue"),
            ("  wait (for its sampled ids)", "wait"), ("  collect (tokens, caller)", "collect")]
    for label, key in rows:
        lines.append(f"{label:<44}" + "".join(f"{_ms(d['median_us'][key]):>22}" for _, d in shapes))
    dense = loop["shapes"]["dense"]
    if dense["iterations"] and dense.get("total_s", {}).get("forward") is not None:
        t = dense["total_s"]
        lines.append(f"dense forward in the loop vs back to back on the schedule's batch: "
                     f"{_ms(dense['median_us']['forward'])} vs {it['forward_us'] / 1e3:.3f} ms; "
                     f"device idle in total {sum(d['total_s']['idle'] or 0 for _, d in shapes):.3f} s; "
                     f"device span {loop['device_span_s'] or 0:.2f} s of the wall's {rec['wall_s']:.2f} s "
                     f"(first launch after {rec['first_launch_s'] or 0:.3f} s)")
        c = dense["median_counts"]
        lines.append(f"dense batch make-up, median: decode slots {c['decode_slot_decodes']:.0f} decodes + "
                     f"{c['decode_slot_prompt']:.0f} prompt tokens; prefill region "
                     f"{c['prefill_decodes']:.0f} decode runs + {c['prefill_prompt']:.0f} prompt tokens; "
                     f"attention reads: decode contexts {c['decode_context_sum']:.0f} "
                     f"(schedule's batch {it.get('decode_context_sum', 0)}), prefill positions "
                     f"{c['prefill_position_sum']:.0f} ({it.get('prefill_position_sum', 0)})")
        g = rec.get("gpu_clocks")
        if g:
            lines.append("GPU, medians while serving / during the back-to-back forward: " + ", ".join(
                f"{k} {g['serving'][k]} / {g['iteration_level'][k]}" for k in GpuMonitor.FIELDS))
        f = loop["dense_forward_median_us"]
        lines.append(f"dense forward, iterations with decode runs in the prefill region "
                     f"({f['iterations_with']}): {_ms(f['prefill_decode_runs'])} ms, without "
                     f"({f['iterations_without']}): {_ms(f['no_prefill_decode_runs'])} ms; "
                     f"dense forwards in total {t['forward']:.2f} s")
    return lines


def format_e2e(rec: dict[str, Any], path: Path | None = None) -> str:
    it = rec["iteration"]
    lines = [f"{rec['model']} ({rec['layers']} of {rec['model_layers']} layers), {rec['requests']}: "
             f"{rec['num_requests']} requests ({rec['rejected']} rejected, {rec['shortened']} shortened), "
             f"{rec['input_tokens']} input + {rec['output_tokens']} output tokens",
             f"end to end: {rec['wall_s']:.2f} s, {rec['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, "
             f"{rec['iterations']} iterations ({rec['iterations_decode_only']} decode-only of "
             f"{rec['decode_only_slots']} slots), batch utilization {rec['batch_utilization']:.3f}",
             f"iteration level (same schedule, forward replayed back to back after "
             f"{it.get('warm_s', 0):g} s of warm replays, decode context {it['decode_context']}): "
             f"{it['forward_us'] / 1e3:.3f} ms, {it['tokens_per_s']:.0f} tokens/s per GPU",
             f"end to end / iteration level: {rec['e2e_over_iteration']:.3f}",
             *format_loop(rec)]
    if rec.get("iterations_csv"):
        lines.append(f"per iteration: {rec['iterations_csv']}")
    if path is not None:
        lines.append(f"record: {path}")
    return "\n".join(lines)
