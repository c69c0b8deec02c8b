"""The GPU side of `nfsearch bench`: ceilings, interleaved CUDA-graph timings, the output check
and the per-nano-op breakdown, and the numbers the record derives from them (per-GPU speed, the
bound with the measured ceilings, the breakdown summary). torch is imported inside the functions
(the CLI module `nfsearch.bench` stays importable without it).

Under tensor parallelism every rank runs `measure` (the same calls in the same order: the graphs
hold collectives) in its own process; a barrier after a device synchronize starts each timed
iteration, so that no rank's times include another's late start."""

from __future__ import annotations

import contextlib
import statistics
import sys
from datetime import UTC, datetime
from functools import partial
from typing import Any

from nfrt.schedule import Schedule

from nfsearch.bench import ALLREDUCE_BYTES, COPY_BYTES, GEMM_N, BenchConfig
from nfsearch.errors import NfsearchError


def measure(cfg: BenchConfig, schedule: Schedule) -> dict[str, Any]:
    """Ceilings, interleaved timings, the output check and (optionally) the per-nano-op breakdown;
    at tp > 1 in every rank of the torchrun world, with the all-reduce ceiling too."""
    import torch
    from nfrt.engine import Engine

    date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    group = None
    if schedule.metadata.tp > 1:
        from nfrt.tp import TPGroup

        group = TPGroup.from_env("cuda")  # sets this rank's device (LOCAL_RANK)
    dev = group.device if group is not None else torch.device("cuda", torch.cuda.current_device())
    try:
        env = _environment(dev, group)
        peak_tflops, copy_gbps = ceilings(dev)
        nvlink_gbps = allreduce_busbw_gbps(group) if group is not None else None
        env["nvlink_allreduce_busbw_gbps"] = nvlink_gbps
        engine = Engine.from_schedule(schedule, device=dev, seed=cfg.seed, use_partitions=cfg.partitions,
                                      tp_group=group)
        twin = engine.sequential_twin()
        try:
            batch = engine.synthetic_batch(seed=cfg.seed)  # the same batch on every rank (seeded)
            for eng in (engine, twin):
                eng.prepare(batch)
                eng.capture()
            # The model is bound to the twin's buffers now: the eager runs read the same batch.
            runs = {"nano": engine.replay, "sequential": twin.replay,
                    "sequential_eager": engine.model.forward_sequential}
            samples = _time_interleaved(runs, cfg.warmup, cfg.iters, group)
            check = _check(engine, twin, seed=cfg.seed + 1)
            breakdown = _breakdown(engine, twin, group) if cfg.breakdown else None
            timeline = None
            if cfg.timeline:
                from nfsearch.bench_timeline import measure_timeline

                timeline = measure_timeline(engine, cfg.partitions, cfg.seed)
        finally:
            engine.close()
            twin.close()
        if group is not None:
            group.barrier()  # every rank done with the communicators before any tears them down
    finally:
        if group is not None:
            group.close()
    return {"date": date, "env": env, "peak_tflops": peak_tflops, "copy_gbps": copy_gbps,
            "nvlink_gbps": nvlink_gbps, "tokens": batch.num_tokens, "samples_us": samples, "check": check,
            "breakdown": breakdown, "timeline": timeline}


def _sync(group) -> None:
    """Idle GPU, and (under TP) every rank past the same point: a timed block starts together."""
    import torch

    torch.cuda.synchronize()
    if group is not None:
        group.barrier()


def allreduce_busbw_gbps(group, nbytes: int = ALLREDUCE_BYTES, reps: int = 10) -> float:
    """NVLink ceiling: bus bandwidth (GB/s) of an in-place bf16 all-reduce of `nbytes` over the group
    (no CTA cap), median of `reps` after 3 warm-ups: 2 (n - 1) / n * bytes / time, the bytes a GPU
    sends per second in a ring, as `nfsearch.opgraph` counts an all-reduce's net_bytes."""
    import torch

    x = torch.zeros(nbytes // 2, device=group.device, dtype=torch.bfloat16)  # zeros: sums never overflow
    _sync(group)
    t_us = _event_median_us(partial(group.all_reduce, x), 3, reps)
    del x
    torch.cuda.empty_cache()
    n = group.size
    return 2 * (n - 1) / n * nbytes / (t_us * 1e-6) / 1e9


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


def nccl_version() -> str | None:
    """torch's NCCL as "major.minor.patch"; None without one."""
    import torch

    with contextlib.suppress(Exception):  # a build without NCCL raises (varies by version)
        v = torch.cuda.nccl.version()
        return ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
    return None


def _environment(dev, group=None) -> dict[str, Any]:
    from importlib import metadata

    import torch

    from nfsearch.gpus import gpu_slug_for_device_name

    props = torch.cuda.get_device_properties(dev)
    size = group.size if group is not None else 1
    versions = {}
    for pkg in ("triton", "cuda-bindings"):
        try:
            versions[pkg.replace("-", "_")] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg.replace("-", "_")] = None
    return {"gpu_name": props.name, "gpu_slug": gpu_slug_for_device_name(props.name),
            "num_sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
            "driver": driver_version(dev.index), "cuda": torch.version.cuda, "torch": torch.__version__,
            **versions, "python": sys.version.split()[0], "nccl": nccl_version(),
            "tp": size, "world_size": size}


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


def _time_interleaved(runs: dict[str, Any], warmup: int, iters: int, group=None) -> dict[str, list[float]]:
    """Each iteration runs every entry once from an idle GPU (under TP: after a barrier), in
    alternating order (drift cancels)."""
    import torch
    from tqdm import tqdm

    from nfsearch.launch import is_leader

    names = list(runs)
    timed: dict[str, list] = {n: [] for n in names}
    bar = None if is_leader() else True  # None: tqdm decides (a terminal); True: off
    for i in tqdm(range(warmup + iters), desc="bench", unit="iter", file=sys.stderr, disable=bar):
        _sync(group)
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


def _breakdown(engine, twin, group=None, reps: int = 3) -> dict[str, Any]:
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
            eng.model.comm = eng.comms[si]  # the stream's communicator, as in the graph
            for _ in range(reps):
                _sync(group)
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


def speed(samples_us: list[float], tokens: int, optimal_tokens_per_s: float, tp: int = 1) -> dict[str, Any]:
    """Per-GPU throughput: under TP every rank works on all `tokens` of the iteration (the bound's unit)."""
    med = statistics.median(samples_us)
    tps = tokens / (med * 1e-6) / tp
    return {"median_us": med, "min_us": min(samples_us), "max_us": max(samples_us),
            "tokens_per_s_per_gpu": tps, "tokens_per_s_all_gpus": tps * tp,
            "fraction_of_bound": tps / optimal_tokens_per_s, "samples_us": list(samples_us)}


def bound_for(model, env: dict[str, Any], meta, peak_tflops: float, copy_gbps: float,
              nvlink_gbps: float | None = None):
    """`nfsearch.bound.compute_bound` for the model that ran, with the measured ceilings (the
    all-reduce bus bandwidth `nvlink_gbps` under TP; None keeps the datasheet's, used at tp 1 by
    nothing since a tp 1 layer sends no bytes)."""
    from nfsearch.bound import compute_bound
    from nfsearch.gpus import GpuSpec, resolve_gpu

    gpu = None
    for name in (env.get("gpu_slug"), meta.gpu):
        with contextlib.suppress(NfsearchError):
            gpu = gpu or (resolve_gpu(name) if name else None)
    if gpu is None:  # a GPU nfsearch has no datasheet for: the measured numbers are all we have
        gpu = GpuSpec(name="local", display_name=env.get("gpu_name", "?"), peak_tflops=peak_tflops,
                      hbm_gbps=copy_gbps, nvlink_gbps=nvlink_gbps or 1.0,
                      num_sms=env.get("num_sms", meta.num_sms), memory_gib=env.get("memory_gib", 1.0),
                      sm_granularity=8)
    gpu = gpu.with_overrides(peak_tflops=peak_tflops, hbm_gbps=copy_gbps, nvlink_gbps=nvlink_gbps)
    try:
        return compute_bound(model, gpu, meta.tp, meta.workload, meta.dense_batch)
    except NfsearchError:  # a hand-written schedule's workload label: the optimum does not depend on it
        return compute_bound(model, gpu, meta.tp)


def breakdown_summary(schedule: Schedule, bd: dict[str, Any]) -> dict[str, Any]:
    """Per-nano-op solo times beside the predicted timeline's durations, and per-stream sums."""
    want = {}
    if schedule.prediction is not None:
        want = {e.nano_op: e.end_us - e.start_us for e in schedule.prediction.timeline}
    out: dict[str, Any] = {"layer": bd["layer"]}
    for label in ("nano", "sequential"):
        rows = [dict(r, predicted_us=want.get(r["nano_op"]) if label == "nano" else None) for r in bd[label]]
        busy: dict[str, float] = {}
        for r in rows:
            busy[r["stream"]] = busy.get(r["stream"], 0.0) + r["solo_us"]
        out[label] = {"nano_ops": rows, "stream_busy_us": busy}
    pbusy: dict[str, float] = {}
    for st in schedule.streams:
        pbusy[st.name] = sum(want.get(n.name, 0.0) for n in st.nano_ops)
    out["nano"]["predicted_stream_busy_us"] = pbusy if want else None
    return out
