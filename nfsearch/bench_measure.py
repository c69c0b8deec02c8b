"""The GPU side of `nfsearch bench`: ceilings, interleaved CUDA-graph timings, the output check
and the per-nano-op breakdown. torch is imported inside the functions (the CLI module
`nfsearch.bench` stays importable without it)."""

from __future__ import annotations

import contextlib
import statistics
import sys
from datetime import UTC, datetime
from typing import Any

from nfrt.schedule import Schedule

from nfsearch.bench import COPY_BYTES, GEMM_N, BenchConfig


def measure(cfg: BenchConfig, schedule: Schedule) -> dict[str, Any]:
    """Ceilings, interleaved timings, the output check and (optionally) the per-nano-op breakdown."""
    import torch
    from nfrt.engine import Engine

    date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    dev = torch.device("cuda", torch.cuda.current_device())
    env = _environment(dev)
    peak_tflops, copy_gbps = ceilings(dev)
    engine = Engine.from_schedule(schedule, device=dev, seed=cfg.seed, use_partitions=cfg.partitions)
    twin = engine.sequential_twin()
    try:
        batch = engine.synthetic_batch(seed=cfg.seed)
        for eng in (engine, twin):
            eng.prepare(batch)
            eng.capture()
        # The model is bound to the twin's buffers now: the eager runs read the same batch.
        runs = {"nano": engine.replay, "sequential": twin.replay,
                "sequential_eager": engine.model.forward_sequential}
        samples = _time_interleaved(runs, cfg.warmup, cfg.iters)
        check = _check(engine, twin, seed=cfg.seed + 1)
        breakdown = _breakdown(engine, twin) if cfg.breakdown else None
        timeline = None
        if cfg.timeline:
            from nfsearch.bench_timeline import measure_timeline

            timeline = measure_timeline(engine, cfg.partitions, cfg.seed)
    finally:
        engine.close()
        twin.close()
    return {"date": date, "env": env, "peak_tflops": peak_tflops, "copy_gbps": copy_gbps,
            "tokens": batch.num_tokens, "samples_us": samples, "check": check, "breakdown": breakdown,
            "timeline": timeline}


def driver_version(index: int | None = None) -> str | None:
    """The NVIDIA driver version (of GPU `index`) from nvidia-smi; None when it cannot tell."""
    import subprocess

    cmd = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    if index is not None:
        cmd.append(f"--id={index}")
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
        return out.strip().splitlines()[0] or None
    return None


def _environment(dev) -> dict[str, Any]:
    from importlib import metadata

    import torch

    from nfsearch.gpus import gpu_slug_for_device_name

    props = torch.cuda.get_device_properties(dev)
    versions = {}
    for pkg in ("triton", "cuda-bindings"):
        try:
            versions[pkg.replace("-", "_")] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg.replace("-", "_")] = None
    return {"gpu_name": props.name, "gpu_slug": gpu_slug_for_device_name(props.name),
            "num_sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
            "driver": driver_version(dev.index), "cuda": torch.version.cuda, "torch": torch.__version__,
            **versions, "python": sys.version.split()[0]}


def _event_median_us(fn, warmup: int, reps: int) -> float:
    import torch

    times = []
    for i in range(warmup + reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        if i >= warmup:
            times.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in times)


def ceilings(dev) -> tuple[float, float]:
    """(bf16 GEMM TFLOP/s of an 8192^3 torch.matmul, 1 GiB copy_ GB/s counting read + write); medians.
    `nfsearch profile` measures its ceilings here too, so a profile and a bench agree on them."""
    import torch

    peak, copy = _gemm_tflops(dev), _copy_gbps(dev)
    torch.cuda.empty_cache()  # give the buffers back: the engine's KV cache may need the memory
    return peak, copy


def _gemm_tflops(dev) -> float:
    import torch

    a, b = (torch.randn(GEMM_N, GEMM_N, device=dev, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    return 2 * GEMM_N**3 / (_event_median_us(lambda: torch.matmul(a, b, out=c), 5, 20) * 1e-6) / 1e12


def _copy_gbps(dev) -> float:
    import torch

    src = torch.randn(COPY_BYTES // 2, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / (_event_median_us(lambda: dst.copy_(src), 5, 20) * 1e-6) / 1e9


def _time_interleaved(runs: dict[str, Any], warmup: int, iters: int) -> dict[str, list[float]]:
    """Each iteration runs every entry once from an idle GPU, in alternating order (drift cancels)."""
    import torch
    from tqdm import tqdm

    names = list(runs)
    timed: dict[str, list] = {n: [] for n in names}
    for i in tqdm(range(warmup + iters), desc="bench", unit="iter", file=sys.stderr, disable=None):
        torch.cuda.synchronize()
        for n in (names if i % 2 == 0 else names[::-1]):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            runs[n]()
            e.record()
            if i >= warmup:
                timed[n].append((s, e))
    torch.cuda.synchronize()
    return {n: [s.elapsed_time(e) * 1e3 for s, e in timed[n]] for n in names}


def _rel_err(ours, ref) -> float:
    scale = ref.float().abs().max().item()
    return (ours.float() - ref.float()).abs().max().item() / max(scale, 1e-30)


def _check(engine, twin, seed: int) -> dict[str, Any]:
    """Both graphs and the eager twin on a fresh batch of the same shape; logits poisoned before each."""
    import torch

    batch = engine.synthetic_batch(seed=seed)
    engine.prepare(batch)
    twin.prepare(batch)  # binds the model to the twin's buffers for the eager run
    outs = []
    for fn in (engine.replay, twin.replay, engine.model.forward_sequential):
        engine.model.logits.fill_(float("nan"))
        outs.append(fn().clone())
    torch.cuda.synchronize()
    nano, seq, eager = outs
    finite = bool(all(torch.isfinite(o).all().item() for o in outs))
    return {"max_rel_err": _rel_err(nano, seq) if finite else float("inf"),
            "eager_rel_err": _rel_err(eager, seq) if finite else float("inf"), "finite": finite}


def _breakdown(engine, twin, reps: int = 3) -> dict[str, Any]:
    """Each nano-op of one middle layer alone on its stream (its SM partition), median of `reps`.

    Eager, synchronized between nano-ops: each time includes the host's launch latency (about
    13 us for an empty nano-op), so the small ops read high; a diagnosis, not a profile."""
    import torch

    layer = engine.config.num_layers // 2
    out: dict[str, Any] = {"layer": layer}
    for label, eng in (("nano", engine), ("sequential", twin)):
        eng.prepare(eng.synthetic_batch(seed=0))  # binds the model to this engine's buffers
        rows = []
        for si, nop in eng.order:
            stream, times = eng.streams[si], []
            for _ in range(reps):
                torch.cuda.synchronize()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(stream)
                with torch.cuda.stream(stream):
                    for op in nop.ops:
                        eng.model.run_op(layer, op, *nop.tokens)
                e.record(stream)
                e.synchronize()
                times.append(s.elapsed_time(e) * 1e3)
            rows.append({"nano_op": nop.name, "stream": eng.schedule.streams[si].name,
                         "num_sms": nop.num_sms, "solo_us": statistics.median(times)})
        out[label] = rows
    torch.cuda.synchronize()
    return out
