#!/usr/bin/env bash
# Session 10 device call on 4 H200s: the profiler's new sustained-clock phase checked on a tiny model
# (GPU test), then `nfsearch profile --add-sustained` on the H200 profiles the schedules are solved
# from: llama3-8b (the 64-token-GEMM profile of session 9, benchmarks/runs/profile-finegrid-...),
# mixtral TP 1 on one GPU each and mixtral TP 2 on two at the same time, then llama3-70b TP 4 on all
# four. Everything comes back as $OUT/results.tgz. It ran the first version of the sustained phase
# (each op held back to back on its own, no heater), replaced the same hour by the heater version
# (nfsearch/profiler/held.py, h200x4_s10b.sh); run today it measures the heater version.
#   OUT=/tmp/out bash benchmarks/h200x4_s10a.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/prof
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpus.csv
gunzip -c benchmarks/runs/profile-finegrid-llama3-8b-h200-tp1-20261121T2236Z.json.gz > $W/prof/llama3-8b-tp1.json
cp profiles/h200/mixtral-8x7b-tp1.json profiles/h200/mixtral-8x7b-tp2.json profiles/h200/llama3-70b-tp4.json $W/prof/
timeout 120 python3 -m pytest -q tests/test_profiler_gpu.py -k tiny_profile > $W/logs/gpu_test_profiler.log 2>&1
echo "profiler gpu test rc=$? at $(date -u +%H:%M:%S)"; tail -3 $W/logs/gpu_test_profiler.log
add() {  # add GPUS MODEL TP
  CUDA_VISIBLE_DEVICES=$1 timeout 420 python3 -m nfsearch profile --model $2 --tp $3 --add-sustained \
    --out $W/prof/$2-tp$3.json > $W/logs/sustained-$2-tp$3.log 2>&1
  echo "add-sustained $2 tp $3 rc=$? at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/sustained-$2-tp$3.log | tail -3; }
add 0 llama3-8b 1 & add 1 mixtral-8x7b 1 & add 2,3 mixtral-8x7b 2 & wait; pack
add 0,1,2,3 llama3-70b 4; pack
