"""GPU datasheet numbers: the ceilings for the bound and the analytic profile, and SM partitioning.

Peak rates are dense bf16 tensor-core FLOP/s, HBM bandwidth and NVLink bandwidth per direction per
GPU from NVIDIA's datasheets. Memory is what the driver reports as usable (a little under the
marketing number): H100 SXM 81559 MiB, H200 143771 MiB, A100 80GB 81920 MiB.

SM partitions come from green contexts (`cuDevSmResourceSplitByCount`): on compute capability 9.0
a group has at least 8 SMs in multiples of 8; on 8.x at least 4 in multiples of 2 (the CUDA driver
API's documented guideline; the driver reports it as `minSmPartitionSize`/`smCoscheduledAlignment`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from nfsearch.errors import NfsearchError
from nfsearch.models import did_you_mean


@dataclass(frozen=True)
class GpuSpec:
    name: str  # slug, e.g. "h100-sxm"
    display_name: str
    peak_tflops: float  # dense bf16
    hbm_gbps: float  # GB/s (1e9 bytes)
    nvlink_gbps: float  # GB/s per direction per GPU
    num_sms: int
    memory_gib: float  # usable device memory
    sm_granularity: int  # partition sizes are multiples of this
    min_partition_sms: int = 0  # smallest green-context group; 0 means sm_granularity
    # SMs the driver's split into `sm_granularity`-SM groups covers (the rest is an unaligned
    # remainder that only a whole-GPU partition uses); nano-ops side by side share at most these.
    # 0 means num_sms rounded down to the granularity.
    placeable_sms: int = 0

    def __post_init__(self) -> None:
        for f in ("peak_tflops", "hbm_gbps", "nvlink_gbps", "memory_gib"):
            v = getattr(self, f)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise NfsearchError(f"gpu {self.name!r}: {f} must be a positive number, got {v!r}")
        for f in ("num_sms", "sm_granularity"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise NfsearchError(f"gpu {self.name!r}: {f} must be a positive integer, got {v!r}")
        if self.min_partition_sms == 0:
            object.__setattr__(self, "min_partition_sms", self.sm_granularity)
        if self.placeable_sms == 0:
            object.__setattr__(self, "placeable_sms", self.num_sms - self.num_sms % self.sm_granularity)
        if self.placeable_sms % self.sm_granularity or not 0 < self.placeable_sms <= self.num_sms:
            raise NfsearchError(f"gpu {self.name!r}: placeable_sms {self.placeable_sms} must be a multiple "
                                f"of sm_granularity {self.sm_granularity} within 1..{self.num_sms}")
        if self.min_partition_sms % self.sm_granularity or not 0 < self.min_partition_sms <= self.num_sms:
            raise NfsearchError(f"gpu {self.name!r}: min_partition_sms {self.min_partition_sms} must be a "
                                f"multiple of sm_granularity {self.sm_granularity} within 1..{self.num_sms}")

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gbps * 1e9

    @property
    def nvlink_bytes_per_s(self) -> float:
        return self.nvlink_gbps * 1e9

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    def with_overrides(self, peak_tflops: float | None = None, hbm_gbps: float | None = None,
                       nvlink_gbps: float | None = None) -> GpuSpec:
        """The same GPU with measured ceilings in place of datasheet ones (None keeps a value)."""
        changes = {k: v for k, v in (("peak_tflops", peak_tflops), ("hbm_gbps", hbm_gbps),
                                     ("nvlink_gbps", nvlink_gbps)) if v is not None}
        return replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "display_name": self.display_name, "peak_tflops": self.peak_tflops,
                "hbm_gbps": self.hbm_gbps, "nvlink_gbps": self.nvlink_gbps, "num_sms": self.num_sms,
                "memory_gib": self.memory_gib, "sm_granularity": self.sm_granularity,
                "min_partition_sms": self.min_partition_sms, "placeable_sms": self.placeable_sms}


# placeable_sms 120 on Hopper: on an H200 (2026-11-21, driver 580.159.04)
# cuDevSmResourceSplitByCount(16, all 132 SMs, 0, 8) made 15 groups of 8 and a remainder of 12
# (groups follow the chip's GPC layout); H100 SXM5 has the same 132-SM configuration.
_BUILTINS: tuple[GpuSpec, ...] = (
    GpuSpec("h100-sxm", "NVIDIA H100 SXM5 80GB", peak_tflops=989.4, hbm_gbps=3350.0, nvlink_gbps=450.0,
            num_sms=132, memory_gib=81559 / 1024, sm_granularity=8, placeable_sms=120),
    GpuSpec("h200", "NVIDIA H200 141GB", peak_tflops=989.4, hbm_gbps=4800.0, nvlink_gbps=450.0,
            num_sms=132, memory_gib=143771 / 1024, sm_granularity=8, placeable_sms=120),
    GpuSpec("a100-80gb", "NVIDIA A100 SXM4 80GB", peak_tflops=312.0, hbm_gbps=2039.0, nvlink_gbps=300.0,
            num_sms=108, memory_gib=80.0, sm_granularity=2, min_partition_sms=4),
)
_BY_NAME = {g.name: g for g in _BUILTINS}

# Substrings of `torch.cuda.get_device_name()` / nvidia-smi names, most specific first.
_DEVICE_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    ("h200", "h200"),
    ("h100 80gb hbm3", "h100-sxm"),
    ("h100 sxm", "h100-sxm"),
    ("a100-sxm4-80gb", "a100-80gb"),
    ("a100 80gb", "a100-80gb"),
    ("a100-80gb", "a100-80gb"),
)


def builtin_gpus() -> tuple[GpuSpec, ...]:
    return _BUILTINS


def resolve_gpu(name: str) -> GpuSpec:
    gpu = _BY_NAME.get(name) or _BY_NAME.get(gpu_slug_for_device_name(name) or "")
    if gpu is not None:
        return gpu
    valid = list(_BY_NAME)
    raise NfsearchError(f"unknown GPU {name!r}; valid: {', '.join(valid)}{did_you_mean(name, valid)}")


def gpu_slug_for_device_name(device_name: str) -> str | None:
    """The built-in slug of a CUDA device name ("NVIDIA H200" -> "h200"), or None if not built in.

    An H100 PCIe or NVL has other clocks and bandwidth than the SXM part, so it maps to None.
    """
    low = device_name.lower()
    for pattern, slug in _DEVICE_NAME_PATTERNS:
        if pattern in low:
            return slug
    return None


def partition_sizes(gpu: GpuSpec) -> tuple[int, ...]:
    """SM counts a green-context partition may have, ascending; the whole GPU is always last."""
    sizes = range(gpu.min_partition_sms, gpu.num_sms + 1, gpu.sm_granularity)
    return tuple(sorted({*sizes, gpu.num_sms}))
