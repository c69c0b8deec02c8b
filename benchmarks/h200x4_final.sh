#!/usr/bin/env bash
# Device call on a 4-GPU H200 host: bench the H200 schedules (TP ones across GPUs, single-GPU ones
# side by side on the free GPUs), the end-to-end serving bench, then the GPU tests. Results are
# packed into $OUT/results.tgz after every stage (a timeout still returns what finished).
#   OUT=/tmp/out bash benchmarks/h200x4_final.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-final; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
if ls .whl/*.whl >/dev/null 2>&1; then  # ortools: the TP tests solve tiny schedules
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > $W/logs/wheels.log 2>&1 && export PYTHONPATH=/tmp/site
fi
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
bench() {  # bench GPUS SCHEDULE TIMEOUT [extra args]
  local g=$1 s=$2 t=$3; shift 3
  CUDA_VISIBLE_DEVICES=$g timeout $t python3 -m nfsearch bench --schedule "$s" --iters 20 --out $W/bench "$@" \
    > $W/logs/bench-$(basename "$s" .yaml)$(echo "$*" | tr -cd 'a-z0-9').log 2>&1
  echo "bench $s $* rc=$?"; }
bench 0,1,2,3 schedules/llama3-70b-h200-tp4-splitwise.yaml 170
pack
bench 0,1 schedules/mixtral-8x7b-h200-tp2-splitwise-overlap.yaml 120 &
bench 2 schedules/llama3-8b-h200-tp1-const-1024-512.yaml 120 & bench 3 schedules/llama3-8b-h200-tp1-splitwise.yaml 120 &
wait; pack
bench 0 schedules/mixtral-8x7b-h200-tp1-splitwise.yaml 120 &
bench 3 schedules/llama3-8b-h200-tp1-splitwise.yaml 170 --e2e --num-requests 1500 &
CUDA_VISIBLE_DEVICES=1 timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests > $W/logs/gpu_tests_1gpu.log 2>&1
wait; pack
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_tp_gpu.py tests/test_bench_gpu.py \
  tests/test_profiler_gpu.py > $W/logs/gpu_tests_tp.log 2>&1
pack
for f in $W/logs/bench-*.log; do echo "== $f"; grep -v '%|' "$f" | grep -v Warning | tail -12; done
tail -3 $W/logs/gpu_tests_1gpu.log $W/logs/gpu_tests_tp.log
