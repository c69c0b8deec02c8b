#!/usr/bin/env bash
# Session 14 device calls on one H200 and one H100, on the final code: the GPU tests the session
# touched (the shipped schedules of this GPU, the ceiling, the profiler).
#   OUT=/tmp/out bash benchmarks/gpu_s14j.sh   (OR-Tools wheels under .whl/)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q >> $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv > $W/logs/gpu.txt 2>&1; cat $W/logs/gpu.txt
PYTHONPATH=/tmp/site timeout 500 python3 -m pytest -q -m gpu tests/test_shipped_gpu.py tests/test_ceiling_gpu.py \
  tests/test_profiler_gpu.py > $W/logs/gpu_tests.log 2>&1
echo "gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -4 $W/logs/gpu_tests.log; pack
