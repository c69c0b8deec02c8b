#!/usr/bin/env bash
# Session 9 device call on 4 H200s: the llama3 H200 schedules solved from the s9b profiles (every
# GEMM on a 64-token grid) benched, each beside its sequential schedule; the llama3-8b ones also
# beside the session-8 schedules (s9old/: `git show 25ef3f8:schedules/<name>.yaml`, solved from the previous profiles), on the other GPUs at
# the same time. Then the GPU tests. Everything comes back as $OUT/results.tgz.
#   OUT=/tmp/out bash benchmarks/h200x4_s9c.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
bench() {  # bench GPUS SCHEDULE [extra args]
  local g=$1 s=$2; shift 2
  CUDA_VISIBLE_DEVICES=$g timeout 240 python3 -m nfsearch bench --schedule "$s" --iters 20 --out $W/bench "$@" \
    > $W/logs/bench-$(basename "$s" .yaml).log 2>&1
  echo "bench $s rc=$? at $(date -u +%H:%M:%S)"; }
T=$(date -u +%Y%m%dT%H%M)
bench 0,1,2,3 schedules/llama3-70b-h200-tp4-splitwise.yaml --rtol 0.1 --timeline $W/bench/tl-llama3-70b-tp4-$T.png; pack
bench 0 schedules/llama3-8b-h200-tp1-splitwise.yaml & bench 1 s9old/llama3-8b-h200-tp1-splitwise-s8.yaml &
bench 2 schedules/llama3-8b-h200-tp1-const-1024-512.yaml & bench 3 s9old/llama3-8b-h200-tp1-const-1024-512-s8.yaml &
wait; pack
for f in $W/logs/bench-*.log; do echo "== $f"; grep -v '%|' "$f" | grep -E "speedup|batched|sequential|predicted|bound" | head -8; done
timeout 320 python3 -m pytest -q -m gpu tests/ > $W/logs/gpu_tests-4xh200-$T.log 2>&1
echo "gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -5 $W/logs/gpu_tests-4xh200-$T.log; pack
