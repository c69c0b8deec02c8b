"""`nfsearch bench`: a schedule against its sequential twin on this GPU (the tp GPUs of this host
under tensor parallelism), in one run.

One process per GPU builds the engine of the schedule (random weights from `--seed`) and its
sequential twin (`Engine.sequential_twin()`: the same weights, KV cache and activation buffers), captures
both as CUDA graphs, and replays them interleaved, so that clock and thermal drift hit both alike;
the twin also runs eagerly (`Model.forward_sequential`, the same ops with no graph). Beside that it
measures the ceilings (bf16 GEMM 8192^3 via torch.matmul, a 1 GiB `copy_`), the bound (measured
peak / (2 x active params), through `nfsearch.bound.compute_bound`), and checks the outputs: the
nano-batched logits of a fresh batch must equal the sequential ones within bf16 tolerance, or no
speed is reported. The JSON record always goes to `--out` (atomic write).

Tensor parallelism (a schedule with tp N > 1): the command re-runs itself under torchrun as N
processes (`nfsearch.launch.relaunch`), one per GPU. Every rank builds its shard of the engine and
the twin, captures and replays both graphs in the same order (the all-reduces are inside the
graphs, so the ranks stay in lockstep; a barrier starts each timed iteration) and rank 0 alone
prints and writes: its CUDA-event times are the measurement. A ceiling joins the other two: the
bus bandwidth of a 256 MiB bf16 all-reduce over the group, which the bound's network time uses.
Throughput is per GPU (tokens per iteration / time / tp), the unit of the bound.

Truncation (`--layers L` of a model of N): the model runs its first L layers, and the prediction
is rescaled from the schedule's steady state: predicted_L = (L - 1) * period + span + tail, with
tail = iteration - ((N - 1) * period + span) so that predicted_N is the schedule's own
iteration_us; the sequential prediction scales its per-layer part: seq_L = L * (seq_N - tail) / N
+ tail, where seq_N = iteration_us * speedup_vs_sequential. The bound is that of the L-layer
model (its active parameters), since that is what runs; it counts the LM head for every token
while the runtime applies it at the sample positions only, so a truncated run's fraction of the
bound reads high (only full-depth fractions compare with the paper's).

This module imports no torch at import time: the CLI registers it on machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nfrt.atomic import atomic_write_new_text
from nfrt.schedule import Prediction, Schedule, load_schedule

from nfsearch.errors import NfsearchError
from nfsearch.launch import in_world, is_leader

DEFAULT_ITERS = 20
DEFAULT_WARMUP = 3
DEFAULT_RTOL = 3e-2  # max |nano - seq| over max |seq|: bf16 logits after a multi-layer forward
DEFAULT_OUT = "benchmarks/runs"
GEMM_N = 8192  # the bf16 peak is measured on an 8192^3 product (bench_measure)
COPY_BYTES = 1 << 30
ALLREDUCE_BYTES = 1 << 28  # bf16 all-reduce of the NVLink ceiling (bench_measure), tp > 1 only


@dataclass(frozen=True)
class BenchConfig:
    schedule: str
    layers: int | None = None  # None: the model's full depth
    iters: int = DEFAULT_ITERS
    warmup: int = DEFAULT_WARMUP
    seed: int = 0
    rtol: float = DEFAULT_RTOL
    out: str = DEFAULT_OUT
    partitions: bool = True
    breakdown: bool = False
    timeline: str | None = None  # PNG path: per-stream Gantt measured inside the graph replay
    tp: int | None = None  # None: the schedule's

    def __post_init__(self) -> None:
        if self.tp is not None and self.tp < 1:
            raise NfsearchError(f"--tp must be >= 1, got {self.tp}")
        if self.layers is not None and self.layers < 1:
            raise NfsearchError(f"--layers must be >= 1, got {self.layers}")
        if self.iters < 1:
            raise NfsearchError(f"--iters must be >= 1, got {self.iters}")
        if self.warmup < 0:
            raise NfsearchError(f"--warmup must be >= 0, got {self.warmup}")
        if self.seed < 0:
            raise NfsearchError(f"--seed must be >= 0, got {self.seed}")
        if not 0 < self.rtol < 1:
            raise NfsearchError(f"--rtol must be in (0, 1), got {self.rtol}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = BenchConfig(schedule="")
    p = sub.add_parser("bench", help="measure a schedule against the sequential baseline on this GPU")
    p.add_argument("--schedule", required=True, help="a schedule YAML file")
    p.add_argument("--layers", type=int, default=d.layers,
                   help="run the first L layers (default: the model's full depth)")
    p.add_argument("--iters", type=int, default=d.iters,
                   help="timed replays of each (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="untimed replays of each first (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="random weights and batch (default: %(default)s)")
    p.add_argument("--rtol", type=float, default=d.rtol,
                   help="max relative error of nano-batched vs sequential logits (default: %(default)s)")
    p.add_argument("--out", default=d.out, help="folder of the JSON record (default: %(default)s)")
    p.add_argument("--no-partitions", dest="partitions", action="store_false",
                   help="plain streams on all SMs instead of green-context partitions")
    p.add_argument("--breakdown", action="store_true",
                   help="also time each nano-op of one layer alone on its stream")
    p.add_argument("--timeline", metavar="PNG", default=None,
                   help="also replay traced graphs (nfrt.trace stamps in the graph) and draw one middle "
                        "layer's measured per-stream Gantt beside the predicted one")
    p.add_argument("--tp", type=int, default=d.tp,
                   help="tensor-parallel degree, one process per GPU under torchrun (default: the "
                        "schedule's; another value is an error)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the record)")
    from nfsearch.bench_e2e import add_arguments

    add_arguments(p)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    if getattr(args, "e2e", False):  # serving throughput: nfsearch/bench_e2e.py
        from nfsearch.bench_e2e import run_e2e

        return run_e2e(args)
    cfg = BenchConfig(schedule=args.schedule, layers=args.layers, iters=args.iters, warmup=args.warmup,
                      seed=args.seed, rtol=args.rtol, out=args.out, partitions=args.partitions,
                      breakdown=args.breakdown, timeline=args.timeline, tp=getattr(args, "tp", None))
    schedule = load_schedule(cfg.schedule)
    tp = resolve_tp(cfg.tp, schedule, cfg.schedule)
    run_schedule = truncate(schedule, cfg.layers)
    from nfsearch.launch import relaunch

    # tp > 1 outside torchrun: this command again as tp processes
    code = relaunch(tp, getattr(args, "argv", None))
    if code is not None:
        return code
    require_cuda()
    m = measure(cfg, run_schedule)
    if not is_leader():  # rank 0 reports; the others exit with the same verdict, quietly
        return 0 if check_ok(cfg, m) else 2
    record = build_record(cfg, schedule, run_schedule, m, command=shlex.join(["nfsearch", *sys.argv[1:]]))
    if record.get("timeline"):
        from nfsearch.bench_timeline import draw_timeline

        record["timeline"]["png"] = str(draw_timeline(schedule, record, cfg.timeline))
    path = write_record(record, record_path(cfg.out, record))
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(format_table(record, path))
    if not record["check"]["ok"]:
        c = record["check"]
        raise NfsearchError(f"nano-batched logits differ from sequential: max rel err {c['max_rel_err']:.3g} "
                            f"> tolerance {c['rtol']:.3g}; speed not reported (record: {path})")
    return 0


def require_cuda(command: str = "bench") -> None:
    """Raise NfsearchError (one line, exit 2) unless PyTorch sees a CUDA GPU."""
    try:
        import torch
    except ImportError:
        raise NfsearchError(f"{command} needs PyTorch with CUDA (pip install 'nfsearch[gpu]')") from None
    if not torch.cuda.is_available():
        raise NfsearchError(f"{command} needs a CUDA GPU: torch.cuda.is_available() is False")


def resolve_tp(requested: int | None, schedule: Schedule, path: str = "") -> int:
    """The TP degree to run: the schedule's (a schedule is solved for one degree)."""
    tp = schedule.metadata.tp
    if requested is not None and requested != tp:
        raise NfsearchError(f"--tp {requested} does not match tp {tp} of schedule "
                            f"{path or schedule.metadata.model}: plan one for tp {requested}, or drop --tp")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if in_world() and size != tp:
        raise NfsearchError(f"schedule has tp {tp}, but torchrun started {size} processes")
    return tp


def check_ok(cfg: BenchConfig, m: dict[str, Any]) -> bool:
    """Finite logits within `cfg.rtol` of the sequential ones."""
    return bool(m["check"]["finite"] and m["check"]["max_rel_err"] <= cfg.rtol)


def truncate(schedule: Schedule, layers: int | None) -> Schedule:
    """The schedule with its model cut to the first `layers` layers (None or the full depth: as is)."""
    meta = schedule.metadata
    n = meta.model_config.num_layers
    if layers is None or layers == n:
        return schedule
    if layers > n:
        raise NfsearchError(f"--layers {layers} exceeds the {n} layers of {meta.model}")
    cut = replace(meta, model_config=replace(meta.model_config, num_layers=layers), num_layers=layers)
    return replace(schedule, metadata=cut)


def predicted(prediction: Prediction | None, model_layers: int, layers: int) -> dict[str, Any] | None:
    """The schedule's predicted iteration (and its sequential twin's) rescaled to `layers` layers."""
    if prediction is None:
        return None
    p, n = prediction, model_layers
    tail = p.iteration_us - ((n - 1) * p.period_us + p.layer_span_us)
    it = p.iteration_us if layers == n else (layers - 1) * p.period_us + p.layer_span_us + tail
    seq = None
    if p.speedup_vs_sequential is not None:
        seq_n = p.iteration_us * p.speedup_vs_sequential
        seq = seq_n if layers == n else layers * (seq_n - tail) / n + tail
    return {"period_us": p.period_us, "layer_span_us": p.layer_span_us, "tail_us": tail,
            "iteration_us": it, "sequential_iteration_us": seq,
            "speedup_vs_sequential": seq / it if seq is not None and it > 0 else None,
            "schedule_iteration_us": p.iteration_us, "schedule_layers": n}


def build_record(cfg: BenchConfig, schedule: Schedule, ran: Schedule, m: dict[str, Any],
                 command: str) -> dict[str, Any]:
    """The JSON record of one bench run from the measurements `m` (plain data, see `measure`)."""
    import nfsearch
    from nfsearch.bench_measure import bound_for, speed
    from nfsearch.models import param_counts

    meta, model = ran.metadata, ran.metadata.model_config
    nvlink = m.get("nvlink_gbps")
    b = bound_for(model, m["env"], meta, m["peak_tflops"], m["copy_gbps"], nvlink)
    optimal = b.optimal_tokens_per_s_per_gpu
    ok = check_ok(cfg, m)
    pred = predicted(schedule.prediction, schedule.metadata.num_layers, meta.num_layers)
    rec: dict[str, Any] = {
        "nfsearch_version": nfsearch.__version__, "command": command, "date": m["date"],
        "schedule": str(cfg.schedule), "model": meta.model, "layers": meta.num_layers,
        "model_layers": schedule.metadata.num_layers, "workload": meta.workload, "tp": meta.tp,
        "world_size": m["env"].get("world_size", 1),
        "batch": meta.batch.to_dict(), "tokens_per_iteration": m["tokens"],
        "num_nano_batches": len(ran.nano_batches),
        "streams": [{"name": s.name, "partition": s.partition, "nano_ops": len(s.nano_ops),
                     "num_sms": next(p.num_sms for p in ran.partitions if p.name == s.partition)}
                    for s in ran.streams],
        "solver": meta.solver.to_dict(), "profile_source": meta.profile.source,
        "env": m["env"],
        "settings": {"iters": cfg.iters, "warmup": cfg.warmup, "seed": cfg.seed, "rtol": cfg.rtol,
                     "partitions": cfg.partitions},
        "ceilings": {"gemm_bf16_tflops": m["peak_tflops"], "gemm_shape": [GEMM_N] * 3,
                     "copy_gbps": m["copy_gbps"], "copy_bytes": COPY_BYTES,
                     "allreduce_busbw_gbps": nvlink, "allreduce_bytes": ALLREDUCE_BYTES if nvlink else None},
        "bound": {"active_params": param_counts(model).active, "peak_tflops": m["peak_tflops"],
                  "nvlink_gbps": b.gpu.nvlink_gbps if meta.tp > 1 else None, "tp": meta.tp,
                  "optimal_tokens_per_s_per_gpu": optimal, "binding": b.binding,
                  "layer_compute_us": b.compute_us, "layer_memory_us": b.memory_us,
                  "layer_network_us": b.network_us},
        "check": {"max_rel_err": m["check"]["max_rel_err"], "rtol": cfg.rtol, "ok": ok,
                  "finite": m["check"]["finite"], "eager_vs_graph_rel_err": m["check"]["eager_rel_err"]},
        "results": None, "speedup_vs_sequential": None, "eager_over_graph": None, "prediction": pred,
        "breakdown": None, "timeline": None,
    }
    if not ok:  # wrong outputs: no speed is reported
        return rec
    res = {k: speed(v, m["tokens"], optimal, meta.tp) for k, v in m["samples_us"].items()}
    nano, seq = res["nano"]["median_us"], res["sequential"]["median_us"]
    rec["results"] = res
    rec["speedup_vs_sequential"] = seq / nano
    rec["eager_over_graph"] = res["sequential_eager"]["median_us"] / seq
    if pred is not None:
        pred["measured_over_predicted"] = nano / pred["iteration_us"]
        if pred["sequential_iteration_us"]:
            pred["sequential_measured_over_predicted"] = seq / pred["sequential_iteration_us"]
    if m.get("breakdown"):
        from nfsearch.bench_measure import breakdown_summary

        rec["breakdown"] = breakdown_summary(schedule, m["breakdown"])
    if m.get("timeline"):
        from nfsearch.bench_timeline import timeline_summary

        rec["timeline"] = timeline_summary(schedule, m["timeline"])
    return rec


def stamped_path(out_dir: str | os.PathLike[str], parts: tuple[Any, ...], date: str) -> Path:
    """<out>/<parts joined by '-', each cleaned to [A-Za-z0-9._-]>-<UTC date and time>.json"""
    stamp = date.replace("-", "").replace(":", "")[:15] + "Z"  # 20261121T082233Z
    name = "-".join(re.sub(r"[^A-Za-z0-9._]+", "-", str(x)).strip("-") for x in parts)
    return Path(out_dir) / f"{name}-{stamp}.json"


def record_path(out_dir: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """<out>/<model>[-l<L>]-<gpu>[-tp<N>]-<workload>-<UTC date and time>.json (tp only when > 1)"""
    model = record["model"] + (f"-l{record['layers']}" if record["layers"] != record["model_layers"] else "")
    gpu = record["env"].get("gpu_slug") or record["env"].get("gpu_name", "gpu")
    gpu += f"-tp{record['tp']}" if record.get("tp", 1) > 1 else ""
    return stamped_path(out_dir, (model, gpu, record["workload"]), record["date"])


def write_record(record: dict[str, Any], path: Path, what: str = "bench") -> Path:
    """Atomic and never over another record (`nfrt.atomic.atomic_write_new_text`): runs stamped
    in the same second (benches on different GPUs of one host at once) get <stem>-2.json, -3, ...
    Returns the path written."""
    try:
        return atomic_write_new_text(path, json.dumps(record, indent=2) + "\n")
    except OSError as e:
        raise NfsearchError(f"cannot write the {what} record {path}: {e.strerror or e}") from None


def format_table(rec: dict[str, Any], path: Path | None = None) -> str:
    b, c, env, ceil = rec["batch"], rec["check"], rec["env"], rec["ceilings"]
    tp = rec.get("tp", 1)
    gpus = (f"tp {tp}: {rec.get('world_size', tp)} x {env.get('gpu_name')} ({env.get('num_sms')} SMs each, "
            f"NCCL {env.get('nccl')})" if tp > 1 else f"{env.get('gpu_name')} ({env.get('num_sms')} SMs)")
    net = ceil.get("allreduce_busbw_gbps")
    lines = [
        f"{rec['model']} ({rec['layers']} of {rec['model_layers']} layers), {rec['workload']}, "
        f"{rec['tokens_per_iteration']} tokens ({b['decode_tokens']} decode + "
        f"{b['prefill_tokens']} prefill), {rec['num_nano_batches']} nano-batches on {gpus}",
        f"ceilings: bf16 GEMM {GEMM_N}^3 {ceil['gemm_bf16_tflops']:.0f} TFLOP/s, "
        f"copy 1 GiB {ceil['copy_gbps']:.0f} GB/s (read + write)"
        + (f", all-reduce {ALLREDUCE_BYTES >> 20} MiB bus bandwidth {net:.0f} GB/s" if net else ""),
        f"bound: {rec['bound']['peak_tflops']:.0f} TFLOP/s / (2 x {rec['bound']['active_params'] / 1e9:.3g}B "
        f"active params) = {rec['bound']['optimal_tokens_per_s_per_gpu']:.0f} tokens/s per GPU"
        + (f" (tokens per iteration / time / {tp}); layer at peak rates: compute "
           f"{rec['bound']['layer_compute_us']:.0f} us, network {rec['bound']['layer_network_us']:.0f} us"
           if tp > 1 else ""),
        f"check: nano vs sequential logits max rel err {c['max_rel_err']:.2e} (tolerance {c['rtol']:.0e}), "
        f"eager vs graph {c['eager_vs_graph_rel_err']:.2e}: {'ok' if c['ok'] else 'MISMATCH'}",
    ]
    if rec["results"] is not None:
        pred = rec["prediction"] or {}
        want = {"nano": pred.get("iteration_us"), "sequential": pred.get("sequential_iteration_us")}
        lines.append(f"{'run':<22} {'median ms':>10} {'tokens/s/GPU':>13} {'of bound':>9} "
                     f"{'predicted ms':>13} {'meas/pred':>10}")
        for key, label in (("nano", "nano-batched (graph)"), ("sequential", "sequential (graph)"),
                           ("sequential_eager", "sequential (eager)")):
            r, w = rec["results"][key], want.get(key)
            wtxt = (f"{w / 1e3:>13.3f} {r['median_us'] / w:>10.2f}" if w else f"{'-':>13} {'-':>10}")
            lines.append(f"{label:<22} {r['median_us'] / 1e3:>10.3f} {r['tokens_per_s_per_gpu']:>13.0f} "
                         f"{r['fraction_of_bound']:>9.3f} {wtxt}")
        ps = pred.get("speedup_vs_sequential")
        lines.append(f"speedup over sequential: {rec['speedup_vs_sequential']:.3f}x"
                     + (f" (predicted {ps:.3f}x)" if ps else "")
                     + f"; sequential eager / graph: {rec['eager_over_graph']:.3f}")
        if rec["breakdown"]:
            bd = rec["breakdown"]
            busy = ", ".join(f"{k} {v:.0f} us" for k, v in bd["nano"]["stream_busy_us"].items())
            pb = bd["nano"]["predicted_stream_busy_us"]
            pbt = f" (predicted {', '.join(f'{k} {v:.0f} us' for k, v in pb.items())})" if pb else ""
            seq_busy = sum(bd["sequential"]["stream_busy_us"].values())
            lines.append(f"layer {bd['layer']} nano-ops alone on their streams: {busy}{pbt}; "
                         f"sequential ops alone: {seq_busy:.0f} us")
    if rec.get("timeline"):
        from nfsearch.bench_timeline import format_lines

        lines += format_lines(rec["timeline"])
    if path is not None:
        lines.append(f"record: {path}")
    return "\n".join(lines)


def measure(cfg: BenchConfig, schedule: Schedule) -> dict[str, Any]:
    """Everything measured on the GPU (`nfsearch.bench_measure`; torch loads only here)."""
    from nfsearch.bench_measure import measure as measure_on_gpu

    return measure_on_gpu(cfg, schedule)
