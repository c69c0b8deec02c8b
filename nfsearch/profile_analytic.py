"""An analytic roofline profile from datasheet ceilings, for GPUs without a measured one.

Per op and grid point (tokens, context, SMs), with the op's per-GPU cost from the op graph:

    latency_us = 1e6 * max(flops / (peak * c(s)), hbm_bytes / (hbm * m(s)), net_bytes / nvlink)
                 + LAUNCH_OVERHEAD_US            (tokens > 0; exactly 0 at tokens == 0)
    c(s) = s / num_sms                          GEMM speed is proportional to SMs
    m(s) = min(1, s / s_sat), s_sat = round(HBM_SATURATION_FRACTION * num_sms)

The HBM term saturates early because a streaming kernel needs only about a third of the SMs to
keep HBM busy (48 of 132 SMs on an H200: /work/shared/DESIGN.md). Interference uses fixed
defaults from the H200 measurement (GEMM beside SDPA decode ran 10-15% slower). docs/profile-format.md
states the same formulas.
"""

from __future__ import annotations

import datetime as _dt

import numpy as np
import pandas as pd
from nfrt.config import ModelConfig

import nfsearch
from nfsearch.errors import NfsearchError
from nfsearch.gpus import GpuSpec, partition_sizes
from nfsearch.opgraph import layer_ops, tail_ops
from nfsearch.profile import INTERFERENCE_COLUMNS, LATENCY_COLUMNS, Profile, ProfileMeta

LAUNCH_OVERHEAD_US = 4.0  # per op (one kernel each): launch plus ramp-up/tail of a short kernel
HBM_SATURATION_FRACTION = 0.36  # SMs needed to saturate HBM with a streaming kernel (48/132, H200)
DEFAULT_CONTEXTS = (1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# (kind, other_kind) -> slowdown of `kind` while `other_kind` runs on the other SMs
DEFAULT_INTERFERENCE: dict[tuple[str, str], float] = {
    ("compute", "memory"): 1.10,
    ("memory", "compute"): 1.05,
    ("compute", "network"): 1.05,
    ("network", "compute"): 1.05,
    ("memory", "network"): 1.05,
    ("network", "memory"): 1.05,
}


def default_token_grid(max_tokens: int = 4096) -> tuple[int, ...]:
    """0, 1, 2, 4, ..., 64, then every 64 up to 512, every 128 up to 2048, every 256 up to 4096,
    and so on (the step doubles with each doubling of tokens); max_tokens itself is always in."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise NfsearchError(f"analytic profile: max_tokens must be a positive integer, got {max_tokens!r}")
    pts = {0, 1, 2, 4, 8, 16, 32, max_tokens}
    t = 64
    while t < max_tokens:
        pts.add(t)
        # step 64 below 512; above, 1/16 of the next power of two (at least 128)
        t += 64 if t < 512 else max(128, (1 << t.bit_length()) // 16)
    return tuple(sorted(x for x in pts if x <= max_tokens))


def hbm_saturation_sms(num_sms: int) -> int:
    return max(1, round(HBM_SATURATION_FRACTION * num_sms))


def analytic_profile(model: ModelConfig, gpu: GpuSpec, tp: int = 1, max_tokens: int = 4096,
                     contexts: tuple[int, ...] = DEFAULT_CONTEXTS, gather: bool = False) -> Profile:
    """A roofline profile of every layer and tail op of `model` on `gpu` (source "analytic");
    `gather`: with the ops of the all-gather form of the attention output too (TP only)."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise NfsearchError(f"analytic profile: tp must be a positive integer, got {tp!r}")
    ctx_grid = tuple(sorted(set(contexts)))
    if not ctx_grid or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in ctx_grid):
        raise NfsearchError(f"analytic profile: contexts must be positive integers, got {contexts!r}")
    tokens = default_token_grid(max_tokens)
    sms = np.asarray(partition_sizes(gpu), dtype=np.float64)  # [S]
    s_sat = hbm_saturation_sms(gpu.num_sms)
    inv_c = gpu.num_sms / sms  # 1 / c(s)
    inv_m = np.maximum(1.0, s_sat / sms)  # 1 / m(s)
    peak, hbm, net = gpu.peak_flops, gpu.hbm_bytes_per_s, gpu.nvlink_bytes_per_s

    cols: dict[str, list] = {c: [] for c in LATENCY_COLUMNS}
    ops = {op.name: op for op in (*layer_ops(model, tp, gather), *tail_ops(model, tp))}
    for name, op in ops.items():
        # an op whose cost moves with context gets the context grid; others are profiled at 0
        probe = 64
        dep_ctx = op.cost(probe, ctx_grid[0]) != op.cost(probe, ctx_grid[-1])
        for ctx in (ctx_grid if dep_ctx else (0,)):
            for t in tokens:
                if t == 0:
                    lat = np.zeros_like(sms)
                else:
                    c = op.cost(t, ctx)
                    secs = np.maximum(c.flops / peak * inv_c, c.hbm_bytes / hbm * inv_m)
                    secs = np.maximum(secs, c.net_bytes / net)
                    lat = secs * 1e6 + LAUNCH_OVERHEAD_US
                n = len(sms)
                cols["op"] += [name] * n
                cols["tokens"] += [t] * n
                cols["context"] += [ctx] * n
                cols["num_sms"] += sms.astype(int).tolist()
                cols["latency_us"] += lat.tolist()
    latency = pd.DataFrame(cols)

    inter_rows = [(k, o, int(s), v) for (k, o), v in sorted(DEFAULT_INTERFERENCE.items()) for s in sms]
    interference = pd.DataFrame(inter_rows, columns=list(INTERFERENCE_COLUMNS))
    meta = ProfileMeta(
        source="analytic", model=model.name, tp=tp, gpu=gpu.name, gpu_name=gpu.display_name,
        num_sms=gpu.num_sms, sm_granularity=gpu.sm_granularity, peak_tflops=gpu.peak_tflops,
        hbm_gbps=gpu.hbm_gbps, nvlink_gbps=gpu.nvlink_gbps,
        date=_dt.datetime.now(_dt.UTC).date().isoformat(), nfsearch_version=nfsearch.__version__,
        notes=_notes(s_sat))
    return Profile(meta, latency, interference)


def _notes(s_sat: int) -> str:
    pairs = ", ".join(f"{k}/{o} {v:.2f}" for (k, o), v in sorted(DEFAULT_INTERFERENCE.items()))
    return (f"analytic roofline from datasheet ceilings, not measured: latency = max(flops/(peak*s/num_sms), "
            f"hbm_bytes/(hbm*min(1, s/{s_sat})), net_bytes/nvlink) + {LAUNCH_OVERHEAD_US:g} us launch "
            f"overhead per op; HBM saturates at {s_sat} SMs ({HBM_SATURATION_FRACTION:.0%} of the GPU); "
            f"interference defaults (kind/other_kind slowdown): {pairs}, after the H200 measurement of "
            f"10-15% slower GEMM beside SDPA decode")
