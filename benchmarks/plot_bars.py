"""Bar chart of bench records: per row, the searched schedule's and the sequential schedule's
measured tokens/s per GPU, the searched schedule's predicted tokens/s, and the bound.

    python benchmarks/plot_bars.py benchmarks/runs/A.json [B.json ...] -o benchmarks/bars-h200.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def row(path: Path) -> dict:
    d = json.loads(path.read_text())
    tp = d.get("tp", 1)
    tokens = d["tokens_per_iteration"]
    pred_us = d["prediction"]["iteration_us"] if d.get("prediction") else None
    label = f"{d['model']} tp{tp}\n{d['workload']}\n{d['speedup_vs_sequential']:.3f}x"
    return {"label": label, "iters": d["settings"]["iters"],
            "nano": d["results"]["nano"]["tokens_per_s_per_gpu"],
            "sequential": d["results"]["sequential"]["tokens_per_s_per_gpu"],
            "predicted": tokens / (pred_us * 1e-6) / tp if pred_us else 0.0,
            "bound": d["bound"]["optimal_tokens_per_s_per_gpu"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("records", nargs="+", type=Path)
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()
    rows = [row(p) for p in a.records]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 4.2), squeeze=False)
    keys = (("nano", "searched, measured"), ("predicted", "searched, predicted"),
            ("sequential", "sequential, measured"), ("bound", "bound"))
    for ax, r in zip(axes[0], rows, strict=True):
        vals = [r[k] for k, _ in keys]
        ax.bar(range(len(keys)), vals, color=["tab:blue", "tab:cyan", "tab:gray", "tab:red"])
        ax.set_xticks(range(len(keys)), [n for _, n in keys], rotation=45, ha="right", fontsize=7)
        ax.set_title(r["label"], fontsize=8)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v / r['bound']:.0%}", ha="center", va="bottom", fontsize=7)
    axes[0][0].set_ylabel("tokens/s per GPU (label: fraction of bound)")
    iters = sorted({r["iters"] for r in rows})
    fig.suptitle("nfsearch bench: searched vs sequential, CUDA graphs, median of "
                 + " / ".join(str(i) for i in iters) + " replays", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
