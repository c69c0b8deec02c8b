#!/usr/bin/env bash
# Session 11 device call on 4 H200s, after h200x4_s11a.sh:
# 1. the gather-form ops added to the shipped mixtral TP 2 profile, alone this time (in s11a it
#    stalled at 403 of 630 points while the gather GPU tests ran on the other two GPUs);
# 2. a schedule forced into the all-gather form (benchmarks/probes/forced_gather.py: every token,
#    K = 1) of llama3-70b TP 4, benched beside its sequential (all-reduce) schedule, with a timeline.
#   OUT=/tmp/out bash benchmarks/h200x4_s11b.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench $W/profiles
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
T=$(date -u +%Y%m%dT%H%M)
echo "start $(date -u +%H:%M:%S)"
CUDA_VISIBLE_DEVICES=0,1 timeout 180 python3 -m nfsearch profile --model mixtral --tp 2 --add-ops \
  --profile profiles/h200/mixtral-8x7b-tp2.json --out $W/profiles/mixtral-8x7b-tp2.json > $W/logs/addops-mixtral.log 2>&1
echo "addops mixtral rc=$? at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/addops-mixtral.log | tail -2; pack
CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 200 python3 -m nfsearch bench --schedule benchmarks/runs/forced-gather-llama3-70b-h200-tp4-splitwise.yaml \
  --iters 20 --rtol 0.1 --out $W/bench --timeline $W/bench/tl-forced-gather-llama3-70b-tp4-$T.png > $W/logs/bench-forced-gather-70b.log 2>&1
echo "bench forced gather rc=$? at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/bench-forced-gather-70b.log | grep -vi warning | tail -12; pack
