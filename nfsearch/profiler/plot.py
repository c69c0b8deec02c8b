"""P(R) curves of a profile: the fraction of all-SM speed each op keeps on R SMs, one panel per kind."""

from __future__ import annotations

import os
from pathlib import Path

from nfsearch.errors import NfsearchError
from nfsearch.profile import Profile

# Kinds of the op vocabulary (docs/architecture.md); the plot must not need the model spec.
OP_KINDS = {
    "input_norm": "other", "qkv_proj": "compute", "rope": "other", "kv_append": "memory",
    "attn_decode": "memory", "attn_prefill": "compute", "o_proj": "compute", "attn_allreduce": "network",
    "post_norm": "other", "gate_up": "compute", "silu_mul": "other", "down": "compute", "router": "compute",
    "expert_gate_up": "compute", "expert_silu_mul": "other", "expert_down": "compute",
    "mlp_allreduce": "network", "final_norm": "other", "lm_head": "compute",
}


def _nearest(grid: tuple[int, ...], x: int) -> int:
    return min(grid, key=lambda g: (abs(g - x), g))


def pr_curves(profile: Profile, tokens: int = 1024, context: int = 1024) -> dict[str, dict[str, list[float]]]:
    """kind -> op -> P(R) over `profile.sm_grid()`, at the grid point nearest (tokens, context)."""
    sms = profile.sm_grid()
    out: dict[str, dict[str, list[float]]] = {}
    for op in profile.ops():
        t = _nearest(profile.token_grid(op), tokens)
        ctxs = profile.context_grid(op)
        c = 0 if ctxs == (0,) else _nearest(ctxs, context)
        full = profile.latency_us(op, t, c, sms[-1])
        curve = [full / max(profile.latency_us(op, t, c, s), 1e-9) for s in sms]
        out.setdefault(OP_KINDS.get(op, "other"), {})[op] = curve
    return out


def plot_pr(profile: Profile, path: str | os.PathLike[str], tokens: int = 1024, context: int = 1024) -> Path:
    """Write the P(R) plot as a PNG; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NfsearchError("--plot needs matplotlib (pip install matplotlib)") from None
    curves = pr_curves(profile, tokens, context)
    kinds = [k for k in ("compute", "memory", "network", "other") if k in curves]
    sms = profile.sm_grid()
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        ax.plot(sms, [s / sms[-1] for s in sms], "k--", lw=1, label="R / all SMs")
        for op, curve in sorted(curves[kind].items()):
            ax.plot(sms, curve, marker=".", label=op)
        ax.set_title(f"{kind} ops")
        ax.set_xlabel("SMs (R)")
        ax.set_ylim(0, 1.15)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("P(R) = latency(all SMs) / latency(R)")
    m = profile.meta
    fig.suptitle(f"{m.model} tp{m.tp} on {m.gpu_name} ({m.source}); tokens ~{tokens}, context ~{context}")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def summary_text(profile: Profile, tokens: int = 1024, context: int = 1024) -> str:
    """Ceilings, each op's all-SM latency and P(R) at a few sizes, and the interference table."""
    m = profile.meta
    lines = [f"{m.model} tp{m.tp} on {m.gpu_name} ({m.num_sms} SMs, {m.source}): peak {m.peak_tflops:.0f} "
             f"TFLOP/s, HBM {m.hbm_gbps:.0f} GB/s; driver {m.driver} cuda {m.cuda} torch {m.torch} "
             f"triton {m.triton}; {m.date}"]
    sms = profile.sm_grid()
    shown = [s for s in sms if s in (8, 16, 32, 48, 64, 96)]
    for op in profile.ops():
        t = _nearest(profile.token_grid(op), tokens)
        ctxs = profile.context_grid(op)
        c = 0 if ctxs == (0,) else _nearest(ctxs, context)
        full = profile.latency_us(op, t, c, sms[-1])
        pr = " ".join(f"{s}:{full / max(profile.latency_us(op, t, c, s), 1e-9):.2f}" for s in shown)
        lines.append(f"  {op:16s} tokens {t:5d} context {c:5d}: {full:9.1f} us on all SMs; P(R) {pr}")
    for (k, o), g in profile.interference.groupby(["kind", "other_kind"], sort=True):
        vals = " ".join(f"{int(s)}:{x:.3f}" for s, x in zip(g["num_sms"], g["slowdown"], strict=True))
        lines.append(f"  slowdown {k} beside {o}: {vals}")
    return "\n".join(lines)


def latency_spread(a: Profile, b: Profile) -> dict[str, float]:
    """Relative latency differences |a - b| / mean over the grid points both profiles share."""
    import numpy as np

    key = ["op", "tokens", "context", "num_sms"]
    j = a.latency.merge(b.latency, on=key, suffixes=("_a", "_b"))
    j = j[(j["latency_us_a"] > 0) & (j["latency_us_b"] > 0)]
    if j.empty:
        raise NfsearchError("the two profiles share no grid point")
    x, y = j["latency_us_a"].to_numpy(), j["latency_us_b"].to_numpy()
    rel = np.abs(x - y) / ((x + y) / 2)
    return {"points": float(len(rel)), "median": float(np.median(rel)), "p90": float(np.quantile(rel, 0.9)),
            "p99": float(np.quantile(rel, 0.99)), "max": float(rel.max()),
            "median_ratio": float(np.median(x / y))}
