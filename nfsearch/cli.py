"""The `nfsearch` command: thin subcommands over the library.

Each subcommand has an `add_<cmd>_parser(subparsers)` that registers it and sets `func`, the
function that runs it and returns the exit status. Defaults are read from the library functions'
signatures, never retyped. Planning commands import no torch; GPU commands import it lazily.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from nfrt.config import ModelConfig
from nfrt.errors import NfrtError

from nfsearch import __version__
from nfsearch.errors import NfsearchError
from nfsearch.gpus import GpuSpec, builtin_gpus, resolve_gpu
from nfsearch.models import builtin_models, model_names, param_counts, resolve_model
from nfsearch.workload import Workload, builtin_workloads, parse_workload


def _default(func: Callable[..., Any], param: str) -> Any:
    return inspect.signature(func).parameters[param].default


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def add_target_args(p: argparse.ArgumentParser) -> None:
    """--model, --gpu, --tp, --workload, --dense-batch and ceiling overrides (shared by planning commands)."""
    from nfsearch.bound import compute_bound

    p.add_argument("--model", required=True,
                   help=f"built-in name ({', '.join(model_names())}) or a HF config.json / its folder")
    p.add_argument("--gpu", required=True, help=f"one of {', '.join(g.name for g in builtin_gpus())}")
    p.add_argument("--tp", type=int, default=_default(compute_bound, "tp"),
                   help="tensor-parallel degree (default: %(default)s)")
    p.add_argument("--workload", default=_default(compute_bound, "workload"),
                   help=f"{', '.join(w.name for w in builtin_workloads())} or const:IN:OUT "
                        "(default: %(default)s)")
    p.add_argument("--dense-batch", type=int, default=_default(compute_bound, "dense_batch"),
                   help="tokens per iteration (default: %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="override the GPU's dense bf16 peak (e.g. a measured GEMM rate)")
    p.add_argument("--hbm-gbps", type=float, default=None, help="override the HBM bandwidth (GB/s)")
    p.add_argument("--nvlink-gbps", type=float, default=None,
                   help="override the NVLink bandwidth per direction (GB/s)")


def target_from_args(args: argparse.Namespace) -> tuple[ModelConfig, GpuSpec, int, Workload, int]:
    model = resolve_model(args.model)
    gpu = resolve_gpu(args.gpu).with_overrides(peak_tflops=args.peak_tflops, hbm_gbps=args.hbm_gbps,
                                               nvlink_gbps=args.nvlink_gbps)
    return model, gpu, args.tp, parse_workload(args.workload), args.dense_batch


# ---- models ------------------------------------------------------------------------------------

def add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the built-in models and their parameter counts")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    rows = []
    for m in builtin_models():
        pc = param_counts(m)
        rows.append({"name": m.name, "layers": m.num_layers, "hidden": m.hidden_size,
                     "experts": f"{m.num_experts} (top-{m.top_k})" if m.is_moe else "-",
                     "total_params_b": pc.total / 1e9, "active_params_b": pc.active / 1e9})
    if args.json:
        _print_json({"models": rows})
        return 0
    header = f"{'name':<14} {'layers':>6} {'hidden':>6} {'experts':>10} {'total B':>9} {'active B':>9}"
    print(header)
    for r in rows:
        print(f"{r['name']:<14} {r['layers']:>6} {r['hidden']:>6} {r['experts']:>10} "
              f"{_billions(r['total_params_b']):>9} {_billions(r['active_params_b']):>9}")
    return 0


def _billions(x: float) -> str:
    return f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"  # the tiny test models have ~0.0001B


# ---- bound -------------------------------------------------------------------------------------

def add_bound_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bound", help="per-layer roofline and the optimal tokens/s per GPU")
    add_target_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_bound)


def run_bound(args: argparse.Namespace) -> int:
    from nfsearch.bound import compute_bound

    model, gpu, tp, workload, dense_batch = target_from_args(args)
    b = compute_bound(model, gpu, tp, workload, dense_batch)
    if args.json:
        _print_json(b.to_dict())
        return 0
    batch = b.composition.batch
    pc = param_counts(model)
    print(f"{model.name} on {gpu.name} x tp {tp}, workload {workload.name} "
          f"({workload.input_len} in / {workload.output_len} out), dense batch {batch.dense_batch}")
    print(f"batch: {batch.decode_tokens} decode tokens (mean context {batch.decode_context}) + "
          f"{batch.prefill_tokens} prefill tokens (prompts of {batch.prefill_context})")
    print(f"memory: {b.composition.note}")
    print(f"per layer per GPU at peak rates: compute {b.compute_us:.1f} us, memory {b.memory_us:.1f} us, "
          f"network {b.network_us:.1f} us -> {b.binding}-bound")
    print(f"optimal: {b.optimal_tokens_per_s_per_gpu:.1f} tokens/s per GPU "
          f"({gpu.peak_tflops:g} TFLOP/s / (2 x {pc.active / 1e9:.2f}B active params))")
    return 0


# ---- solve -------------------------------------------------------------------------------------

def add_solve_parser(sub: argparse._SubParsersAction) -> None:
    from nfsearch.config import SolveConfig

    d = SolveConfig()
    p = sub.add_parser("solve", help="search a nano-batch schedule and write it as YAML")
    p.add_argument("--model", default=d.model,
                   help=f"built-in name ({', '.join(model_names())}) or a HF config.json / its folder "
                        "(default: %(default)s)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--gpu", default=d.gpu, help=f"one of {', '.join(g.name for g in builtin_gpus())}: "
                     "its shipped profile, else an analytic roofline profile (default: the detected GPU, "
                     "else h200)")
    src.add_argument("--profile", default=d.profile, help="a profile file (docs/profile-format.md)")
    p.add_argument("--tp", type=int, default=d.tp, help="tensor-parallel degree (default: %(default)s)")
    p.add_argument("--workload", default=d.workload,
                   help=f"{', '.join(w.name for w in builtin_workloads())} or const:IN:OUT "
                        "(default: %(default)s)")
    p.add_argument("--dense-batch", type=int, default=d.dense_batch,
                   help="tokens per iteration (default: %(default)s)")
    p.add_argument("--policy", choices=("auto", "sequential", "overlap"), default=d.policy,
                   help="auto: search; sequential: one nano-batch, one stream, all SMs; overlap: the "
                        "best searched schedule even when predicted slower than sequential (to measure "
                        "the cost model) (default: %(default)s)")
    p.add_argument("--min-gain", type=float, default=d.min_gain,
                   help="auto keeps a searched schedule only if predicted at least this fraction faster "
                        "per iteration than sequential, else returns sequential (default: %(default)s)")
    p.add_argument("--max-nano-batches", type=int, default=d.max_nano_batches,
                   help="largest nano-batch count tried (default: %(default)s)")
    p.add_argument("--gather-form", action="store_true", default=d.gather_form,
                   help="TP: let the search run the first nano-batches' attention output in the "
                        "all-gather form (all-gather, column-parallel O, all-gather) instead of o_proj + "
                        "all-reduce; the profile must hold those ops (docs/tensor-parallel.md)")
    p.add_argument("--structure-family", action="store_true", default=d.structure_family,
                   help="also run stage 2 on a family of two-nano-batch structures whose first "
                        "nano-batch holds the decode tokens (docs/formulation.md, [S1.family])")
    p.add_argument("--time-limit", type=float, default=d.time_limit_s,
                   help="solver budget in seconds of CP-SAT deterministic time, about wall seconds; "
                        "deterministic so the same inputs give the same schedule (default: %(default)s)")
    p.add_argument("-o", "--output", default=d.output,
                   help="schedule path (default: schedules/<model>-<gpu>-tp<N>-<workload>.yaml)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_solve)


def run_solve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nfrt.schedule import save_schedule

    from nfsearch.config import SolveConfig
    from nfsearch.plan import default_output, plan
    from nfsearch.show import summary

    cfg = SolveConfig(model=args.model, gpu=args.gpu, profile=args.profile, tp=args.tp,
                      workload=args.workload, dense_batch=args.dense_batch, policy=args.policy,
                      max_nano_batches=args.max_nano_batches, time_limit_s=args.time_limit,
                      output=args.output, gather_form=args.gather_form, min_gain=args.min_gain,
                      structure_family=args.structure_family)
    if not args.json:
        print(f"solving {cfg.model} ({cfg.workload}, dense batch {cfg.dense_batch}, tp {cfg.tp}, "
              f"policy {cfg.policy}, time limit {cfg.time_limit_s:g} s) ...", file=sys.stderr, flush=True)
    r = plan(cfg)
    out = Path(cfg.output) if cfg.output else default_output(cfg, r.schedule.metadata.model_config, r.gpu)
    save_schedule(r.schedule, out)
    pred = r.schedule.prediction
    if args.json:
        _print_json({
            "schedule_path": str(out), "model": r.schedule.metadata.model, "gpu": r.gpu.name,
            "profile": r.profile_note, "profile_source": r.profile.meta.source,
            "solver_status": r.solution.status, "objective_gap": r.solution.objective_gap,
            "solve_time_s": r.solution.solve_time_s, "num_nano_batches": r.solution.num_nano_batches,
            "splits": r.solution.splits,
            "partitions": {k: v for k, v in r.solution.partitions.items() if r.solution.stream_order.get(k)},
            "predicted_period_us": pred.period_us, "predicted_iteration_us": pred.iteration_us,
            "predicted_tokens_per_s_per_gpu": pred.tokens_per_s_per_gpu,
            "optimal_tokens_per_s_per_gpu": pred.optimal_tokens_per_s_per_gpu,
            "fraction_of_bound": pred.fraction_of_bound,
            "predicted_speedup_vs_sequential": pred.speedup_vs_sequential,
            "sequential_iteration_us": r.sequential.iteration_us,
        })
        return 0
    print(f"profile: {r.profile_note}")
    if r.solution.message:
        print(f"solver: {r.solution.message}")
    print(summary(r.schedule))
    print(f"wrote {out}")
    return 0


# ---- show --------------------------------------------------------------------------------------

def add_show_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="summarise a schedule; --gantt draws one layer period as a PNG")
    p.add_argument("schedule", help="a schedule YAML file")
    p.add_argument("--gantt", metavar="PNG", default=None, help="write a Gantt chart of one layer period")
    p.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    from nfrt.schedule import load_schedule

    from nfsearch.show import gantt, summary

    schedule = load_schedule(args.schedule)
    print(summary(schedule))
    if args.gantt:
        print(f"wrote {gantt(schedule, args.gantt)}")
    return 0


# ---- GPU commands (their modules import torch only when run) ----------------------------------

def add_profile_parser(sub: argparse._SubParsersAction) -> None:
    from nfsearch.profiler.command import add_parser

    add_parser(sub)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from nfsearch.bench import add_parser

    add_parser(sub)


def add_ceiling_parser(sub: argparse._SubParsersAction) -> None:
    from nfsearch.ceiling_measure import add_parser

    add_parser(sub)


# ---- entry point -------------------------------------------------------------------------------

_PARSERS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_models_parser, add_bound_parser, add_solve_parser, add_show_parser, add_profile_parser,
    add_bench_parser, add_ceiling_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nfsearch",
                                     description="Offline auto-search compiler for nano-batch LLM serving.")
    parser.add_argument("--version", action="version", version=f"nfsearch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the error (or --help)
        return e.code if isinstance(e.code, int) else 2
    # the command line itself: `--tp N` re-runs it as N processes (nfsearch.launch.relaunch)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return args.func(args)
    except (NfsearchError, NfrtError) as e:
        msg = " ".join(str(e).split())  # one line, whatever the message held
        print(f"nfsearch: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
