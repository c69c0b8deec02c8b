"""Check and time nfrt's Triton kernels and disjoint SM partitions in one GPU run.

    PYTHONUNBUFFERED=1 python benchmarks/kernels_bench.py --out DIR

Measures: copy bandwidth (1 GiB, bytes read + written); paged decode attention (Llama-3-8B heads,
512 requests x 1024 context, page 16, bf16) over a config sweep on all SMs and on disjoint 48- and
32-SM green-context partitions, P(R) = all-SM time / R-SM time; a cuBLAS GEMM fenced to N SMs vs
N/num_sms of its full speed; GEMM || decode attention on disjoint partitions vs sequential; split-KV
on a small batch; prefill attention; the row kernels. Writes results.json and kernels.md to DIR.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback

import torch
import triton
import triton.language as tl
import triton.testing
from nfrt.kernels import reference as ref
from nfrt.kernels import triton_attention as ta
from nfrt.kernels import triton_norm as tn
from nfrt.partition import make_partitions
from nfrt.probe import sm_ids

from nfsearch.bench_measure import driver_version

do_bench = triton.testing.do_bench

R: dict = {}
LINES: list[str] = []


def say(s: str) -> None:
    print(s, flush=True)
    LINES.append(s)


def timed(fn, stream=None, rep: int = 80) -> float:
    """Median ms of fn on `stream` (default: the current one)."""
    if stream is None:
        return do_bench(fn, warmup=10, rep=rep, return_mode="median")
    with torch.cuda.stream(stream):
        return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def section(name):
    def wrap(fn):
        def run(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:  # keep measuring the rest; the error is in the log
                say(f"!! {name} failed: {type(e).__name__}: {e}")
                traceback.print_exc()
                R.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {e}")
        return run
    return wrap


def info() -> None:
    p = torch.cuda.get_device_properties(0)
    drv = driver_version(0)
    try:
        import cuda.bindings
        cb = cuda.bindings.__version__
    except Exception:
        cb = "missing"
    R["info"] = dict(gpu=p.name, sms=p.multi_processor_count, torch=torch.__version__,
                     triton=triton.__version__,
                     cuda=torch.version.cuda, driver=drv, cuda_bindings=cb,
                     date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"))
    say(f"info: {R['info']}")


@section("copy")
def copy_bw(parts) -> None:
    src = torch.randn(512 * 2**20, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * 2
    t = timed(lambda: dst.copy_(src))
    R["copy"] = dict(ms=t, gbps=nbytes / t / 1e6)
    for n, s in parts.items():
        R["copy"][f"P{n}"] = t / timed(lambda: dst.copy_(src), s)
    say(f"copy 1 GiB: {t:.3f} ms = {nbytes / t / 1e6:.0f} GB/s (read+write); "
        + " ".join(f"P({n})={R['copy'][f'P{n}']:.2f}" for n in parts))


@section("partitions")
def check_partitions(all_parts) -> None:
    out = {}
    for key, parts in all_parts.items():
        seen = [sm_ids(p.stream) for p in parts]
        overlap = sum(len(seen[i] & seen[j]) for i in range(len(seen)) for j in range(i + 1, len(seen)))
        out[key] = dict(asked=parts.sizes, seen=[len(s) for s in seen], overlap=overlap)
        say(f"partition {key}: asked {parts.sizes}, %smid saw {[len(s) for s in seen]}, overlap {overlap}")
    try:
        from nfrt.probe import sm_ids_cupy
        p = all_parts["48"][0]
        same = sm_ids_cupy(p.stream) == sm_ids(p.stream)
        out["cupy_agrees"] = same
        say(f"cupy %smid probe agrees with the Triton one: {same}")
    except ImportError:
        pass
    R["partitions"] = out


def decode_setup(n=512, ctx=1024, hq=32, hkv=8, d=128):
    pages_per = ctx // 16
    num_pages = n * pages_per + 64
    kc = torch.randn(num_pages, 16, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    pt = torch.randperm(num_pages, device="cuda")[: n * pages_per].view(n, pages_per).int()
    lens = torch.full((n,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
    return q, kc, vc, pt, lens


# (kernel, block_n, num_warps, num_stages): the survivors of earlier sweeps (benchmarks/kernels.md)
CONFIGS = [ta.DecodeConfig(b, w, s, 8, kernel=k) for k, b, w, s in (
    ("ptr", 128, 4, 2), ("ptr", 64, 4, 2), ("tma", 16, 1, 4), ("tma", 16, 1, 5), ("tma", 16, 1, 6),
    ("tma", 16, 1, 7), ("tma", 16, 1, 8), ("tma", 16, 2, 6))]


def cfg_name(c: ta.DecodeConfig) -> str:
    return f"{c.kernel}{c.block_n}_w{c.num_warps}_s{c.num_stages}"


@triton.jit
def _read_sum(x_ptr, out_ptr, n, BLOCK: tl.constexpr, NPROG: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in tl.range(pid * BLOCK, n, NPROG * BLOCK, num_stages=4):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


@section("stream_read")
def stream_read(parts, setup) -> None:
    """The ceiling for a pure read of the same 2 GiB (the DESIGN.md streaming probe's best shape)."""
    kc = setup[1]
    x = kc.view(-1)
    out = torch.empty(132 * 16, device="cuda", dtype=torch.float32)
    res = {}
    for name, stream in {"all": None, **parts}.items():
        nsm = R["info"]["sms"] if stream is None else int(name)
        best = min(timed(lambda: _read_sum[(nsm * occ,)](x, out, x.numel(), BLOCK=16384, NPROG=nsm * occ,  # noqa: B023
                                                            num_warps=16), stream, rep=40) for occ in (2, 4))
        res[name] = x.numel() * 2 / best / 1e6
    res.update({f"P{k}": res[k] / res["all"] for k in parts})
    R["stream_read"] = res
    say("streaming read of the K cache (GB/s): " + " ".join(f"{k}={v:.0f}" if not k.startswith("P") else
                                                           f"{k}={v:.2f}" for k, v in res.items()))


@section("decode")
def decode(parts, setup) -> None:
    q, kc, vc, pt, lens = setup
    n, hq, d = q.shape
    hkv = kc.shape[2]
    kv_bytes = n * int(lens[0]) * hkv * d * 2 * 2 + 2 * q.numel() * 2
    out = torch.full_like(q, float("nan"))
    ta.decode_attention(q, kc, vc, pt, lens, d ** -0.5, out)
    expect = torch.empty_like(q[:48])
    ref.decode_attention(q[:48], kc, vc, pt[:48], lens[:48], d ** -0.5, expect)
    err = rel(out[:48], expect)
    say(f"decode correctness (bar shape, first 48 requests): rel err {err:.2e}, "
        f"NaN {bool(out.isnan().any())}")
    res = dict(rel_err=err, kv_bytes=kv_bytes, sweep={})
    targets = {"all": None, **parts}
    for cfg in CONFIGS:
        key = cfg_name(cfg)
        row = {}
        for name, stream in targets.items():
            nsm = R["info"]["sms"] if stream is None else int(name)
            try:
                fn = lambda: ta.decode_attention(q, kc, vc, pt, lens, d ** -0.5, out,  # noqa: B023
                                                 num_sms=nsm, config=cfg, splits=1)  # noqa: B023
                row[name] = timed(fn, stream, rep=50)
            except Exception as e:
                row[name] = None
                say(f"  config {key} on {name}: {type(e).__name__}: {str(e)[:120]}")
        res["sweep"][key] = row
        say(f"  {key}: " + " ".join(f"{k}={v:.3f}ms" if v else f"{k}=fail" for k, v in row.items()))
    best = {}
    for name in targets:
        ok = {k: r[name] for k, r in res["sweep"].items() if r.get(name)}
        k = min(ok, key=ok.get)
        best[name] = dict(config=k, ms=ok[k], gbps=kv_bytes / ok[k] / 1e6)
    res["best"] = best
    full = best["all"]
    res["copy_fraction"] = full["gbps"] / R["copy"]["gbps"] if "copy" in R else 0.0
    for name in parts:
        res[f"P{name}"] = full["ms"] / best[name]["ms"]
        same = res["sweep"][full["config"]][name]
        res[f"P{name}_same_config"] = full["ms"] / same if same else None
    R["decode"] = res
    say(f"decode best all SMs: {full['config']} {full['ms']:.3f} ms = {full['gbps']:.0f} GB/s = "
        f"{res['copy_fraction']:.2f} x copy bandwidth")
    for name in parts:
        say(f"decode on {name} SMs: best {best[name]['config']} {best[name]['ms']:.3f} ms, "
            f"P({name}) = {res[f'P{name}']:.2f} "
            f"(same config as all-SM: {res[f'P{name}_same_config'] or 0:.2f})")


@section("sdpa")
def sdpa(parts) -> None:
    n, c = 512, 1024
    q = torch.randn(n, 8, 4, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, 8, c, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    t = timed(fn)
    R["sdpa"] = dict(ms=t, **{f"P{n_}": t / timed(fn, s) for n_, s in parts.items()})
    say(f"torch SDPA decode (dense, same shape): {t:.3f} ms; "
        + " ".join(f"P({k_})={R['sdpa'][f'P{k_}']:.2f}" for k_ in parts))


@section("gemm")
def gemm(gemm_parts) -> None:
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 28672, device="cuda", dtype=torch.bfloat16)
    fn = lambda: x @ w
    t = timed(fn)
    total = R["info"]["sms"]
    res = dict(ms=t, tflops=2 * 2048 * 4096 * 28672 / t / 1e9)
    say(f"GEMM 2048x4096x28672 all SMs: {t:.3f} ms = {res['tflops']:.0f} TFLOP/s")
    for nsm, stream in gemm_parts.items():
        tn_ = timed(fn, stream)
        frac = t / tn_
        res[f"N{nsm}"] = dict(ms=tn_, speed_fraction=frac, vs_linear=frac / (nsm / total))
        say(f"  GEMM on {nsm} SMs: {tn_:.3f} ms, speed {frac:.3f} of full, "
            f"{frac / (nsm / total):.2f} x N/{total}")
    R["gemm"] = res


@section("overlap")
def overlap(parts48, setup) -> None:
    q, kc, vc, pt, lens = setup
    out = torch.empty_like(q)
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 28672, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(2048, 28672, device="cuda", dtype=torch.bfloat16)
    mem, comp = parts48[0].stream, parts48[1].stream
    attn = lambda: ta.decode_attention(q, kc, vc, pt, lens, 0.088, out)
    mm = lambda: torch.matmul(x, w, out=y)

    def both():
        cur = torch.cuda.current_stream()
        mem.wait_stream(cur)
        comp.wait_stream(cur)
        with torch.cuda.stream(comp):
            mm()
        with torch.cuda.stream(mem):
            attn()
        cur.wait_stream(mem)
        cur.wait_stream(comp)

    seq = timed(attn) + timed(mm)
    solo_a, solo_g = timed(attn, mem), timed(mm, comp)
    con = timed(both)
    R["overlap"] = dict(sequential_ms=seq, concurrent_ms=con, speedup=seq / con, attn48_ms=solo_a,
                        gemm84_ms=solo_g)
    say(f"GEMM on {parts48[1].num_sms} SMs || decode on 48 SMs: {con:.3f} ms vs sequential all-SM "
        f"{seq:.3f} ms -> {seq / con:.2f}x (solo on partitions: attn {solo_a:.3f}, gemm {solo_g:.3f})")


@section("split")
def small_batch(parts, setup) -> None:
    _, kc, vc, pt_big, _ = setup
    n, ctx, pages = 32, 4096, 256
    pt = pt_big.view(-1)[: n * pages].view(n, pages).contiguous()
    lens = torch.full((n,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    ta.decode_attention(q, kc, vc, pt, lens, 0.088, out)
    exp = torch.empty_like(q)
    ref.decode_attention(q, kc, vc, pt, lens, 0.088, exp)
    nbytes = n * ctx * 8 * 128 * 4
    res = dict(rel_err=rel(out, exp))
    for name, stream in {"all": None, **parts}.items():
        nsm = R["info"]["sms"] if stream is None else int(name)
        one = lambda: ta.decode_attention(q, kc, vc, pt, lens, 0.088, out, num_sms=nsm, splits=1)  # noqa: B023
        auto = lambda: ta.decode_attention(q, kc, vc, pt, lens, 0.088, out, num_sms=nsm)  # noqa: B023
        t1, ta_ = timed(one, stream), timed(auto, stream)
        res[name] = dict(no_split_gbps=nbytes / t1 / 1e6, auto_split_gbps=nbytes / ta_ / 1e6)
    R["split"] = res
    say(f"decode 32 requests x 4096 ctx (split-KV), rel err {res['rel_err']:.1e}: " + "; ".join(
        f"{k}: {v['no_split_gbps']:.0f} -> {v['auto_split_gbps']:.0f} GB/s"
        for k, v in res.items() if k != "rel_err"))


@section("prefill")
def prefill(setup) -> None:
    _, kc, vc, pt, _ = setup
    reqs, prefix, chunk = 8, 512, 512
    token_req = torch.arange(reqs, device="cuda", dtype=torch.int32).repeat_interleave(chunk)
    token_pos = (prefix + torch.arange(chunk, device="cuda", dtype=torch.int32)).repeat(reqs)
    t = reqs * chunk
    q = torch.randn(t, 32, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    ta.prefill_attention(q, kc, vc, pt[:reqs], token_req, token_pos, 0.088, out)
    sub = torch.randint(0, t, (256,), device="cuda")
    exp = torch.empty_like(q[sub])
    ref.prefill_attention(q[sub], kc, vc, pt[:reqs], token_req[sub], token_pos[sub], 0.088, exp)
    err = rel(out[sub], exp)
    flops = 4 * 32 * 128 * float((token_pos.double() + 1).sum())
    ms = timed(lambda: ta.prefill_attention(q, kc, vc, pt[:reqs], token_req, token_pos, 0.088, out))
    R["prefill"] = dict(rel_err=err, ms=ms, tflops=flops / ms / 1e9, nan=bool(out.isnan().any()))
    say(f"prefill 8 x 512 tokens after 512 cached: rel err {err:.1e}, {ms:.3f} ms = "
        f"{flops / ms / 1e9:.0f} TFLOP/s")


@section("rows")
def rows() -> None:
    t, h, inter = 4096, 4096, 14336
    hs = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(hs)
    w = torch.randn(h, device="cuda", dtype=torch.bfloat16)
    o = torch.empty_like(hs)
    res = {}
    ms = timed(lambda: tn.fused_add_rms_norm(hs, r, w, 1e-5, o, False))
    res["fused_add_rms_norm"] = dict(ms=ms, gbps=4 * t * h * 2 / ms / 1e6)
    qkv = torch.randn(t, 48 * 128, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[:, :4096].view(t, 32, 128), qkv[:, 4096:5120].view(t, 8, 128)
    cs = ref.rope_cos_sin(8192, 128, 500000.0, device="cuda")
    pos = torch.randint(0, 8192, (t,), device="cuda")
    ms = timed(lambda: tn.rope(q, k, pos, cs))
    res["rope"] = dict(ms=ms, gbps=2 * t * 40 * 128 * 2 / ms / 1e6)
    gu = torch.randn(t, 2 * inter, device="cuda", dtype=torch.bfloat16)
    so = torch.empty(t, inter, device="cuda", dtype=torch.bfloat16)
    ms = timed(lambda: tn.silu_mul(gu, so))
    res["silu_mul"] = dict(ms=ms, gbps=3 * t * inter * 2 / ms / 1e6)
    kc = torch.empty(t // 16 + 8, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.empty_like(kc)
    v = qkv[:, 5120:].view(t, 8, 128)
    slots = torch.randperm(kc.shape[0] * 16, device="cuda")[:t]
    ms = timed(lambda: ta.kv_append(k, v, kc, vc, slots))
    res["kv_append"] = dict(ms=ms, gbps=4 * t * 8 * 128 * 2 / ms / 1e6)
    R["rows"] = res
    say("row kernels (4096 tokens): " + "; ".join(f"{k_} {v_['ms'] * 1e3:.0f} us {v_['gbps']:.0f} GB/s"
                                                   for k_, v_ in res.items()))


def _p48_p32(r: dict) -> str:
    return f"P(48) {r.get('P48', 0):.2f}, P(32) {r.get('P32', 0):.2f}"


def markdown() -> str:
    i = R.get("info", {})
    d = R.get("decode", {})
    g = R.get("gemm", {})
    lines = [f"Measured {i.get('date')} on {i.get('gpu')} ({i.get('sms')} SMs), driver {i.get('driver')}, "
             f"torch {i.get('torch')}, triton {i.get('triton')}, CUDA {i.get('cuda')}, "
             f"cuda-bindings {i.get('cuda_bindings')}.", "",
             "| measurement | result | bar |", "|---|---|---|"]
    if "copy" in R:
        lines.append(f"| copy_ 1 GiB, all SMs | {R['copy']['gbps']:.0f} GB/s (read + write) | |")
    if d.get("best"):
        b = d["best"]
        lines.append(f"| decode attention 512 x 1024, all SMs | {b['all']['ms']:.3f} ms, "
                     f"{b['all']['gbps']:.0f} GB/s "
                     f"= {d['copy_fraction'] or 0:.2f} x copy ({b['all']['config']}) | >= 0.90 |")
        for n, bar in (("48", 0.85), ("32", 0.6)):
            if n in b:
                lines.append(f"| decode attention P({n}) | {d[f'P{n}']:.2f} ({b[n]['config']}; "
                             f"all-SM config: "
                             f"{d[f'P{n}_same_config'] or 0:.2f}) | >= {bar} |")
    if "stream_read" in R:
        lines.append(f"| plain Triton streaming read (ceiling for P) | {R['stream_read']['all']:.0f} GB/s; "
                     f"{_p48_p32(R['stream_read'])} | |")
    if "split" in R:
        sp = R["split"]
        lines.append("| decode 32 x 4096 (split-KV), GB/s without -> with splits | " + "; ".join(
            f"{k}: {v['no_split_gbps']:.0f} -> {v['auto_split_gbps']:.0f}" for k, v in sp.items()
            if k != "rel_err") + " | |")
    if "sdpa" in R:
        lines.append(f"| torch SDPA decode (dense), for comparison | {R['sdpa']['ms']:.3f} ms; "
                     f"{_p48_p32(R['sdpa'])} | |")
    for n in (64, 84, 100):
        if f"N{n}" in g:
            lines.append(f"| GEMM 2048x4096x28672 on {n} SMs | {g[f'N{n}']['speed_fraction']:.3f} of full = "
                         f"{g[f'N{n}']['vs_linear']:.2f} x N/{i.get('sms')} | >= 0.90 |")
    if "overlap" in R:
        o = R["overlap"]
        lines.append(f"| GEMM (84 SMs) concurrent with decode (48 SMs) | {o['concurrent_ms']:.3f} ms vs "
                     f"{o['sequential_ms']:.3f} ms sequential = {o['speedup']:.2f}x | |")
    if "prefill" in R:
        p = R["prefill"]
        lines.append(f"| prefill attention 8 x 512 after 512 | {p['ms']:.3f} ms, {p['tflops']:.0f} TFLOP/s, "
                     f"rel err {p['rel_err']:.1e} | |")
    return "\n".join(lines) + "\n\nFull log:\n\n```\n" + "\n".join(LINES) + "\n```\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    torch.manual_seed(0)
    info()
    total = R["info"]["sms"]
    try:
        p48, p32, p64 = (make_partitions([n, total - n]) for n in (48, 32, 64))
    except Exception as e:  # still measure the all-SM numbers
        say(f"!! make_partitions failed: {type(e).__name__}: {e}")
        R.setdefault("errors", []).append(f"make_partitions: {e}")
        p48 = p32 = p64 = None
    if p48 is not None:
        check_partitions({"48": p48, "32": p32, "64": p64})
        mem_parts = {"48": p48[0].stream, "32": p32[0].stream}
    else:
        mem_parts = {}
    copy_bw(mem_parts)
    setup = decode_setup()
    stream_read(mem_parts, setup)
    decode(mem_parts, setup)
    sdpa(mem_parts)
    if p48 is not None:
        gemm({64: p64[0].stream, total - 48: p48[1].stream, total - 32: p32[1].stream})
        overlap(p48, setup)
    small_batch(mem_parts, setup)
    prefill(setup)
    rows()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(R, f, indent=1)
    try:
        md = markdown()
    except Exception as e:
        md = f"(table failed: {e})\n\n```\n" + "\n".join(LINES) + "\n```\n"
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write(md)
    print(md)
    for p in (p48, p32, p64):
        if p is not None:
            p.close()
    sys.exit(1 if R.get("errors") else 0)


if __name__ == "__main__":
    main()
