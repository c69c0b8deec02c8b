#!/usr/bin/env bash
# Device call on a 4-GPU H200 host (session 3, 2026-11-21): benches with in-graph timelines and
# the GPU clock per variant, the end-to-end serving bench with the no-spill scheduler, the GPU
# tests. Results are packed into $OUT/results.tgz after every stage (a timeout still returns what
# finished). STAGE=1: single-GPU benches side by side + e2e + single-GPU tests; STAGE=2: TP benches
# (llama3-70b TP 4 with a timeline, mixtral TP 2) + multi-GPU tests. STAGE=x2 (a 2-GPU host): the
# single-GPU benches two at a time, the e2e bench, mixtral TP 2, then every GPU test that fits.
#   OUT=/tmp/out STAGE=1 bash benchmarks/h200x4_s3.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
STAGE=${STAGE:-1}
W=/tmp/nfs-s3; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results-$STAGE.tgz" -C $W . ; }
if ls .whl/*.whl >/dev/null 2>&1; then  # ortools: the TP tests solve tiny schedules
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > $W/logs/wheels.log 2>&1 && export PYTHONPATH=/tmp/site
fi
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=index,name,driver_version,power.limit,clocks.max.sm --format=csv > $W/logs/gpus.txt
bench() {  # bench GPUS SCHEDULE TIMEOUT [extra args]
  local g=$1 s=$2 t=$3; shift 3
  CUDA_VISIBLE_DEVICES=$g timeout $t python3 -m nfsearch bench --schedule "$s" --iters 20 --out $W/bench "$@" \
    > $W/logs/bench-$(basename "$s" .yaml)$(echo "$*" | tr -cd 'a-z0-9').log 2>&1
  echo "bench $s $* rc=$?"; }
if [ "$STAGE" = b ]; then  # after the length-biased prefill layout: re-bench (2 or 4 GPUs)
  n=$(nvidia-smi -L | wc -l)
  if [ "$n" -ge 4 ]; then
    bench 0,1,2,3 schedules/llama3-70b-h200-tp4-splitwise.yaml 200 --rtol 0.1 --timeline $W/bench/tl-70b.png
    pack
  fi
  bench 0 schedules/llama3-8b-h200-tp1-splitwise.yaml 200 --e2e --num-requests 1500 &
  bench 1 schedules/llama3-8b-h200-tp1-splitwise.yaml 200 --breakdown --timeline $W/bench/tl-splitwise.png &
  if [ "$n" -lt 4 ]; then wait; pack; a=0; b=1; else a=2; b=3; fi
  bench $a schedules/llama3-8b-h200-tp1-const-1024-512.yaml 170 --breakdown --timeline $W/bench/tl-const.png &
  bench $b schedules/mixtral-8x7b-h200-tp1-splitwise.yaml 170 --breakdown &
  wait; pack
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_llm_gpu.py \
    tests/test_engine_gpu.py tests/test_bench_gpu.py > $W/logs/gpu_tests_b.log 2>&1
  pack
elif [ "$STAGE" = x2 ]; then
  bench 0 schedules/llama3-8b-h200-tp1-splitwise.yaml 200 --breakdown --timeline $W/bench/tl-splitwise.png &
  bench 1 schedules/llama3-8b-h200-tp1-splitwise.yaml 200 --e2e --num-requests 1500 &
  wait; pack
  bench 0 schedules/llama3-8b-h200-tp1-const-1024-512.yaml 170 --breakdown --timeline $W/bench/tl-const.png &
  bench 1 schedules/mixtral-8x7b-h200-tp1-splitwise.yaml 170 --breakdown --timeline $W/bench/tl-mixtral.png &
  wait; pack
  bench 0,1 schedules/mixtral-8x7b-h200-tp2-splitwise-overlap.yaml 100
  pack
  timeout 140 python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests > $W/logs/gpu_tests_x2.log 2>&1
  pack
elif [ "$STAGE" = 1 ]; then
  bench 0 schedules/llama3-8b-h200-tp1-splitwise.yaml 200 --breakdown --timeline $W/bench/tl-splitwise.png &
  bench 1 schedules/llama3-8b-h200-tp1-const-1024-512.yaml 200 --breakdown --timeline $W/bench/tl-const.png &
  bench 2 schedules/llama3-8b-h200-tp1-splitwise.yaml 240 --e2e --num-requests 1500 &
  bench 3 schedules/mixtral-8x7b-h200-tp1-splitwise.yaml 200 --breakdown --timeline $W/bench/tl-mixtral.png &
  wait; pack
  bench 2 schedules/llama3-8b-h200-tp1-splitwise.yaml 240 --e2e --num-requests 3000 &
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests \
    > $W/logs/gpu_tests_1gpu.log 2>&1
  wait; pack
else
  bench 0,1,2,3 schedules/llama3-70b-h200-tp4-splitwise.yaml 200 --rtol 0.1 --timeline $W/bench/tl-70b.png
  pack
  bench 0,1 schedules/mixtral-8x7b-h200-tp2-splitwise-overlap.yaml 150 &
  bench 2,3 schedules/mixtral-8x7b-h200-tp2-splitwise.yaml 150 &
  wait; pack
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_tp_gpu.py tests/test_bench_gpu.py \
    tests/test_profiler_gpu.py > $W/logs/gpu_tests_tp.log 2>&1
  pack
fi
for f in $W/logs/bench-*.log; do echo "== $f"; grep -v '%|' "$f" | grep -v Warning | tail -14; done
tail -3 $W/logs/gpu_tests_*.log
