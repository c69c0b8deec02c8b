#!/usr/bin/env bash
# Session 11 device call on 4 H200s: the all-gather form of the attention output (issue 8 item 3).
# 1. the gather-form ops added to the shipped llama3-70b TP 4 and mixtral TP 2 profiles
#    (`nfsearch profile --add-ops`); meanwhile the gather-form GPU tests on the other two GPUs;
# 2. both solved with --gather-form on this host (OR-Tools from .whl);
# 3. each searched gather-form schedule benched beside its sequential schedule, and the shipped
#    (all-reduce) schedule in the same call.
# Everything comes back as $OUT/results.tgz.
#   OUT=/tmp/out bash benchmarks/h200x4_s11a.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench $W/profiles $W/schedules
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl > $W/logs/wheels.log 2>&1 && export PYTHONPATH=/tmp/site
T=$(date -u +%Y%m%dT%H%M)
echo "start $(date -u +%H:%M:%S)"
CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 200 python3 -m nfsearch profile --model llama3-70b --tp 4 --add-ops \
  --profile profiles/h200/llama3-70b-tp4.json --out $W/profiles/llama3-70b-tp4.json > $W/logs/addops-70b.log 2>&1
echo "addops 70b rc=$? at $(date -u +%H:%M:%S)"; tail -2 $W/logs/addops-70b.log; pack
CUDA_VISIBLE_DEVICES=0,1 timeout 150 python3 -m nfsearch profile --model mixtral --tp 2 --add-ops \
  --profile profiles/h200/mixtral-8x7b-tp2.json --out $W/profiles/mixtral-8x7b-tp2.json > $W/logs/addops-mixtral.log 2>&1 &
CUDA_VISIBLE_DEVICES=2,3 timeout 150 python3 -m pytest -q -m gpu tests/test_tp_gpu.py -k "gather and not tp4" \
  > $W/logs/gpu_tests_gather-2xh200-$T.log 2>&1 &
wait
echo "addops mixtral + gather tests at $(date -u +%H:%M:%S)"; tail -2 $W/logs/addops-mixtral.log; tail -3 $W/logs/gpu_tests_gather-2xh200-$T.log; pack
timeout 150 python3 -m nfsearch solve --model llama3-70b --gpu h200 --tp 4 --profile $W/profiles/llama3-70b-tp4.json \
  --gather-form -o $W/schedules/llama3-70b-h200-tp4-splitwise-gather.yaml > $W/logs/solve-70b.log 2>&1 &
timeout 150 python3 -m nfsearch solve --model mixtral --gpu h200 --tp 2 --profile $W/profiles/mixtral-8x7b-tp2.json \
  --gather-form -o $W/schedules/mixtral-8x7b-h200-tp2-splitwise-gather.yaml > $W/logs/solve-mixtral.log 2>&1 &
CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 150 python3 -m pytest -q -m gpu tests/test_tp_gpu.py -k "gather and tp4" \
  > $W/logs/gpu_tests_gather_tp4-4xh200-$T.log 2>&1
echo "gather tp4 tests rc=$? at $(date -u +%H:%M:%S)"; tail -3 $W/logs/gpu_tests_gather_tp4-4xh200-$T.log
wait; echo "solves at $(date -u +%H:%M:%S)"; grep -E "nano-batches|predicted|gather" $W/logs/solve-*.log; pack
bench() {  # bench GPUS SCHEDULE [extra args]
  local g=$1 s=$2; shift 2
  CUDA_VISIBLE_DEVICES=$g timeout 200 python3 -m nfsearch bench --schedule "$s" --iters 20 --out $W/bench "$@" \
    > $W/logs/bench-$(basename "$s" .yaml).log 2>&1
  echo "bench $s rc=$? at $(date -u +%H:%M:%S)"; }
bench 0,1,2,3 $W/schedules/llama3-70b-h200-tp4-splitwise-gather.yaml --rtol 0.1 --timeline $W/bench/tl-llama3-70b-tp4-gather-$T.png; pack
bench 0,1,2,3 schedules/llama3-70b-h200-tp4-splitwise.yaml --rtol 0.1; pack
bench 0,1 $W/schedules/mixtral-8x7b-h200-tp2-splitwise-gather.yaml & bench 2,3 schedules/mixtral-8x7b-h200-tp2-splitwise.yaml & wait; pack
for f in $W/logs/bench-*.log; do echo "== $f"; grep -v '%|' "$f" | grep -E "speedup|predicted|bound|error" | head -6; done
