"""Size cuBLAS GEMMs for the SM partition they run on.

cuBLAS picks its kernel and grid for the whole GPU (132 SMs on an H100/H200). Fenced to a
green-context partition of s < 132 SMs, such a GEMM runs its tiles in ceil(tiles / s) waves: on an
H200, a llama3-70b TP-4 QKV GEMM on 120 SMs ran at 0.49 of its all-SM speed. cuBLASLt takes a
target SM count (CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, set by torch's
`_set_sm_carveout_experimental`) and then keeps it at 0.94 (benchmarks/probes/gemm_sm_target.py).
So every GEMM issued on a partition stream runs through cuBLASLt with that target; on all SMs
torch's default backend runs, as before (cuBLASLt is up to 6% slower there on some shapes).

The setting is read when the GEMM is launched, so a CUDA graph captured inside `sized_for(stream)`
keeps it. `NFRT_GEMM_SM_TARGET=0` turns it off (to measure what it buys).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def enabled() -> bool:
    return (os.environ.get("NFRT_GEMM_SM_TARGET", "1") != "0"
            and hasattr(torch._C, "_set_sm_carveout_experimental"))


@contextmanager
def sized_for(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """GEMMs launched inside target the SM count of `stream`'s partition (no-op on all SMs, on
    the CPU, or when disabled)."""
    if stream is None or not enabled():
        yield
        return
    from nfrt.partition import stream_num_sms

    num_sms = stream_num_sms(stream)
    total = torch.cuda.get_device_properties(stream.device).multi_processor_count
    if num_sms >= total:
        yield
        return
    backend = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(total - num_sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(None)
        torch.backends.cuda.preferred_blas_library(backend)
