"""Disjoint green-context SM partitions: sizes, disjointness (%smid), work, CUDA-graph capture."""

from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")

from nfrt.errors import NfrtError  # noqa: E402


@pytest.mark.parametrize("sizes,msg", [
    ([], "non-empty"),
    ([0, 8], "positive"),
    ([12, 120], "multiple of 8"),
    ([8, 60, 64], "multiple of 8"),   # only the largest may be an unaligned remainder
    ([8, 62, 62], "multiple of 8"),   # ... and only when it is the single largest
    ([64, 64, 8], "sum to 136"),
])
def test_validate_rejects_bad_sizes(sizes, msg):
    from nfrt.partition import _validate

    with pytest.raises(NfrtError, match=msg):
        _validate(sizes, 132, 8)


def test_validate_accepts_aligned_sizes_and_an_unaligned_final_remainder():
    from nfrt.partition import _validate

    for sizes in ([16, 116], [48, 84], [64, 68], [32, 32, 64], [8], [40, 40]):
        _validate(sizes, 132, 8)


def test_missing_cuda_bindings_is_a_clear_error(monkeypatch):
    from nfrt import partition

    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", None)
    with pytest.raises(NfrtError, match="cuda-bindings"):
        partition._driver()


def _splits(total: int) -> list[list[int]]:
    return [[16, total - 16], [48, total - 48], [64, total - 64], [32, 32, 64]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", range(4))
def test_partitions_are_disjoint_exact_and_run_work(case):
    pytest.importorskip("triton")
    from nfrt.partition import make_partitions, stream_num_sms
    from nfrt.probe import sm_ids

    total = torch.cuda.get_device_properties(0).multi_processor_count
    sizes = _splits(total)[case]
    with make_partitions(sizes) as parts:
        assert parts.sizes == sizes
        seen = [sm_ids(p.stream) for p in parts]
        for s, ids in zip(sizes, seen, strict=True):
            assert len(ids) == s
        for i in range(len(seen)):
            for j in range(i + 1, len(seen)):
                assert not seen[i] & seen[j]
        a = torch.randn(512, 1024, device="cuda")
        b = torch.randn(1024, 256, device="cuda")
        want = a @ b
        for p in parts:
            assert stream_num_sms(p.stream) == p.num_sms
            p.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(p.stream):
                got = a @ b
            p.stream.synchronize()
            assert ((got - want).norm() / want.norm()).item() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_make_partitions_rejects_unaligned_and_too_large():
    from nfrt.partition import make_partitions

    total = torch.cuda.get_device_properties(0).multi_processor_count
    with pytest.raises(NfrtError, match="multiple of"):
        make_partitions([12, 24])
    with pytest.raises(NfrtError, match="sum to"):
        make_partitions([total + 8])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_captures_two_partition_streams_with_events():
    pytest.importorskip("triton")
    from nfrt.kernels import reference as ref
    from nfrt.kernels import triton_attention as ta
    from nfrt.partition import make_partitions

    with make_partitions([48, torch.cuda.get_device_properties(0).multi_processor_count - 48]) as parts:
        mem, comp = parts[0].stream, parts[1].stream
        n, hq, hkv, d, ctx_len = 16, 32, 8, 128, 256
        pages = n * ctx_len // 16
        kc = torch.randn(pages, 16, hkv, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        pt = torch.randperm(pages, device="cuda").view(n, -1).int()
        ctx = torch.full((n,), ctx_len, device="cuda", dtype=torch.int32)
        q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
        attn_out = torch.empty_like(q)
        x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16)
        gemm_out = torch.empty(256, 2048, device="cuda", dtype=torch.bfloat16)
        for s in (mem, comp):  # compile, and make cuBLAS workspaces, outside the capture
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                ta.decode_attention(q, kc, vc, pt, ctx, 0.1, attn_out)
                torch.matmul(x, w, out=gemm_out)
        torch.cuda.synchronize()

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            cur = torch.cuda.current_stream()
            fork = torch.cuda.Event()
            fork.record(cur)
            mem.wait_event(fork)
            comp.wait_event(fork)
            with torch.cuda.stream(mem):
                ta.decode_attention(q, kc, vc, pt, ctx, 0.1, attn_out)
                done_mem = torch.cuda.Event()
                done_mem.record(mem)
            with torch.cuda.stream(comp):
                torch.matmul(x, w, out=gemm_out)
                done_comp = torch.cuda.Event()
                done_comp.record(comp)
            cur.wait_event(done_mem)
            cur.wait_event(done_comp)

        for _ in range(2):  # fresh inputs each replay
            q.copy_(torch.randn_like(q))
            x.copy_(torch.randn_like(x))
            attn_out.fill_(float("nan"))
            gemm_out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            expect = torch.empty_like(q)
            ref.decode_attention(q, kc, vc, pt, ctx, 0.1, expect)
            rel = (attn_out.float() - expect.float()).norm() / expect.float().norm()
            assert rel.item() < 1e-2
            want = x.float() @ w.float()
            assert ((gemm_out.float() - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_layout_ranges_are_exact_and_intersect_only_where_they_overlap():
    """Placed partitions (the schedule's first_sm/num_sms): one split, streams over group ranges."""
    pytest.importorskip("triton")
    from nfrt.partition import make_layout, stream_num_sms
    from nfrt.probe import sm_ids

    layout = make_layout()
    total, aligned = layout.total, layout.aligned
    try:
        low = layout.stream(0, aligned - 40)  # a compute partition at the low end
        high = layout.stream(aligned - 40, 40)  # a memory partition at the high end
        mid = layout.stream(aligned - 48, 16)  # overlaps both by 8
        full = layout.stream(0, total)
        a, b, c, f = sm_ids(low), sm_ids(high), sm_ids(mid), sm_ids(full)
        assert (len(a), len(b), len(c), len(f)) == (aligned - 40, 40, 16, total)
        assert not a & b
        assert len(a & c) == 8 and len(b & c) == 8
        assert a | b <= f
        assert stream_num_sms(low) == aligned - 40 and stream_num_sms(full) == total
        with pytest.raises(NfrtError, match="aligned"):
            layout.stream(4, 16)
    finally:
        layout.close()
