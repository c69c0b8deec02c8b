#!/usr/bin/env bash
# Session 11 device call on 4 H200s: the five H200 benchmark schedules solved from the profiles whose
# sustained table is stored over the profile's own latencies (h200x4_s11c.sh), each benched beside
# its sequential schedule; then the tensor-parallel GPU tests (the all-gather form included).
#   OUT=/tmp/out bash benchmarks/h200x4_s11d.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
bench() {  # bench GPUS SCHEDULE [extra args]
  local g=$1 s=$2; shift 2
  CUDA_VISIBLE_DEVICES=$g timeout 200 python3 -m nfsearch bench --schedule "$s" --iters 20 --out $W/bench "$@" \
    > $W/logs/bench-$(basename "$s" .yaml).log 2>&1
  echo "bench $s rc=$? at $(date -u +%H:%M:%S)"; }
T=$(date -u +%Y%m%dT%H%M)
bench 0 schedules/llama3-8b-h200-tp1-splitwise.yaml & bench 1 schedules/llama3-8b-h200-tp1-const-1024-512.yaml &
bench 2,3 schedules/mixtral-8x7b-h200-tp2-splitwise.yaml & wait; pack
bench 0,1,2,3 schedules/llama3-70b-h200-tp4-splitwise.yaml --rtol 0.1; pack
bench 0 schedules/mixtral-8x7b-h200-tp1-splitwise.yaml; pack
for f in $W/logs/bench-*.log; do echo "== $f"; grep -v '%|' "$f" | grep -E "nano-batched|sequential \(graph|speedup" | head -4; done
timeout 150 python3 -m pytest -q -m gpu tests/test_tp_gpu.py > $W/logs/gpu_tests_tp-4xh200-$T.log 2>&1
echo "tp gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -3 $W/logs/gpu_tests_tp-4xh200-$T.log; pack
