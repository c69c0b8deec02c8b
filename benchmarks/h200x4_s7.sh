#!/usr/bin/env bash
# Session 7 device call on a 4-GPU H200 host: the TP schedules re-solved with the network partition
# held only while a collective runs ([S2.sms-net], docs/formulation.md). GPU tests of TP first
# (TP 2 / 4 = TP 1 on the new searched schedules), then the benches; everything comes back as
# $OUT/results.tgz (packed after every step).
#   OUT=/tmp/out bash benchmarks/h200x4_s7.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
if ls .whl/*.whl >/dev/null 2>&1; then  # OR-Tools for the tests that solve (no registry here)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > $W/logs/wheels.log 2>&1 && export PYTHONPATH=/tmp/site
fi
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
bench() {  # bench GPUS SCHEDULE [extra args]
  local g=$1 s=$2; shift 2
  CUDA_VISIBLE_DEVICES=$g timeout 280 python3 -m nfsearch bench --schedule "$s" --iters 20 --out $W/bench "$@" \
    > $W/logs/bench-$(basename "$s" .yaml).log 2>&1
  echo "bench $s $* rc=$? at $(date -u +%H:%M:%S)"; }
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpus.log 2>&1
T=$(date -u +%Y%m%dT%H%M)
timeout 200 python3 -m pytest -q -m gpu tests/test_tp_gpu.py > $W/logs/gpu_tests_tp-4xh200-$T.log 2>&1
echo "tp gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -2 $W/logs/gpu_tests_tp-4xh200-$T.log; pack
bench 0,1,2,3 schedules/llama3-70b-h200-tp4-splitwise.yaml --rtol 0.1 --timeline $W/bench/tl-70b-$T.png; pack
# the overlap-policy mixtral file is now the same schedule as auto's (auto no longer picks sequential)
bench 0,1 schedules/mixtral-8x7b-h200-tp2-splitwise.yaml --timeline $W/bench/tl-mixtral-tp2-$T.png; pack
bench 0,1,2,3 schedules/llama3-70b-h200-tp4-splitwise.yaml --rtol 0.1; pack  # again: a second run
for f in $W/logs/bench-*.log; do echo "== $f"; grep -v '%|' "$f" | tail -12; done
