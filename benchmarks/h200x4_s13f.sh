#!/usr/bin/env bash
# Session 13 device call on 4 H200s: `nfsearch ceiling` for llama3-70b TP 4 again (same code as the
# 21:21 run of 2026-11-21), to see whether its "compute alone on 112 SMs faster than on all 132"
# reproduces, which the fenced-layer probe (h200x4_s13c.sh) did not show in a whole layer.
#   OUT=/tmp/out bash benchmarks/h200x4_s13f.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/runs
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
timeout 400 python3 -m nfsearch ceiling --schedule schedules/llama3-70b-h200-tp4-splitwise-overlap.yaml \
  --out $W/runs > $W/logs/ceiling-llama3-70b-tp4.log 2>&1
echo "ceiling rc=$? at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/ceiling-llama3-70b-tp4.log | grep -v Warning | tail -26; pack
