"""Which SMs does a stream's work run on? Read `%smid` from many short-lived programs.

Used to prove that green-context partitions are disjoint and of the asked size. Each program spins
for `spin_cycles` so that the block scheduler has to spread the launch over every SM the stream
may use; the set of SM ids seen is the stream's SM set.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl


@triton.jit
def clock64():  # the SM cycle counter (%clock64), inside a Triton kernel
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def spin(cycles):  # busy-wait at least `cycles` SM cycles; returns the cycles really spun
    t0 = clock64()
    t = t0
    while t - t0 < cycles:
        t = clock64()
    return t - t0


@triton.jit
def _smid_kernel(out_ptr, spin_cycles):
    smid = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    spin(spin_cycles)
    tl.store(out_ptr + tl.program_id(0), smid)


def sm_ids(stream: torch.cuda.Stream | None = None, num_programs: int = 4096,
           spin_cycles: int = 20000) -> set[int]:
    """The SM ids that `num_programs` one-warp programs launched on `stream` ran on (syncs)."""
    stream = stream or torch.cuda.current_stream()
    out = torch.full((num_programs,), -1, dtype=torch.int32, device=stream.device)
    with torch.cuda.stream(stream):
        _smid_kernel[(num_programs,)](out, spin_cycles, num_warps=1)
    stream.synchronize()
    ids = out.tolist()
    if min(ids) < 0:
        raise RuntimeError("sm_ids: some programs did not record their SM id")
    return set(ids)


def sm_ids_cupy(stream: torch.cuda.Stream | None = None, num_programs: int = 4096,
                spin_cycles: int = 20000) -> set[int]:
    """Same as `sm_ids` through a CuPy RawKernel (cross-check; needs cupy)."""
    import cupy as cp

    src = r'''extern "C" __global__ void smid(int* out, long long spin) {
        unsigned int id; asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
        long long t0 = clock64(); while (clock64() - t0 < spin) {}
        if (threadIdx.x == 0) out[blockIdx.x] = id; }'''
    kern = cp.RawKernel(src, "smid")
    stream = stream or torch.cuda.current_stream()
    out = cp.full(num_programs, -1, dtype=cp.int32)
    with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream; it still works
        warnings.simplefilter("ignore", DeprecationWarning)
        ext = cp.cuda.ExternalStream(stream.cuda_stream)
    with ext:
        kern((num_programs,), (32,), (out, cp.int64(spin_cycles)))
    stream.synchronize()
    return set(out.get().tolist())
