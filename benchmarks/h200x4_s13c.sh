#!/usr/bin/env bash
# Session 13 device call on 4 H200s, a probe of the cost model's SM scaling under the power cap:
# llama3-70b TP 4's sequential schedule with every nano-op fenced to SMs [0, 112) and [0, 120)
# (hand-edited copies, benchmarks/probes/sched/), each benched beside the all-SM sequential twin.
# The profile (held against the layer, burst x a factor shared across SM counts) charges the layer
# 12% / 9% more there; `nfsearch ceiling` (21:21, 2026-11-21) measured compute alone on 112 SMs
# faster than on all 132. Which one a schedule sees decides how much overlap can gain.
#   OUT=/tmp/out bash benchmarks/h200x4_s13c.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
for n in 112 120; do
  timeout 200 python3 -m nfsearch bench --schedule benchmarks/probes/sched/llama3-70b-h200-tp4-splitwise-seq$n.yaml \
    --iters 20 --rtol 0.1 --out $W/bench > $W/logs/bench-seq$n.log 2>&1
  echo "bench seq$n rc=$? at $(date -u +%H:%M:%S)"
  grep -v '%|' $W/logs/bench-seq$n.log | grep -E "nano-batched|sequential \(graph|speedup" | head -4; pack
done
