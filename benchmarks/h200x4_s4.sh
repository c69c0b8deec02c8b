#!/usr/bin/env bash
# Session 4 device calls on a 4-GPU H200 host; everything comes back as $OUT/results.tgz.
#   STAGE=a: check the %clock64 probe against nvidia-smi, the profiler GPU tests, then re-measure
#            the four H200 profiles with clocks (llama3-8b, mixtral TP 1 and TP 2 side by side,
#            then llama3-70b TP 4) and solve the benched schedules on the host's CPUs.
#   STAGE=b: bench the re-solved schedules (TP 4 first, then the TP 2 and single-GPU ones side by
#            side) with per-stream timelines and per-variant clocks.
#   STAGE=ab: both in one call.
#   OUT=/tmp/out STAGE=a bash benchmarks/h200x4_s4.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}; STAGE=${STAGE:-a}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench $W/profiles/h200 $W/schedules
pack() { cp profiles/h200/*.json $W/profiles/h200/ 2>/dev/null; cp schedules/*h200*.yaml $W/schedules/ 2>/dev/null
         tar czf "$OUT/results.tgz" -C $W . ; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > $W/logs/wheels.log 2>&1 && export PYTHONPATH=/tmp/site
fi
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
prof() {  # prof GPUS MODEL TP
  CUDA_VISIBLE_DEVICES=$1 timeout 280 python3 -m nfsearch profile --model "$2" --tp "$3" \
    > $W/logs/profile-$2-tp$3.log 2>&1; echo "profile $2 tp$3 rc=$?"; }
solve() {  # solve MODEL TP WORKLOAD [POLICY]
  timeout 200 python3 -m nfsearch solve --model "$1" --gpu h200 --tp "$2" --workload "$3" --policy "${4:-auto}" \
    > $W/logs/solve-$1-tp$2-${3//:/-}-${4:-auto}.log 2>&1; echo "solve $1 tp$2 $3 ${4:-auto} rc=$?"; }
bench() {  # bench GPUS SCHEDULE [extra args]
  local g=$1 s=$2; shift 2
  CUDA_VISIBLE_DEVICES=$g timeout 300 python3 -m nfsearch bench --schedule "$s" --iters 20 --out $W/bench "$@" \
    > $W/logs/bench-$(basename "$s" .yaml)$(echo "$*" | tr -cd 'a-z0-9').log 2>&1
  echo "bench $s $* rc=$?"; }
if [ "$STAGE" != b ]; then
  nvidia-smi -q -d POWER | grep -i "limit" | head -4 > $W/logs/power-limits.log
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/probes/clock_probe_check.py > $W/logs/clock_probe_check.log 2>&1
  CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest -q -m gpu tests/test_profiler_gpu.py \
    > $W/logs/gpu_tests_profiler.log 2>&1 &
  wait
  cat $W/logs/clock_probe_check.log; tail -3 $W/logs/gpu_tests_profiler.log
  prof 0,1 mixtral-8x7b 2 & prof 2 llama3-8b 1 & prof 3 mixtral-8x7b 1 & wait
  prof 0,1,2,3 llama3-70b 4
  pack
  solve llama3-70b 4 splitwise & solve mixtral-8x7b 2 splitwise & solve llama3-8b 1 splitwise &
  solve llama3-8b 1 const:1024:512 & solve mixtral-8x7b 1 splitwise &
  solve llama3-70b 4 splitwise overlap & solve mixtral-8x7b 2 splitwise overlap & wait
  pack
  grep -h "clock\|chose\|predicted" $W/logs/solve-*.log | head -40
fi
if [ "$STAGE" != a ]; then
  T=$(date -u +%H%M%S)
  bench 0,1,2,3 schedules/llama3-70b-h200-tp4-splitwise.yaml --rtol 0.1 --timeline $W/bench/tl-70b-$T.png
  bench 0,1 schedules/mixtral-8x7b-h200-tp2-splitwise-overlap.yaml &
  bench 2 schedules/llama3-8b-h200-tp1-const-1024-512.yaml --breakdown --timeline $W/bench/tl-const-$T.png &
  bench 3 schedules/llama3-8b-h200-tp1-splitwise.yaml --breakdown --timeline $W/bench/tl-split-$T.png & wait
  bench 0 schedules/mixtral-8x7b-h200-tp1-splitwise.yaml --breakdown --timeline $W/bench/tl-mixtral-$T.png
  pack
  for f in $W/logs/bench-*.log; do echo "== $f"; grep -v '%|' "$f" | tail -14; done
fi
