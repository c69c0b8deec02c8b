"""Reference kernels against naive per-request loops (fresh random inputs, NaN-poisoned outputs)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from nfrt.kernels import reference as R  # noqa: E402

PAGE = 16


def paged_cache(gen, lengths, hkv, d, extra_pages=3):
    """Random K/V for requests of `lengths`, scattered over shuffled pages.

    Returns (k_cache, v_cache, page_table [r, max_pages] int32 with garbage past each request's
    pages, dense per-request K/V lists [len, hkv, d])."""
    need = [math.ceil(n / PAGE) for n in lengths]
    num_pages = sum(need) + extra_pages
    k_cache = torch.randn(num_pages, PAGE, hkv, d, generator=gen)
    v_cache = torch.randn(num_pages, PAGE, hkv, d, generator=gen)
    perm = torch.randperm(num_pages, generator=gen).tolist()
    width = max(need) + 1
    table = torch.randint(0, num_pages, (len(lengths), width), generator=gen, dtype=torch.int32)
    ks, vs, used = [], [], 0
    for r, n in enumerate(lengths):
        pages = perm[used: used + need[r]]
        used += need[r]
        table[r, : need[r]] = torch.tensor(pages, dtype=torch.int32)
        ks.append(torch.cat([k_cache[p] for p in pages])[:n])
        vs.append(torch.cat([v_cache[p] for p in pages])[:n])
    return k_cache, v_cache, table, ks, vs


def naive_attention(q, k, v, scale):
    """q [Hq, D] against k, v [L, Hkv, D], one head at a time."""
    hq, hkv = q.shape[0], k.shape[1]
    out = torch.empty_like(q)
    for h in range(hq):
        kh = k[:, h // (hq // hkv)]
        p = torch.softmax((kh @ q[h]) * scale, dim=0)
        out[h] = p @ v[:, h // (hq // hkv)]
    return out


@pytest.mark.parametrize("hq,hkv", [(4, 2), (8, 8), (6, 1)])
def test_decode_attention_matches_dense(hq, hkv):
    gen = torch.Generator().manual_seed(100 + hq * hkv)
    d = 16
    lengths = [1, 15, 16, 17, 40, 3]
    k_cache, v_cache, table, ks, vs = paged_cache(gen, lengths, hkv, d)
    q = torch.randn(len(lengths), hq, d, generator=gen)
    out = torch.full_like(q, float("nan"))
    ctx = torch.tensor(lengths, dtype=torch.int32)
    R.decode_attention(q, k_cache, v_cache, table, ctx, 0.3, out)
    for r in range(len(lengths)):
        torch.testing.assert_close(out[r], naive_attention(q[r], ks[r], vs[r], 0.3), rtol=1e-5, atol=1e-5)


def test_prefill_attention_is_causal_per_request():
    gen = torch.Generator().manual_seed(7)
    hq, hkv, d = 4, 2, 8
    lengths = [9, 33, 20]  # full lengths; the batch holds a suffix chunk of each
    starts = [0, 17, 5]
    k_cache, v_cache, table, ks, vs = paged_cache(gen, lengths, hkv, d)
    token_req, token_pos = [], []
    for r, (n, s) in enumerate(zip(lengths, starts, strict=True)):
        token_req += [r] * (n - s)
        token_pos += list(range(s, n))
    t = len(token_req)
    q = torch.randn(t, hq, d, generator=gen)
    out = torch.full_like(q, float("nan"))
    R.prefill_attention(q, k_cache, v_cache, table, torch.tensor(token_req, dtype=torch.int32),
                        torch.tensor(token_pos, dtype=torch.int32), 0.25, out)
    for i in range(t):
        r, p = token_req[i], token_pos[i]
        ref = naive_attention(q[i], ks[r][: p + 1], vs[r][: p + 1], 0.25)
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)


def test_attention_chunking_is_invisible(monkeypatch):
    """The gather budget splits work into chunks; results must not depend on it."""
    gen = torch.Generator().manual_seed(3)
    lengths = [30, 7, 50, 18, 2]
    k_cache, v_cache, table, _, _ = paged_cache(gen, lengths, 2, 8)
    q = torch.randn(5, 4, 8, generator=gen)
    ctx = torch.tensor(lengths, dtype=torch.int32)
    whole, chunked = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
    R.decode_attention(q, k_cache, v_cache, table, ctx, 0.5, whole)
    monkeypatch.setattr(R, "_GATHER_BUDGET_ELEMS", 1)
    R.decode_attention(q, k_cache, v_cache, table, ctx, 0.5, chunked)
    torch.testing.assert_close(whole, chunked)


def test_kv_append_writes_slots_only():
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache = torch.randn(4, PAGE, 2, 8, generator=gen), torch.randn(4, PAGE, 2, 8, generator=gen)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([3, 17, 63, 40], dtype=torch.int64)
    k, v = torch.randn(4, 2, 8, generator=gen), torch.randn(4, 2, 8, generator=gen)
    R.kv_append(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 2, 8), v_cache.view(-1, 2, 8)
    torch.testing.assert_close(flat_k[slots], k)
    torch.testing.assert_close(flat_v[slots], v)
    keep = torch.ones(64, dtype=torch.bool)
    keep[slots] = False
    assert torch.equal(flat_k[keep], before_k.view(-1, 2, 8)[keep])
    assert torch.equal(flat_v[keep], before_v.view(-1, 2, 8)[keep])


def test_rope_matches_complex_rotation():
    gen = torch.Generator().manual_seed(9)
    t, d, theta = 6, 16, 10000.0
    q, k = torch.randn(t, 4, d, generator=gen), torch.randn(t, 2, d, generator=gen)
    pos = torch.randint(0, 100, (t,), generator=gen)
    cos_sin = R.rope_cos_sin(128, d, theta)
    q2, k2 = q.clone(), k.clone()
    R.rope(q2, k2, pos, cos_sin)
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    for x, y in ((q, q2), (k, k2)):
        for i in range(t):
            z = torch.complex(x[i, :, : d // 2].double(), x[i, :, d // 2:].double())
            r = z * torch.polar(torch.ones(d // 2, dtype=torch.float64), pos[i] * inv)
            torch.testing.assert_close(y[i], torch.cat([r.real, r.imag], -1).float(), rtol=1e-5, atol=1e-5)


def test_norms_and_silu_mul():
    gen = torch.Generator().manual_seed(2)
    h, r, w = (torch.randn(5, 32, generator=gen) for _ in range(3))
    w = w[0]
    out = torch.full_like(h, float("nan"))
    res = r.clone()
    R.fused_add_rms_norm(h, res, w, 1e-6, out, first=False)
    s = h + r
    torch.testing.assert_close(res, s)
    torch.testing.assert_close(out, s / torch.sqrt((s * s).mean(-1, keepdim=True) + 1e-6) * w)
    res2 = r.clone()
    R.fused_add_rms_norm(h, res2, w, 1e-6, out, first=True)
    torch.testing.assert_close(res2, h)
    gu = torch.randn(5, 24, generator=gen)
    act = torch.full((5, 12), float("nan"))
    R.silu_mul(gu, act)
    torch.testing.assert_close(act, gu[:, :12] / (1 + torch.exp(-gu[:, :12])) * gu[:, 12:])


def test_moe_route_topk_renormalised():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(7, 8, generator=gen)
    w = torch.full((7, 2), float("nan"))
    ids = torch.full((7, 2), -1, dtype=torch.int32)
    R.moe_route(logits, 2, w, ids)
    for t in range(7):
        top = sorted(range(8), key=lambda e: -logits[t, e].item())[:2]
        assert ids[t].tolist() == top
        e = torch.exp(logits[t, top])
        torch.testing.assert_close(w[t], e / e.sum())
