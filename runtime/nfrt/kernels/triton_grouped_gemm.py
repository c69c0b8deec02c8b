"""Triton grouped GEMM for the MoE experts: rows of x grouped by expert, one weight matrix each.

`grouped_mm(x, w, offs)`: x [m, K] with the rows of expert e at [offs[e-1], offs[e]) (offs[-1] = 0),
w [E, N, K] (any strides; the checkpoint's layout has K contiguous), offs [E] int32 group ends ->
[m, N] with row r = x[r] @ w[e(r)]^T. The group sizes stay on the device (no host sync), so the
launch is capturable in a CUDA graph: the grid covers the most row tiles any routing can need,
cdiv(m, BLOCK_M) + E, and each program finds its expert and tile from `offs`, or exits.

Why: `torch._grouped_mm` on an H200 reads mixtral's expert weights at about 60% of the copy
bandwidth when the GEMMs are memory-bound (few tokens per expert); this kernel reads them at the
copy bandwidth there, and is slower than torch's from about 2000 rows on (benchmarks/RESULTS.md,
2026-11-22 06:5x), which is why `nfrt.model` uses it only up to TRITON_MOE_MAX_ROWS.
Program order: the row tiles of one column tile are consecutive, so the experts' weight tiles
are read from L2 by their row tiles together.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_gemm_kernel(x_ptr, w_ptr, out_ptr, offs_ptr, M, N, K, stride_xm, stride_we, stride_wn,
                         stride_wk, stride_om, M_TILES, E: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    tile_m = pid % M_TILES
    pid_n = pid // M_TILES
    # find the expert whose row tiles hold tile_m: experts in order, each cdiv(rows, BLOCK_M) tiles
    expert = -1
    row0 = 0
    row1 = 0
    seen = 0
    start = 0
    for e in tl.static_range(E):
        end = tl.load(offs_ptr + e)
        tiles = tl.cdiv(end - start, BLOCK_M)
        hit = (tile_m >= seen) & (tile_m < seen + tiles)
        expert = tl.where(hit, e, expert)
        row0 = tl.where(hit, start + (tile_m - seen) * BLOCK_M, row0)
        row1 = tl.where(hit, end, row1)
        seen += tiles
        start = end
    if expert < 0:
        return
    rm = row0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of x / out
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] columns of out = rows of w[e]
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < row1
    n_ok = rn < N
    x_tile = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]  # [BLOCK_M, BLOCK_K]
    w_tile = (w_ptr + expert.to(tl.int64) * stride_we + rn[None, :].to(tl.int64) * stride_wn
              + rk[:, None].to(tl.int64) * stride_wk)  # [BLOCK_K, BLOCK_N]: w[e]^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk + k0 < K
        a = tl.load(x_tile, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_tile, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        x_tile += BLOCK_K
        w_tile += BLOCK_K * stride_wk
    o = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _config(m: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), the fastest of five measured on an H200 at
    mixtral's shapes (benchmarks/probes/grouped_gemm.py): 64 x 128 tiles below 512 rows (fewer
    padding rows when the experts average a few dozen), 128 x 256 from there."""
    if m < 512:
        return 64, 128, 64, 4, 4
    return 128, 256, 64, 8, 3


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, out: torch.Tensor | None = None,
               config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [m, K] rows grouped by expert, w [E, N, K], offs [E] int32 group ends -> out [m, N]."""
    m, k = x.shape
    e, n, k_w = w.shape
    assert k == k_w and x.stride(1) == 1 and offs.numel() == e
    if out is None:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    assert out.shape == (m, n) and out.stride(1) == 1
    bm, bn, bk, warps, stages = config or _config(m)
    m_tiles = triton.cdiv(m, bm) + e  # the most row tiles any split of m rows over e experts needs
    grid = (m_tiles * triton.cdiv(n, bn),)
    _grouped_gemm_kernel[grid](x, w, out, offs, m, n, k, x.stride(0), w.stride(0), w.stride(1), w.stride(2),
                               out.stride(0), m_tiles, E=e, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                               num_warps=warps, num_stages=stages)
    return out
