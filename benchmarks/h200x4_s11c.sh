#!/usr/bin/env bash
# Session 11 device call on 4 H200s: the sustained tables of the four shipped H200 profiles measured
# again (`nfsearch profile --add-sustained`), now stored over the profile's own latency of each point
# instead of the burst timing taken beside it (which comes right after the heater, already slowed).
#   OUT=/tmp/out bash benchmarks/h200x4_s11c.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/profiles
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
cp profiles/h200/*.json $W/profiles/
sus() {  # sus GPUS MODEL TP
  CUDA_VISIBLE_DEVICES=$1 timeout 240 python3 -m nfsearch profile --model $2 --tp $3 --add-sustained \
    --out $W/profiles/$2-tp$3.json > $W/logs/sustained-$2-tp$3.log 2>&1
  echo "add-sustained $2 tp $3 rc=$? at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/sustained-$2-tp$3.log | tail -1; }
echo "start $(date -u +%H:%M:%S)"
sus 0,1,2,3 llama3-70b 4; pack
sus 0,1 mixtral-8x7b 2; pack
sus 0 llama3-8b 1 & sus 1 mixtral-8x7b 1 & wait; pack
