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
schedule's own batch composition, dense_batch tokens per replay — and their ratio, which is what
host overhead, padding and the final drain cost.

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

DEFAULT_NUM_REQUESTS = 1000


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("end to end (--e2e)")
    g.add_argument("--e2e", action="store_true", help="serve requests through the schedule (nfrt.LLM)")
    g.add_argument("--workload", help="splitwise, lmsys, sharegpt or const:IN:OUT (default: the schedule's)")
    g.add_argument("--num-requests", type=int, default=None,
                   help=f"requests to serve (default: {DEFAULT_NUM_REQUESTS}, or every trace row)")
    g.add_argument("--trace", help="CSV of input_len,output_len per request instead of synthetic lengths")
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
    from nfrt.schedule import load_schedule

    from nfsearch.bench import record_path, require_cuda, truncate, write_record
    from nfsearch.workload import parse_workload

    n = args.num_requests
    if n is not None and n < 1:
        raise NfsearchError(f"--num-requests must be >= 1, got {n}")
    if args.device not in ("cuda", "cpu"):
        raise NfsearchError(f"--device must be cuda or cpu, got {args.device!r}")
    schedule = load_schedule(args.schedule)
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
    m = measure_e2e(ran, pairs, args.device, args.seed, args.partitions)
    rec = {"kind": "e2e", "command": shlex.join(["nfsearch", *sys.argv[1:]]),
           "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "schedule": str(args.schedule),
           "model": meta.model, "layers": meta.num_layers, "model_layers": schedule.metadata.num_layers,
           "workload": args.workload or meta.workload, "requests": source, "tp": meta.tp,
           "batch": meta.batch.to_dict(), "env": {"gpu_slug": meta.gpu if args.device == "cuda" else "cpu"},
           **m}
    m["e2e_over_iteration"] = rec["e2e_over_iteration"] = (
        m["tokens_per_s_per_gpu"] / m["iteration"]["tokens_per_s"])
    default = record_path(args.out, rec)
    path = write_record(rec, default.with_name(default.stem + "-e2e.json"))
    if args.json:
        print(json.dumps(rec, indent=2))
    else:
        print(format_e2e(rec, path))
    return 0


def measure_e2e(schedule, pairs: list[tuple[int, int]], device: str, seed: int,
                partitions: bool = True) -> dict[str, Any]:
    """Serve `pairs` through `nfrt.LLM` (random weights) and time the forward alone after."""
    from nfrt.llm import LLM
    from tqdm import tqdm

    llm = LLM(schedule, None, device=device, seed=seed, use_partitions=partitions)
    pairs, cut = fit_lengths(pairs, llm.max_seq_len)
    rng = random.Random(seed + 1)
    vocab = llm.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(a)] for a, _ in pairs]
    news = [b for _, b in pairs]
    total = sum(a + b for a, b in pairs)
    rejected, done_tokens = 0, 0
    bar = tqdm(total=total, desc="e2e", unit="tok", unit_scale=True, file=sys.stderr, disable=None)
    t0 = time.perf_counter()
    for c in llm.stream(prompts, max_new_tokens=news):
        if c.error is not None:
            rejected += 1
            continue
        k = len(prompts[c.index]) + len(c.token_ids)
        done_tokens += k
        bar.update(k)
    wall = time.perf_counter() - t0
    bar.close()
    stats = llm.stats
    it = llm.time_iteration()
    pages_ok = llm.free_pages == llm.usable_pages
    return {"num_requests": len(pairs), "rejected": rejected, "shortened": cut, "input_tokens":
            sum(a for a, _ in pairs), "output_tokens": sum(b for _, b in pairs), "served_tokens": done_tokens,
            "wall_s": wall, "tokens_per_s_per_gpu": done_tokens / wall / schedule.metadata.tp,
            "iterations": stats["iterations"],
            "batch_utilization": stats["tokens"] / max(1, stats["iterations"] * llm.shape.dense_batch),
            "kv_pages": llm.num_pages, "prefill_rows": llm.shape.prefill_rows, "pages_free_after": pages_ok,
            "iteration": it}


def format_e2e(rec: dict[str, Any], path: Path | None = None) -> str:
    it = rec["iteration"]
    lines = [f"{rec['model']} ({rec['layers']} of {rec['model_layers']} layers), {rec['requests']}: "
             f"{rec['num_requests']} requests ({rec['rejected']} rejected, {rec['shortened']} shortened), "
             f"{rec['input_tokens']} input + {rec['output_tokens']} output tokens",
             f"end to end: {rec['wall_s']:.2f} s, {rec['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, "
             f"{rec['iterations']} iterations, batch utilization {rec['batch_utilization']:.3f}",
             f"iteration level (same schedule, forward replayed back to back, decode context "
             f"{it['decode_context']}): {it['forward_us'] / 1e3:.3f} ms, {it['tokens_per_s']:.0f} tokens/s "
             f"per GPU",
             f"end to end / iteration level: {rec['e2e_over_iteration']:.3f}"]
    if path is not None:
        lines.append(f"record: {path}")
    return "\n".join(lines)
