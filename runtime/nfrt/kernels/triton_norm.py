"""Triton row kernels: fused residual add + RMSNorm, RMSNorm, neox RoPE (in place), SiLU-and-mul.

Signatures and rounding follow nfrt/kernels/reference.py: sums and norms in float32, the residual
rounded to its dtype before it is normalised, the normalised row rounded before the weight
multiply (as Hugging Face Llama does). One program per token row; no host syncs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _warps(block: int) -> int:
    return max(1, min(16, block // 512))


@triton.jit
def _rms_norm_kernel(x_ptr, h_ptr, w_ptr, out_ptr, stride_x, stride_h, stride_o, H, eps,
                     ADD: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    if ADD:  # x is the residual: x = h (first layer) or x + h, stored rounded
        h = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0)
        if FIRST:
            r = h.to(x_ptr.dtype.element_ty)
        else:
            x_old = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
            r = (x_old.to(tl.float32) + h.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * stride_x + offs, r, mask=mask)
        x = r.to(tl.float32)
    else:
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """out [t, H] = x / rms(x) * weight."""
    t, h = x.shape
    if t == 0:
        return
    assert x.stride(1) == 1 and out.stride(1) == 1 and weight.is_contiguous()
    block = triton.next_power_of_2(h)
    _rms_norm_kernel[(t,)](x, x, weight, out, x.stride(0), x.stride(0), out.stride(0), h, eps,
                           ADD=False, FIRST=False, BLOCK=block, num_warps=_warps(block))


def fused_add_rms_norm(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       out: torch.Tensor, first: bool) -> None:
    """residual += h (residual = h when first); out [t, H] = rmsnorm(residual) * weight."""
    t, hid = h.shape
    if t == 0:
        return
    assert h.stride(1) == 1 and residual.stride(1) == 1 and out.stride(1) == 1 and weight.is_contiguous()
    block = triton.next_power_of_2(hid)
    _rms_norm_kernel[(t,)](residual, h, weight, out, residual.stride(0), h.stride(0), out.stride(0), hid, eps,
                           ADD=True, FIRST=bool(first), BLOCK=block, num_warps=_warps(block))


@triton.jit
def _rope_rows(x_ptr, stride_t, stride_h, row, nh, cos, sin,
               HALF: tl.constexpr, H_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    mask = (offs_h < nh)[:, None] & (offs_d < HALF)[None, :]
    p1 = x_ptr + row * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]  # [H_PAD, HALF_PAD]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos[None, :] - x2 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, cs_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
                 HQ, HKV,
                 HALF: tl.constexpr, HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + row)
    offs_d = tl.arange(0, HALF_PAD)
    dmask = offs_d < HALF
    cos = tl.load(cs_ptr + pos * stride_cs + offs_d, mask=dmask, other=0.0)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs_d, mask=dmask, other=0.0)
    _rope_rows(q_ptr, stride_qt, stride_qh, row, HQ, cos, sin, HALF, HQ_PAD, HALF_PAD)
    _rope_rows(k_ptr, stride_kt, stride_kh, row, HKV, cos, sin, HALF, HKV_PAD, HALF_PAD)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotate q [t, Hq, D] and k [t, Hkv, D] in place (neox halves) by cos_sin[positions]."""
    t, hq, d = q.shape
    if t == 0:
        return
    hkv = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin.stride(1) == 1 and d % 2 == 0
    half = d // 2
    _rope_kernel[(t,)](q, k, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                       cos_sin.stride(0), hq, hkv, HALF=half, HQ_PAD=triton.next_power_of_2(hq),
                       HKV_PAD=triton.next_power_of_2(hkv), HALF_PAD=triton.next_power_of_2(half),
                       num_warps=4)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(x_ptr.dtype.element_ty).to(tl.float32)  # silu rounded, as torch
    tl.store(out_ptr + row * stride_o + offs, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    """out [t, I] = silu(gate_up[:, :I]) * gate_up[:, I:]."""
    t, i = out.shape
    if t == 0:
        return
    assert gate_up.stride(1) == 1 and out.stride(1) == 1 and gate_up.shape[1] == 2 * i
    block = 2048
    _silu_mul_kernel[(t, triton.cdiv(i, block))](gate_up, out, gate_up.stride(0), out.stride(0), i,
                                                 BLOCK=block, num_warps=8)
