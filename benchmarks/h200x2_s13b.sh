#!/usr/bin/env bash
# Session 13 device call on 2 H200s: the profiler's GPU tests after profile grids were fitted to the
# model's max_position (tiny-llama's quick TP-2 profile and its layer heater no longer read past the
# 512-position rope table; GpuTimer refuses a context above max_position).
#   OUT=/tmp/out bash benchmarks/h200x2_s13b.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
T=$(date -u +%Y%m%dT%H%M)
timeout 420 python3 -m pytest -q -m gpu tests/test_profiler_gpu.py > $W/logs/gpu_tests_profiler-2xh200-$T.log 2>&1
echo "profiler gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -3 $W/logs/gpu_tests_profiler-2xh200-$T.log; pack
