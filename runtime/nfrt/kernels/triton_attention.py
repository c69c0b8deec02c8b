"""Triton attention over the paged KV cache: decode (split-KV, GQA), prefill (causal), kv_append.

Signatures follow docs/architecture.md ("Runtime kernels"); `nfrt.kernels` dispatches here for CUDA
tensors. Nothing here syncs with the host or allocates data-dependent shapes, so every call can be
captured in a CUDA graph.

Decode attention is memory-bound: it must stream the KV cache near HBM speed even on a small
green-context partition. One program handles one (request, kv head, split) and loads each K/V page
once for all G query heads of that kv head (GQA). The default variant ("tma") fetches one page per
step with the TMA engine: one warp per program, no per-element address registers, so about ten
programs share an SM, each with several pages in flight (what keeps the speed on few SMs; the
pointer-load variants, kept as fallbacks, lose a third of it on 48 SMs: benchmarks/kernels.md).
When requests x kv heads gives too few programs for the stream's SMs, each request's context is
cut into splits whose partial results (normalised output and log-sum-exp, base 2) a second small
kernel combines.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # an older Triton: the TMA variant is unavailable
    TensorDescriptor = None

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 32  # the combine kernel reads up to this many partials per head


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the decode kernel (tuned per SM count by benchmarks/kernels_bench.py)."""

    block_n: int  # tokens per tile (a multiple of the page size)
    num_warps: int
    num_stages: int
    programs_per_sm: int  # split the context until the grid has this many programs per SM
    # "ptr": pointer loads of BLOCK_N-token tiles; "tma": one page per step through TMA descriptors
    # (block_n is then the page size)
    kernel: Literal["ptr", "tma"] = "ptr"

    def __post_init__(self) -> None:
        if self.kernel not in ("ptr", "tma"):
            raise ValueError(f"DecodeConfig: kernel must be 'ptr' or 'tma', got {self.kernel!r}")
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"DecodeConfig: block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1 or self.programs_per_sm < 1:
            raise ValueError(f"DecodeConfig: bad num_warps/num_stages/programs_per_sm {self}")


# SM count -> config; the entry with the largest key <= the stream's SM count applies. Swept on an
# H200 at 32, 48 and 132 SMs (benchmarks/kernels_bench.py): one config won at all three.
DECODE_CONFIGS: dict[int, DecodeConfig] = {
    0: DecodeConfig(block_n=16, num_warps=1, num_stages=6, programs_per_sm=8, kernel="tma"),
}
# Where TMA cannot run (non-contiguous cache, head_dim not a power of two): the best pointer config.
PTR_CONFIG = DecodeConfig(block_n=128, num_warps=4, num_stages=2, programs_per_sm=8, kernel="ptr")


def decode_config(num_sms: int) -> DecodeConfig:
    key = max(k for k in DECODE_CONFIGS if k <= max(num_sms, 0))
    return DECODE_CONFIGS[key]


def _stream_num_sms(device: torch.device) -> int:
    """SMs of the current stream: its partition's size when nfrt.partition made it, else all."""
    from nfrt.partition import stream_num_sms

    return stream_num_sms(torch.cuda.current_stream(device), device)


def _pow2(x: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(x))


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, pt_ptr, ctx_ptr, out_ptr, po_ptr, plse_ptr, qk_scale,
                   stride_qn, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                   stride_pt, stride_on, stride_oh, HKV, SPLITS,
                   G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                   PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)  # kv head fastest: neighbouring programs read the same pages
    kvh = pid % HKV
    split = (pid // HKV) % SPLITS
    req = pid // (HKV * SPLITS)
    ctx = tl.load(ctx_ptr + req)
    per_split = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N  # tile-aligned share of this context
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    gmask = offs_g < G
    dmask = offs_d < D
    heads = kvh * G + offs_g
    q = tl.load(q_ptr + req.to(tl.int64) * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # [G_PAD, D_PAD]

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    pt_row = pt_ptr + req.to(tl.int64) * stride_pt
    for t0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        offs_n = t0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        page = tl.load(pt_row + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)  # [BLOCK_N]
        slot = offs_n % PAGE
        k_row = page * stride_kp + slot * stride_ks + kvh * stride_kh
        k = tl.load(k_ptr + k_row[:, None] + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_N, D_PAD]
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [G_PAD, BLOCK_N], log2 units
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: tile t0 < end holds a valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_row = page * stride_vp + slot * stride_vs + kvh * stride_vh
        v = tl.load(v_ptr + v_row[:, None] + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_N, D_PAD]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    omask = gmask[:, None] & dmask[None, :]
    if DIRECT:  # one split: no partials, no combine
        tl.store(out_ptr + req.to(tl.int64) * stride_on + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        # partials [n, Hq, SPLITS, D] float32 and lse [n, Hq, SPLITS] (base 2)
        row = (req.to(tl.int64) * (HKV * G) + heads) * SPLITS + split  # [G_PAD]
        tl.store(po_ptr + row[:, None] * D + offs_d[None, :], o, mask=omask)
        tl.store(plse_ptr + row, m_i + tl.log2(l_i), mask=gmask)


@triton.jit
def _tma_page_step(q, k_desc, v_desc, row, col, offs_n, end, m_i, l_i, acc, qk_scale, TAIL: tl.constexpr):
    k = k_desc.load([row, col])  # [PAGE, D]
    s = tl.dot(q, tl.trans(k)) * qk_scale  # [G_PAD, PAGE]
    if TAIL:  # the last, partial page: slots past the context may hold anything (NaN too)
        s = tl.where((offs_n < end)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = v_desc.load([row, col])  # [PAGE, D]
    if TAIL:
        v = tl.where((offs_n < end)[:, None], v, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel_tma(q_ptr, k_desc, v_desc, pt_ptr, ctx_ptr, out_ptr, po_ptr, plse_ptr, qk_scale,
                       stride_qn, stride_qh, stride_pt, stride_on, stride_oh, HKV, SPLITS,
                       G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                       DIRECT: tl.constexpr, STAGES: tl.constexpr):
    # One page per step, K and V pages fetched by the TMA engine into shared memory (k_desc, v_desc
    # view a cache as [pages * PAGE, HKV * D] with [PAGE, D] boxes): no per-element address
    # registers, so many programs fit on an SM, each with several pages in flight.
    pid = tl.program_id(0)
    kvh = pid % HKV
    split = (pid // HKV) % SPLITS
    req = pid // (HKV * SPLITS)
    ctx = tl.load(ctx_ptr + req)
    per_split = tl.cdiv(tl.cdiv(ctx, SPLITS), PAGE) * PAGE  # whole pages: only the last one is partial
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    heads = kvh * G + offs_g
    q = tl.load(q_ptr + req.to(tl.int64) * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None], other=0.0)  # [G_PAD, D]
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    pt_row = pt_ptr + req.to(tl.int64) * stride_pt
    offs_p = tl.arange(0, PAGE)
    for pg in tl.range(start // PAGE, end // PAGE, num_stages=STAGES):
        row = tl.load(pt_row + pg) * PAGE
        m_i, l_i, acc = _tma_page_step(q, k_desc, v_desc, row, kvh * D, offs_p, PAGE, m_i, l_i, acc,
                                       qk_scale, TAIL=False)
    if end % PAGE != 0:
        pg = end // PAGE
        row = tl.load(pt_row + pg) * PAGE
        m_i, l_i, acc = _tma_page_step(q, k_desc, v_desc, row, kvh * D, pg * PAGE + offs_p, end, m_i, l_i,
                                       acc, qk_scale, TAIL=True)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if DIRECT:
        tl.store(out_ptr + req.to(tl.int64) * stride_on + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
    else:
        prow = (req.to(tl.int64) * (HKV * G) + heads) * SPLITS + split
        tl.store(po_ptr + prow[:, None] * D + offs_d[None, :], o, mask=gmask[:, None])
        tl.store(plse_ptr + prow, m_i + tl.log2(l_i), mask=gmask)


@triton.jit
def _combine_kernel(po_ptr, plse_ptr, ctx_ptr, out_ptr, stride_on, stride_oh, HQ, SPLITS,
                    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, S_PAD: tl.constexpr):
    pid = tl.program_id(0)
    req = pid // HQ
    h = pid % HQ
    ctx = tl.load(ctx_ptr + req)
    per_split = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    n_valid = tl.cdiv(ctx, tl.maximum(per_split, 1))  # splits that saw tokens (same rule as above)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    smask = offs_s < n_valid
    row = pid.to(tl.int64) * SPLITS + offs_s
    lse = tl.load(plse_ptr + row, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # [S_PAD]; 0 for unused splits
    o = tl.load(po_ptr + row[:, None] * D + offs_d[None, :], mask=smask[:, None] & (offs_d < D)[None, :],
                other=0.0)
    denom = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + req.to(tl.int64) * stride_on + h * stride_oh + offs_d,
             res.to(out_ptr.dtype.element_ty), mask=offs_d < D)


def _tma_ok(k_cache: torch.Tensor, v_cache: torch.Tensor, page: int, d: int) -> bool:
    """TMA boxes need contiguous caches, a page of >= 16 slots and a power-of-two head_dim."""
    return (TensorDescriptor is not None and k_cache.is_contiguous() and v_cache.is_contiguous()
            and page >= 16 and page & (page - 1) == 0 and d >= 16 and d & (d - 1) == 0
            and k_cache.data_ptr() % 16 == 0 and v_cache.data_ptr() % 16 == 0)


def num_splits(n: int, num_kv_heads: int, max_tokens: int, num_sms: int, cfg: DecodeConfig) -> int:
    """Splits per request so the grid has about `programs_per_sm` programs on each SM.

    No split while the grid already has half that: on the H200, 32 requests x 8 kv heads ran 10%
    slower split in two on 48 SMs, and 15% faster split in five on 132 SMs (benchmarks/kernels.md).
    """
    base = max(1, n * num_kv_heads)
    want = num_sms * cfg.programs_per_sm
    if 2 * base >= want:
        return 1
    return max(1, min(triton.cdiv(want, base), triton.cdiv(max_tokens, cfg.block_n), _MAX_SPLITS))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, out: torch.Tensor, *,
                     num_sms: int | None = None, config: DecodeConfig | None = None,
                     splits: int | None = None) -> None:
    """q [n, Hq, D] attends to positions [0, context_lens[i]) of page_table[i]; writes out [n, Hq, D].

    `num_sms` (default: the current stream's partition size) picks the tuned config and the split
    count; `config` and `splits` override them (the profiler and the benchmark use these).
    """
    n, hq, d = q.shape
    if n == 0:
        return
    _, page, hkv, dk = k_cache.shape
    assert dk == d and hq % hkv == 0 and q.stride(2) == 1 and out.stride(2) == 1
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and page_table.stride(1) == 1
    if num_sms is None:
        num_sms = _stream_num_sms(q.device)
    cfg = config or decode_config(num_sms)
    use_tma = cfg.kernel == "tma" and _tma_ok(k_cache, v_cache, page, d)
    if cfg.kernel == "tma" and not use_tma:
        cfg = replace(PTR_CONFIG, programs_per_sm=cfg.programs_per_sm)
    block_n = page if use_tma else max(cfg.block_n, _pow2(page, 16))
    g = hq // hkv
    s = min(max(1, splits or num_splits(n, hkv, page_table.shape[1] * page, num_sms, cfg)), _MAX_SPLITS)
    if s > 1:
        part_o = torch.empty((n, hq, s, d), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((n, hq, s), device=q.device, dtype=torch.float32)
    else:
        part_o = part_lse = out  # unused
    grid = (n * hkv * s,)
    if use_tma:
        shape, strides = [k_cache.shape[0] * page, hkv * d], [hkv * d, 1]
        _decode_kernel_tma[grid](
            q, TensorDescriptor(k_cache, shape, strides, [page, d]),
            TensorDescriptor(v_cache, shape, strides, [page, d]), page_table, context_lens, out, part_o,
            part_lse, scale * _LOG2E, q.stride(0), q.stride(1), page_table.stride(0), out.stride(0),
            out.stride(1), hkv, s,
            G=g, G_PAD=_pow2(g, 16), D=d, PAGE=page, DIRECT=s == 1, STAGES=cfg.num_stages,
            num_warps=cfg.num_warps)
    else:
        _decode_kernel[grid](
            q, k_cache, v_cache, page_table, context_lens, out, part_o, part_lse, scale * _LOG2E,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), page_table.stride(0),
            out.stride(0), out.stride(1), hkv, s,
            G=g, G_PAD=_pow2(g, 16), D=d, D_PAD=_pow2(d, 16), PAGE=page, BLOCK_N=block_n, DIRECT=s == 1,
            STAGES=cfg.num_stages, num_warps=cfg.num_warps)
    if s > 1:
        _combine_kernel[(n * hq,)](
            part_o, part_lse, context_lens, out, out.stride(0), out.stride(1), hq, s,
            D=d, D_PAD=_pow2(d, 16), BLOCK_N=block_n, S_PAD=_pow2(_MAX_SPLITS, 2), num_warps=4)


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, pt_ptr, req_ptr, pos_ptr, out_ptr, qk_scale, T,
                    stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                    stride_pt, stride_ot, stride_oh, HKV,
                    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    # Rows of the tile are (token, q head of this kv head) pairs: M = BLOCK_M * G_PAD, so each K/V
    # tile is loaded once for all G heads. A token block normally holds one request; a block that
    # straddles requests loops over them, masking the rows of the others.
    pid = tl.program_id(0)
    kvh = pid % HKV
    tblk = pid // HKV
    M: tl.constexpr = BLOCK_M * G_PAD
    offs_m = tl.arange(0, M)
    tok = tblk * BLOCK_M + offs_m // G_PAD
    gi = offs_m % G_PAD
    rmask = (tok < T) & (gi < G)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    heads = kvh * G + gi
    q = tl.load(q_ptr + tok.to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)  # [M, D_PAD]
    req = tl.load(req_ptr + tok, mask=tok < T, other=-1)
    pos = tl.load(pos_ptr + tok, mask=tok < T, other=-1)
    r_lo = tl.min(tl.where(tok < T, req, 2147483647), 0)
    r_hi = tl.max(req, 0)

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D_PAD], tl.float32)
    for r in range(r_lo, r_hi + 1):
        mine = (req == r) & (tok < T)
        kv_end = tl.max(tl.where(mine, pos, -1), 0) + 1  # 0 when no row belongs to r
        pt_row = pt_ptr + r * stride_pt
        for t0 in tl.range(0, kv_end, BLOCK_N, num_stages=STAGES):
            offs_n = t0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < kv_end
            page = tl.load(pt_row + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
            slot = offs_n % PAGE
            k_row = page * stride_kp + slot * stride_ks + kvh * stride_kh
            k = tl.load(k_ptr + k_row[:, None] + offs_d[None, :],
                        mask=nmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_N, D_PAD]
            s = tl.dot(q, tl.trans(k)) * qk_scale  # [M, BLOCK_N]
            vis = mine[:, None] & (offs_n[None, :] <= pos[:, None]) & nmask[None, :]
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v_row = page * stride_vp + slot * stride_vs + kvh * stride_vh
            v = tl.load(v_ptr + v_row[:, None] + offs_d[None, :],
                        mask=nmask[:, None] & dmask[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok.to(tl.int64)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                      token_req: torch.Tensor, token_pos: torch.Tensor, scale: float, out: torch.Tensor, *,
                      block_n: int = 64, num_warps: int = 8, num_stages: int = 2) -> None:
    """Token i (request token_req[i], position token_pos[i]) attends to positions [0, token_pos[i]]."""
    t, hq, d = q.shape
    if t == 0:
        return
    _, page, hkv, _ = k_cache.shape
    assert hq % hkv == 0 and q.stride(2) == 1 and out.stride(2) == 1 and page_table.stride(1) == 1
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    g = hq // hkv
    g_pad = _pow2(g)
    block_m = max(1, 128 // g_pad)  # about 128 rows per tile
    if block_m * g_pad < 16:
        block_m = 16 // g_pad
    grid = (triton.cdiv(t, block_m) * hkv,)
    _prefill_kernel[grid](
        q, k_cache, v_cache, page_table, token_req, token_pos, out, scale * _LOG2E, t,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), page_table.stride(0),
        out.stride(0), out.stride(1), hkv,
        G=g, G_PAD=g_pad, D=d, D_PAD=_pow2(d, 16), PAGE=page, BLOCK_M=block_m,
        BLOCK_N=max(block_n, _pow2(page, 16)), STAGES=num_stages, num_warps=num_warps)


@triton.jit
def _kv_append_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                      stride_cp, stride_cs, stride_ch, stride_dp, stride_ds, stride_dh, HKV,
                      D: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr):
    i = tl.program_id(0)
    slot = tl.load(slot_ptr + i)
    if slot >= 0:  # negative slot: a padding token, nothing to store
        page = slot // PAGE
        off = slot % PAGE
        offs_h = tl.arange(0, H_PAD)
        offs_d = tl.arange(0, D_PAD)
        mask = (offs_h < HKV)[:, None] & (offs_d < D)[None, :]
        i64 = i.to(tl.int64)
        k = tl.load(k_ptr + i64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + i64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        tl.store(kc_ptr + page * stride_cp + off * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :],
                 k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + page * stride_dp + off * stride_ds + offs_h[:, None] * stride_dh + offs_d[None, :],
                 v.to(vc_ptr.dtype.element_ty), mask=mask)


def kv_append(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    """Write k, v [t, Hkv, D] to cache slots slot_mapping [t] int64 (slot = page * page_size + offset)."""
    t, hkv, d = k.shape
    if t == 0:
        return
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    page = k_cache.shape[1]
    _kv_append_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), hkv,
        D=d, H_PAD=_pow2(hkv), D_PAD=_pow2(d), PAGE=page, num_warps=4)
