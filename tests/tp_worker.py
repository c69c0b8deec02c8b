"""One rank of a tensor-parallel run, for the TP tests: `torchrun --nproc-per-node N tests/tp_worker.py
--schedule S --out OUT [--device cuda] [--seed W] [--batch-seed B] [--layers K] [--dtype float32]`.

Every rank builds the engine of S (its weight shard from seed W) and its sequential twin and runs
the synthetic batch of seed B eagerly through both (and, on CUDA, through the captured graph).
Rank 0 saves {"nano", "sequential", "graph"} float32 logits [samples, vocab] to OUT.
"""

from __future__ import annotations

import argparse

import torch
from nfrt.engine import Engine
from nfrt.schedule import load_schedule

from nfsearch.bench import truncate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--schedule", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--dtype", choices=("default", "float32"), default="default")
    a = p.parse_args()
    schedule = truncate(load_schedule(a.schedule), a.layers)
    dtype = torch.float32 if a.dtype == "float32" else None
    eng = Engine.from_schedule(schedule, device=a.device, seed=a.seed, dtype=dtype)
    twin = eng.sequential_twin()
    batch = eng.synthetic_batch(seed=a.batch_seed)
    out = {"nano": eng.run(batch), "sequential": twin.run(batch)}
    if eng.device.type == "cuda":
        eng.prepare(batch)
        eng.capture()
        eng.model.logits.fill_(float("nan"))
        out["graph"] = eng.replay().float().clone()
        torch.cuda.synchronize()
    if eng.model.tp.rank == 0:
        torch.save({k: v.cpu() for k, v in out.items()}, a.out)
    eng.model.tp.barrier()
    eng.close()
    eng.model.tp.close()


if __name__ == "__main__":
    main()
