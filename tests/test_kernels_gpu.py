"""Triton kernels against the plain-torch references, on fresh random inputs (GPU only)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PAGE = 16


def _configs():
    from nfrt.kernels import triton_attention as ta
    return [ta.DecodeConfig(64, 4, 3, 8, kernel="ptr"), ta.DecodeConfig(16, 1, 6, 8, kernel="tma"),
            ta.DecodeConfig(16, 2, 8, 8, kernel="tma")]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _mods():
    pytest.importorskip("triton")
    from nfrt.kernels import reference as ref
    from nfrt.kernels import triton_attention as ta
    from nfrt.kernels import triton_norm as tn
    return ref, ta, tn


def _paged_cache(n, hkv, d, max_ctx, dtype, gen, spare_pages=2):
    """A shuffled page pool; each request owns max_pages random pages (entries past its context unused)."""
    max_pages = -(-max_ctx // PAGE) + spare_pages
    num_pages = n * max_pages + 7
    kc = torch.randn(num_pages, PAGE, hkv, d, device="cuda", generator=gen).to(dtype)
    vc = torch.randn(num_pages, PAGE, hkv, d, device="cuda", generator=gen).to(dtype)
    pt = torch.randperm(num_pages, device="cuda", generator=gen)[: n * max_pages].view(n, max_pages).int()
    return kc, vc, pt


@pytest.mark.parametrize("n,hq,hkv,d,max_ctx,splits,dtype", [
    (37, 32, 8, 128, 700, None, "bfloat16"),   # Llama-3-8B heads, auto split
    (5, 32, 8, 128, 1000, 7, "bfloat16"),      # forced split-KV and combine
    (64, 32, 8, 128, 300, 1, "bfloat16"),      # no split
    (9, 64, 8, 128, 400, 3, "float16"),        # G = 8 (Llama-2/3-70B)
    (6, 28, 4, 64, 333, None, "bfloat16"),     # G = 7, head_dim 64 (padded group)
    (4, 16, 16, 80, 90, 2, "bfloat16"),        # MHA, head_dim 80 (padded)
])
def test_decode_attention_matches_reference(n, hq, hkv, d, max_ctx, splits, dtype):
    ref, ta, _ = _mods()
    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    kc, vc, pt = _paged_cache(n, hkv, d, max_ctx, dt, gen)
    ctx = torch.randint(1, max_ctx + 1, (n,), device="cuda", generator=gen).int()
    ctx[0] = max_ctx
    ctx[-1] = 1
    q = torch.randn(n, hq, d, device="cuda", generator=gen).to(dt)
    out = torch.full((n, hq, d), float("nan"), device="cuda", dtype=dt)
    expect = torch.empty_like(out)
    ref.decode_attention(q, kc, vc, pt, ctx, d ** -0.5, expect)
    for cfg in _configs():
        out.fill_(float("nan"))
        ta.decode_attention(q, kc, vc, pt, ctx, d ** -0.5, out, splits=splits, config=cfg)
        assert not out.isnan().any()
        assert _rel(out, expect) < 1e-2, cfg
    out.fill_(float("nan"))
    ta.decode_attention(q, kc, vc, pt, ctx, d ** -0.5, out, splits=splits)  # the tuned default
    assert _rel(out, expect) < 1e-2


def test_decode_attention_split_configs_agree():
    """Every split count computes the same function (the combine is exact up to rounding)."""
    ref, ta, _ = _mods()
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    kc, vc, pt = _paged_cache(3, 8, 128, 2000, torch.bfloat16, gen)
    ctx = torch.tensor([2000, 17, 1500], device="cuda", dtype=torch.int32)
    q = torch.randn(3, 32, 128, device="cuda", generator=gen).to(torch.bfloat16)
    expect = torch.empty_like(q)
    ref.decode_attention(q, kc, vc, pt, ctx, 0.088, expect)
    for s in (1, 2, 5, 16, 32):
        for cfg in _configs() + [ta.DecodeConfig(32, 4, 2, 1), ta.DecodeConfig(128, 4, 2, 1)]:
            out = torch.full_like(q, float("nan"))
            ta.decode_attention(q, kc, vc, pt, ctx, 0.088, out, splits=s, config=cfg)
            assert _rel(out, expect) < 1e-2, (s, cfg)


def test_decode_attention_on_a_non_contiguous_cache_falls_back_to_pointer_loads():
    ref, ta, _ = _mods()
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    kv = torch.randn(40, 2, PAGE, 8, 128, device="cuda", generator=gen).to(torch.bfloat16)
    kc, vc = kv[:, 0], kv[:, 1]  # one allocation, K and V interleaved per page
    pt = torch.randperm(40, device="cuda", generator=gen)[:36].view(4, 9).int()
    ctx = torch.tensor([144, 1, 70, 100], device="cuda", dtype=torch.int32)
    q = torch.randn(4, 32, 128, device="cuda", generator=gen).to(torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    expect = torch.empty_like(q)
    assert ta.decode_config(132).kernel == "tma" and not ta._tma_ok(kc, vc, PAGE, 128)
    ta.decode_attention(q, kc, vc, pt, ctx, 0.088, out)
    ref.decode_attention(q, kc, vc, pt, ctx, 0.088, expect)
    assert _rel(out, expect) < 1e-2


def test_decode_attention_ignores_garbage_past_the_context():
    """Slots past a request's context in its last page may hold NaN (never-written cache memory)."""
    ref, ta, _ = _mods()
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    kc, vc, pt = _paged_cache(4, 8, 128, 300, torch.bfloat16, gen)
    ctx = torch.tensor([300, 17, 33, 1], device="cuda", dtype=torch.int32)
    q = torch.randn(4, 32, 128, device="cuda", generator=gen).to(torch.bfloat16)
    expect = torch.empty_like(q)
    ref.decode_attention(q, kc, vc, pt, ctx, 0.088, expect)
    for i, c in enumerate(ctx.tolist()):  # poison the rest of each request's last page
        page = int(pt[i, (c - 1) // PAGE])
        kc[page, (c - 1) % PAGE + 1:] = float("nan")
        vc[page, (c - 1) % PAGE + 1:] = float("nan")
    for cfg in _configs():
        for s in (1, 3):
            out = torch.full_like(q, float("nan"))
            ta.decode_attention(q, kc, vc, pt, ctx, 0.088, out, splits=s, config=cfg)
            assert not out.isnan().any(), (cfg, s)
            assert _rel(out, expect) < 1e-2, (cfg, s)


@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (8, 8, 64), (28, 4, 128)])
def test_prefill_attention_matches_reference(hq, hkv, d):
    ref, ta, _ = _mods()
    dt = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    r = 4
    kc, vc, pt = _paged_cache(r, hkv, d, 400, dt, gen)
    # chunked prefill: request i appends `chunk` tokens after a prefix of `start` cached tokens
    reqs, poss = [], []
    for i, (start, chunk) in enumerate([(0, 150), (200, 37), (0, 1), (90, 300)]):
        reqs += [i] * chunk
        poss += list(range(start, start + chunk))
    token_req = torch.tensor(reqs, device="cuda", dtype=torch.int32)
    token_pos = torch.tensor(poss, device="cuda", dtype=torch.int32)
    for perm in (None, torch.randperm(len(reqs), device="cuda", generator=gen)):  # sorted, then mixed
        tr = token_req if perm is None else token_req[perm]
        tp = token_pos if perm is None else token_pos[perm]
        q = torch.randn(len(reqs), hq, d, device="cuda", generator=gen).to(dt)
        out = torch.full_like(q, float("nan"))
        expect = torch.empty_like(q)
        ta.prefill_attention(q, kc, vc, pt, tr, tp, d ** -0.5, out)
        ref.prefill_attention(q, kc, vc, pt, tr, tp, d ** -0.5, expect)
        assert not out.isnan().any()
        assert _rel(out, expect) < 1e-2


def test_kv_append_matches_reference_and_skips_negative_slots():
    ref, ta, _ = _mods()
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    kc = torch.randn(20, PAGE, 8, 128, device="cuda", generator=gen).to(torch.bfloat16)
    vc = torch.randn_like(kc)
    qkv = torch.randn(50, (32 + 16) * 128, device="cuda", generator=gen).to(torch.bfloat16)
    k = qkv[:, 32 * 128: 40 * 128].view(50, 8, 128)  # strided views, as from a fused qkv GEMM
    v = qkv[:, 40 * 128:].view(50, 8, 128)
    slots = torch.randperm(20 * PAGE, device="cuda", generator=gen)[:50]
    kc2, vc2 = kc.clone(), vc.clone()
    ta.kv_append(k, v, kc, vc, slots)
    ref.kv_append(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    before = kc.clone()
    pad = slots.clone()
    pad[::2] = -1
    ta.kv_append(k.flip(0), v, kc, vc, pad)
    written = pad[pad >= 0]
    flat, flat_before = kc.view(-1, 8, 128), before.view(-1, 8, 128)
    assert torch.equal(flat[written], k.flip(0)[pad >= 0])
    keep = torch.ones(flat.shape[0], dtype=torch.bool, device="cuda")
    keep[written] = False
    assert torch.equal(flat[keep], flat_before[keep])


@pytest.mark.parametrize("first", [False, True])
def test_fused_add_rms_norm_matches_reference(first):
    ref, _, tn = _mods()
    t, h = 77, 4096
    hs = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(t, h, device="cuda", dtype=torch.bfloat16) * 3
    w = torch.rand(h, device="cuda", dtype=torch.bfloat16) + 0.5
    r1, r2 = res.clone(), res.clone()
    o1 = torch.full_like(hs, float("nan"))
    o2 = torch.empty_like(hs)
    tn.fused_add_rms_norm(hs, r1, w, 1e-5, o1, first)
    ref.fused_add_rms_norm(hs, r2, w, 1e-5, o2, first)
    assert _rel(r1, r2) < 1e-3
    assert _rel(o1, o2) < 1e-2


def test_rms_norm_and_silu_mul_match_reference():
    ref, _, tn = _mods()
    x = torch.randn(33, 5120, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(5120, device="cuda", dtype=torch.bfloat16)
    o1, o2 = torch.full_like(x, float("nan")), torch.empty_like(x)
    tn.rms_norm(x, w, 1e-6, o1)
    ref.rms_norm(x, w, 1e-6, o2)
    assert _rel(o1, o2) < 1e-2
    gu = torch.randn(21, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    s1 = torch.full((21, 14336), float("nan"), device="cuda", dtype=torch.bfloat16)
    s2 = torch.empty_like(s1)
    tn.silu_mul(gu, s1)
    ref.silu_mul(gu, s2)
    assert _rel(s1, s2) < 1e-2


def test_rope_matches_reference_on_qkv_views():
    ref, _, tn = _mods()
    t, hq, hkv, d = 40, 32, 8, 128
    cs = ref.rope_cos_sin(4096, d, 500000.0, device="cuda")
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
    pos = torch.randint(0, 4096, (t,), device="cuda")
    q, k = qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    q2, k2 = q.clone(), k.clone()
    v_before = qkv[:, (hq + hkv) * d:].clone()
    tn.rope(q, k, pos, cs)
    ref.rope(q2, k2, pos, cs)
    assert _rel(q, q2) < 1e-2 and _rel(k, k2) < 1e-2
    assert torch.equal(qkv[:, (hq + hkv) * d:], v_before)  # v untouched


def test_dispatcher_picks_triton_on_cuda():
    _, ta, tn = _mods()
    from nfrt import kernels

    assert kernels.implementation("decode_attention", True) is ta.decode_attention
    assert kernels.implementation("fused_add_rms_norm", True) is tn.fused_add_rms_norm
