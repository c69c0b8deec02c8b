"""Plain-torch reference kernels: the semantics every Triton kernel must match.

Used on the CPU, in tests, and on the GPU where no Triton version exists. Every kernel writes
into a preallocated output and avoids host syncs and data-dependent shapes, so the references are
CUDA-graph capturable too. Attention math runs in float32 whatever the storage dtype.

Paged KV cache: per layer `k_cache`, `v_cache` `[num_pages, page_size, kv_heads, head_dim]`;
the slot of a token is `page * page_size + offset`. Page-table entries past a request's last page
are ignored (masked by the context length), whatever they hold.

RoPE table layout (shared with the Triton kernels): `cos_sin [max_pos, D]` float32, the first
D/2 columns cos(pos * inv_freq), the last D/2 columns sin(pos * inv_freq); neox style (the halves
of each head rotate together), as Llama, Mistral, Mixtral and Qwen2 in Hugging Face.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Gathered K/V per attention chunk stays under this many elements (bounds reference memory).
_GATHER_BUDGET_ELEMS = 1 << 26


def rope_cos_sin(max_pos: int, head_dim: int, theta: float,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The `cos_sin [max_pos, D]` float32 table that `rope` reads."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [max_pos, D/2]
    return torch.cat([angles.cos(), angles.sin()], dim=1).to(device=device, dtype=torch.float32)


def kv_append(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    """Write k, v [t, Hkv, D] into the cache slots slot_mapping [t] int64."""
    num_pages, page_size, hkv, d = k_cache.shape
    k_cache.view(num_pages * page_size, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_pages * page_size, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather_pages(cache: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
    """cache [P, S, Hkv, D], page_table [n, M] -> [n, M*S, Hkv, D] float32 (unused entries clamped)."""
    _, s, hkv, d = cache.shape
    pages = page_table.long().clamp(0, cache.shape[0] - 1)
    return cache[pages].reshape(page_table.shape[0], page_table.shape[1] * s, hkv, d).float()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
            scale: float) -> torch.Tensor:
    """q [n, Hq, D], k/v [n, L, Hkv, D], valid [n, L] bool -> [n, Hq, D] float32 (grouped-query)."""
    n, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.float().view(n, hkv, g, d)  # [n, Hkv, G, D]
    scores = torch.einsum("nhgd,nlhd->nhgl", qg, k) * scale  # [n, Hkv, G, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("nhgl,nlhd->nhgd", probs, v).reshape(n, hq, d)


def _chunk_rows(n: int, max_pages: int, cache: torch.Tensor) -> int:
    per_row = max(1, max_pages * cache.shape[1] * cache.shape[2] * cache.shape[3])
    return max(1, min(n, _GATHER_BUDGET_ELEMS // per_row))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """q [n, Hq, D]: one query per request attending to positions [0, context_len) of its pages."""
    n = q.shape[0]
    if n == 0:
        return
    length = page_table.shape[1] * k_cache.shape[1]
    step = _chunk_rows(n, page_table.shape[1], k_cache)
    pos = torch.arange(length, device=q.device)
    for a in range(0, n, step):  # static chunking: shapes depend only on n
        b = min(n, a + step)
        k = _gather_pages(k_cache, page_table[a:b])
        v = _gather_pages(v_cache, page_table[a:b])
        valid = pos[None, :] < context_lens[a:b, None].long()  # [c, L]
        out[a:b].copy_(_attend(q[a:b], k, v, valid, scale))


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                      token_req: torch.Tensor, token_pos: torch.Tensor, scale: float,
                      out: torch.Tensor) -> None:
    """q [t, Hq, D]: token i of request token_req[i] attends causally to positions [0, token_pos[i]]."""
    t = q.shape[0]
    if t == 0:
        return
    length = page_table.shape[1] * k_cache.shape[1]
    step = _chunk_rows(t, page_table.shape[1], k_cache)
    pos = torch.arange(length, device=q.device)
    for a in range(0, t, step):
        b = min(t, a + step)
        rows = page_table[token_req[a:b].long()]  # [c, M]: each token's request pages
        k = _gather_pages(k_cache, rows)
        v = _gather_pages(v_cache, rows)
        valid = pos[None, :] <= token_pos[a:b, None].long()
        out[a:b].copy_(_attend(q[a:b], k, v, valid, scale))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """out = x / rms(x) * weight, computed in float32 and rounded once (as Hugging Face does)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out.copy_(weight * normed.to(x.dtype))


def fused_add_rms_norm(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       out: torch.Tensor, first: bool) -> None:
    """residual += h (residual = h when first); out = rmsnorm(residual) * weight."""
    if first:
        residual.copy_(h)
    else:
        residual.add_(h)
    rms_norm(residual, weight, eps, out)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotate q [t, Hq, D] and k [t, Hkv, D] in place, neox style, at positions [t] int64."""
    d = q.shape[-1]
    half = d // 2
    cs = cos_sin[positions]  # [t, D]
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]
    for x in (q, k):
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        x.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    """out [t, I] = silu(gate_up[:, :I]) * gate_up[:, I:]."""
    i = out.shape[-1]
    out.copy_(F.silu(gate_up[:, :i]) * gate_up[:, i:])


def moe_route(logits: torch.Tensor, top_k: int, weights_out: torch.Tensor, ids_out: torch.Tensor) -> None:
    """Softmax over experts (float32), top-k, renormalised to sum 1 (Mixtral)."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    weights_out.copy_(w / w.sum(dim=-1, keepdim=True))
    ids_out.copy_(ids)
