#!/usr/bin/env bash
# Session 10 device call on 4 H200s: the sustained table measured again, now each point between
# heater GEMMs on all SMs (nfsearch.profiler.held), added to the H200 profiles (llama3-8b from the
# 64-token-GEMM profile of session 9, mixtral TP 1 and TP 2, llama3-70b TP 4), then the five H200
# benchmark schedules solved from them here (OR-Tools from .whl, one process each).
# Everything comes back as $OUT/results.tgz.
#   OUT=/tmp/out bash benchmarks/h200x4_s10b.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/prof $W/sched
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
gunzip -c benchmarks/runs/profile-finegrid-llama3-8b-h200-tp1-20261121T2236Z.json.gz > $W/prof/llama3-8b-tp1.json
cp profiles/h200/mixtral-8x7b-tp1.json profiles/h200/mixtral-8x7b-tp2.json profiles/h200/llama3-70b-tp4.json $W/prof/
timeout 120 python3 -m pytest -q tests/test_profiler_gpu.py -k tiny_profile > $W/logs/gpu_test_profiler.log 2>&1
echo "profiler gpu test rc=$? at $(date -u +%H:%M:%S)"; tail -3 $W/logs/gpu_test_profiler.log
add() {  # add GPUS MODEL TP
  CUDA_VISIBLE_DEVICES=$1 timeout 300 python3 -m nfsearch profile --model $2 --tp $3 --add-sustained \
    --out $W/prof/$2-tp$3.json > $W/logs/sustained-$2-tp$3.log 2>&1
  echo "add-sustained $2 tp $3 rc=$? at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/sustained-$2-tp$3.log | tail -1; }
add 0 llama3-8b 1 & add 1 mixtral-8x7b 1 & add 2,3 mixtral-8x7b 2 & wait; pack
add 0,1,2,3 llama3-70b 4; pack
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl > $W/logs/wheels.log 2>&1 && export PYTHONPATH=/tmp/site
cp $W/prof/*.json profiles/h200/
solve() {  # solve MODEL TP WORKLOAD
  timeout 150 python3 -m nfsearch solve --model $1 --gpu h200 --tp $2 --workload $3 \
    --output $W/sched/$1-h200-tp$2-${3//:/-}.yaml > $W/logs/solve-$1-tp$2-${3//:/-}.log 2>&1
  echo "solve $1 tp $2 $3 rc=$? at $(date -u +%H:%M:%S)"; tail -2 $W/logs/solve-$1-tp$2-${3//:/-}.log; }
solve llama3-8b 1 splitwise & solve llama3-8b 1 const:1024:512 & solve mixtral-8x7b 1 splitwise &
solve mixtral-8x7b 2 splitwise & solve llama3-70b 4 splitwise & wait; pack
