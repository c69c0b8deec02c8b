#!/usr/bin/env bash
# Session 11 device call on 4 H200s: GPU tests of the final tree (profiler with --add-ops and the
# sustained factor over the profile's latency, the shipped schedules, bench, engine).
#   OUT=/tmp/out bash benchmarks/h200x4_s11e.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl > $W/logs/wheels.log 2>&1 && export PYTHONPATH=/tmp/site
T=$(date -u +%Y%m%dT%H%M)
timeout 300 python3 -m pytest -q -m gpu tests/test_profiler_gpu.py tests/test_shipped_gpu.py tests/test_bench_gpu.py \
  tests/test_engine_gpu.py > $W/logs/gpu_tests_final-4xh200-$T.log 2>&1
echo "gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -4 $W/logs/gpu_tests_final-4xh200-$T.log
tar czf "$OUT/results.tgz" -C $W .
