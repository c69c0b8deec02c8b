#!/usr/bin/env bash
# Session 9 device call on 4 H200s: the H200 profiles again with the heater before every point and
# every GEMM on a 64-token grid (nfsearch.profiler.grid.FULL_GEMM_TOKENS): llama3-70b TP 4 on all
# four, then mixtral TP 2 (GPUs 0,1), mixtral TP 1 (GPU 2) and llama3-8b (GPU 3) side by side, each
# under a timeout that leaves its partial file for `--resume` in the next call.
# Everything comes back as $OUT/results.tgz (packed after every step).
#   OUT=/tmp/out bash benchmarks/h200x4_s9b.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/profiles
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
S0=$(date +%s)
prof() {  # prof GPUS MODEL TP TIMEOUT
  CUDA_VISIBLE_DEVICES=$1 timeout "$4" python3 -m nfsearch profile --model "$2" --tp "$3" \
    --out $W/profiles/$2-tp$3.json > $W/logs/profile-$2-tp$3.log 2>&1
  echo "profile $2 tp$3 rc=$? at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/profile-$2-tp$3.log | grep wrote; }
prof 0,1,2,3 llama3-70b 4 400; pack
left=$(( 575 - ($(date +%s) - S0) ))
prof 0,1 mixtral-8x7b 2 $left & prof 2 mixtral-8x7b 1 $left & prof 3 llama3-8b 1 $left & wait; pack
ls -la $W/profiles
