#!/usr/bin/env bash
# Session 9 device call on 4 H200s: the heater before every profile point (nfsearch.profiler.heat).
# The profiler GPU tests first (the heater test and the tiny end-to-end profiles, which heat), then
# llama3-70b TP 4 re-profiled and its splitwise schedule solved here (OR-Tools from .whl).
# Everything comes back as $OUT/results.tgz (packed after every step).
#   OUT=/tmp/out bash benchmarks/h200x4_s9a.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/profiles $W/schedules
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > $W/logs/wheels.log 2>&1 && export PYTHONPATH=/tmp/site
fi
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpus.log 2>&1
T=$(date -u +%Y%m%dT%H%M)
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -m gpu tests/test_profiler_gpu.py -k "heater or tiny_profile" \
  > $W/logs/gpu_tests_heater-h200-$T.log 2>&1
echo "heater tests rc=$? at $(date -u +%H:%M:%S)"; tail -4 $W/logs/gpu_tests_heater-h200-$T.log; pack
CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 420 python3 -m nfsearch profile --model llama3-70b --tp 4 \
  --out $W/profiles/llama3-70b-tp4.json > $W/logs/profile-llama3-70b-tp4.log 2>&1
echo "profile rc=$? at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/profile-llama3-70b-tp4.log | tail -3; pack
timeout 100 python3 -m nfsearch solve --model llama3-70b --gpu h200 --tp 4 --workload splitwise \
  --profile $W/profiles/llama3-70b-tp4.json -o $W/schedules/llama3-70b-h200-tp4-splitwise.yaml \
  > $W/logs/solve-llama3-70b-tp4.log 2>&1
echo "solve rc=$? at $(date -u +%H:%M:%S)"; tail -4 $W/logs/solve-llama3-70b-tp4.log; pack
