"""`nfsearch profile`: measure a model's op latencies and interference on this GPU (or --plot a profile).

Imports no torch (nor pandas, via nfsearch.profile) at module import time: the CLI builds its
parser on machines without them, and measuring imports `nfsearch.profiler.measure` only once a
CUDA GPU is known to be there.

`--tp N` (N > 1) re-runs the command as N processes, one per GPU (`nfsearch.launch.relaunch`);
each rank times its shard of the model and the collectives between them, in lockstep, and rank 0
writes the profile (nfsearch.profiler.run). `--add-sustained` and `--add-ops` extend an existing
profile (nfsearch.profiler.sustained, nfsearch.profiler.addops) the same way, rank 0 writing.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from nfrt.config import ModelConfig

from nfsearch.config import SolveConfig
from nfsearch.errors import NfsearchError
from nfsearch.gpus import gpu_slug_for_device_name, resolve_gpu
from nfsearch.models import check_tp, model_names, resolve_model

# The layer of the default workload: its power draw is the pipeline's (RESULTS.md, session 12).
DEFAULT_HEAT = SolveConfig().workload


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure kernel latency vs SMs and interference on this GPU")
    p.add_argument("--model", help=f"built-in name ({', '.join(model_names())}) or a HF config.json / its "
                                   "folder")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="profile path (default: profiles/<gpu-slug>/<model>-tp<N>.json)")
    p.add_argument("--quick", action="store_true", help="a coarse grid (about 2 minutes)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>.partial.json, skipping what it holds")
    p.add_argument("--add-sustained", action="store_true",
                   help="measure only the sustained-clock table (each layer op timed between replays of "
                        "the --heat heater, at the power-limited clock) and write the existing profile at "
                        "--out / the default path with it")
    p.add_argument("--add-ops", action="store_true",
                   help="measure only the layer ops the existing profile (--profile, else --out / the "
                        "default path) lacks, e.g. the all-gather form's attn_allgather, o_proj_col and "
                        "o_allgather under --tp, on its own SM and token grids (and its sustained table), "
                        "and write it with them added at --out (default: the file read); every other row "
                        "is kept")
    p.add_argument("--heat", default=None, metavar="gemm|WORKLOAD",
                   help="the heater the sustained table is held against: a workload (the model's own "
                        "layer on its batch, as solve composes it) or gemm (two bf16 8192^3 GEMMs); "
                        f"default: {DEFAULT_HEAT} on a built-in GPU, gemm on others; --add-ops: the "
                        "profile's own")
    p.add_argument("--device", type=int, default=0, help="CUDA device index (default: %(default)s)")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="draw P(R) curves per op kind of an existing profile (--profile, or the one at "
                        "--out / profiles/<--gpu>/<model>-tp<N>.json) instead of measuring")
    p.add_argument("--show", action="store_true",
                   help="print a summary (latencies, P(R), interference) of an existing profile")
    p.add_argument("--profile", default=None, help="with --plot / --show / --add-ops: the profile file")
    p.add_argument("--gpu", default=None, help="with --plot / --show: the GPU slug of a shipped profile")
    p.set_defaults(func=run_profile_command)


def shipped_profiles(root: Path | None = None) -> list[str]:
    """'<gpu>/<model>-tp<N>' of every profile under profiles/."""
    from nfsearch.profile import profiles_root

    r = root if root is not None else profiles_root()
    return sorted(f"{p.parent.name}/{p.stem}" for p in r.glob("*/*.json") if ".partial" not in p.name)


def _no_gpu_error(why: str) -> NfsearchError:
    have = shipped_profiles()
    listing = ", ".join(have) if have else "none"
    return NfsearchError(f"nfsearch profile needs a CUDA GPU ({why}); shipped profiles: {listing} "
                         "(nfsearch solve --gpu <slug> uses them)")


def _slugify(device_name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", device_name.lower().replace("nvidia", "")).strip("-")
    return s or "gpu"


def run_profile_command(args: argparse.Namespace) -> int:
    if args.tp < 1:
        raise NfsearchError(f"--tp must be >= 1, got {args.tp}")
    if args.plot or args.show:
        return _plot(args)
    if not args.model:
        raise NfsearchError("nfsearch profile: --model is required (or --plot PNG to draw a profile)")
    if getattr(args, "add_ops", False) and (args.add_sustained or args.resume):
        other = "--add-sustained" if args.add_sustained else "--resume"
        raise NfsearchError(f"nfsearch profile: --add-ops does not combine with {other}")
    model = resolve_model(args.model)
    try:
        import torch
    except ImportError:
        raise _no_gpu_error("torch is not installed") from None
    if not torch.cuda.is_available():
        raise _no_gpu_error("torch.cuda.is_available() is False")
    if args.device >= torch.cuda.device_count():
        raise NfsearchError(f"--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s)")
    group = None
    if args.tp > 1:
        from nfsearch.launch import relaunch

        check_tp(model, args.tp)  # before starting N processes
        code = relaunch(args.tp, getattr(args, "argv", None))
        if code is not None:
            return code
        from nfrt.tp import TPGroup

        group = TPGroup.from_env("cuda")
        args.device = group.device.index  # one GPU per rank (LOCAL_RANK); --device does not apply
    try:
        return _measure(args, model, torch, group)
    finally:
        if group is not None:
            group.close()


def _measure(args: argparse.Namespace, model: ModelConfig, torch: Any, group: Any) -> int:
    """Profile on this GPU (under TP: this rank's, in lockstep with the others; rank 0 writes)."""
    leader = group is None or group.rank == 0

    from nfsearch.profile import profile_filename, profiles_root
    from nfsearch.profiler.grid import fit_to_model, full_grid, quick_grid, with_heat
    from nfsearch.profiler.measure import GpuTimer
    from nfsearch.profiler.run import run_profile

    name = torch.cuda.get_device_name(args.device)
    props = torch.cuda.get_device_properties(args.device)
    slug = gpu_slug_for_device_name(name)
    spec = None
    if slug is not None:
        spec = resolve_gpu(slug)
        gran, min_sms, nvlink = spec.sm_granularity, spec.min_partition_sms, spec.nvlink_gbps
        placed = spec.placeable_sms
    else:
        slug = _slugify(name)
        gran, min_sms, nvlink = (8, 8, 0.0) if props.major >= 9 else (2, 4, 0.0)
        placed = None
        if leader:
            print(f"warning: {name} is not a built-in GPU; writing under profiles/{slug}/ (nfsearch "
                  f"solve --profile FILE can use it)", file=sys.stderr)
    grid = fit_to_model((quick_grid if args.quick else full_grid)(props.multi_processor_count, gran, min_sms,
                                                                  placed), model)
    out = Path(args.out) if args.out else profiles_root() / slug / profile_filename(model.name, args.tp)
    t0 = time.perf_counter()
    heat = getattr(args, "heat", None)
    if getattr(args, "add_ops", False):
        return _add_ops(args, model, grid, out, group, leader, t0, spec, heat)
    grid = with_heat(grid, model, args.tp, heat or (DEFAULT_HEAT if spec is not None else "gemm"), spec)
    base = None
    if args.add_sustained:
        from nfsearch.profile import load_profile

        base = load_profile(out)  # before the timer: a wrong path fails in seconds
    timer = GpuTimer(model, args.tp, grid, device=args.device, group=group)
    if base is not None:
        from nfsearch.profiler.sustained import add_sustained

        prof = add_sustained(base, model, args.tp, grid, timer, out, props.multi_processor_count,
                             leader=leader, progress=_progress)
        if leader:
            f = prof.sustained["factor"]
            print(f"wrote {out}: its {len(prof.latency)} latency rows and a sustained table of "
                  f"{len(prof.sustained)} points (factor {f.min():.3f}..{f.max():.3f}) in "
                  f"{time.perf_counter() - t0:.0f} s")
        return 0
    prof = run_profile(model, args.tp, grid, timer, out, gpu_slug=slug, sm_granularity=gran,
                       nvlink_gbps=nvlink, resume=args.resume, progress=_progress,
                       grid_name="quick" if args.quick else "full", leader=leader,
                       barrier=group.barrier if group is not None else None)
    dt = time.perf_counter() - t0
    if leader:
        nv = f", all-reduce bus {prof.meta.nvlink_gbps:.0f} GB/s over {args.tp} GPUs" if group else ""
        print(f"wrote {out}: {len(prof.latency)} latency rows, {len(prof.interference)} interference rows "
              f"in {dt:.0f} s; measured peak {prof.meta.peak_tflops:.0f} TFLOP/s, "
              f"copy {prof.meta.hbm_gbps:.0f} GB/s{nv}; peak GPU memory reserved "
              f"{torch.cuda.max_memory_reserved(args.device) / 2**30:.1f} GiB")
    return 0


def _add_ops(args: argparse.Namespace, model: ModelConfig, base_grid: Any, out: Path, group: Any,
             leader: bool, t0: float, gpu: Any, heat: str | None) -> int:
    """--add-ops: read the profile, measure the layer ops it lacks, write it with them (rank 0)."""
    from nfsearch.profile import load_profile
    from nfsearch.profiler.addops import add_ops, add_ops_grid, missing_ops, profile_heat
    from nfsearch.profiler.measure import GpuTimer

    src = Path(args.profile) if args.profile else out
    dst = Path(args.out) if args.out else src
    base = load_profile(src)  # before the timer: a wrong path or a complete profile fails in seconds
    grid = add_ops_grid(base, model, args.tp, profile_heat(base, model, args.tp, base_grid, gpu,
                                                           heat, DEFAULT_HEAT))
    ops = missing_ops(base, model, args.tp)
    timer = GpuTimer(model, args.tp, grid, device=args.device, group=group)
    prof = add_ops(base, model, args.tp, grid, timer, dst, leader=leader, progress=_progress)
    if leader:
        print(f"wrote {dst}: {len(prof.latency) - len(base.latency)} latency rows of {', '.join(ops)} and "
              f"{len(prof.sustained) - len(base.sustained)} sustained rows added to the {len(base.latency)} "
              f"of {src} in {time.perf_counter() - t0:.0f} s")
    return 0


def _progress(total: int, done: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, unit="pt", desc="profile", mininterval=2.0, file=sys.stderr)


def _plot(args: argparse.Namespace) -> int:
    from nfsearch.profile import load_profile, profile_filename, profiles_root
    from nfsearch.profiler.plot import plot_pr, summary_text

    if args.profile:
        path = Path(args.profile)
    elif args.out:
        path = Path(args.out)
    else:
        if not (args.model and args.gpu):
            raise NfsearchError("--plot needs --profile FILE, or --model and --gpu of a shipped profile")
        model = resolve_model(args.model)
        path = profiles_root() / resolve_gpu(args.gpu).name / profile_filename(model.name, args.tp)
    prof = load_profile(path)
    if args.show:
        print(summary_text(prof))
    if args.plot:
        print(f"wrote {plot_pr(prof, args.plot)} (P(R) of {path})")
    return 0
