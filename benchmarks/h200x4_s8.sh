#!/usr/bin/env bash
# Session 8 device call on 4 H200s: the overlap ceiling with the network as a third unit
# (`nfsearch ceiling` on TP schedules, nfsearch/ceiling_tp.py) for llama3-70b TP 4 and mixtral TP 2,
# then the GPU tests of the final tree. Everything comes back as $OUT/results.tgz.
#   OUT=/tmp/out bash benchmarks/h200x4_s8.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/runs
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > $W/logs/wheels.log 2>&1 && export PYTHONPATH=/tmp/site
fi
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpus.log 2>&1
T=$(date -u +%Y%m%dT%H%M)
ceiling() {  # ceiling GPUS SCHEDULE
  CUDA_VISIBLE_DEVICES=$1 timeout 240 python3 -m nfsearch ceiling --schedule "$2" --out $W/runs \
    > $W/logs/ceiling-$(basename "$2" .yaml).log 2>&1
  echo "ceiling $2 rc=$? at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/ceiling-$(basename "$2" .yaml).log | tail -30; }
ceiling 0,1,2,3 schedules/llama3-70b-h200-tp4-splitwise.yaml; pack
ceiling 0,1 schedules/mixtral-8x7b-h200-tp2-splitwise.yaml; pack
timeout 280 python3 -m pytest -q -m gpu tests/ > $W/logs/gpu_tests-4xh200-$T.log 2>&1
echo "gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -15 $W/logs/gpu_tests-4xh200-$T.log; pack
