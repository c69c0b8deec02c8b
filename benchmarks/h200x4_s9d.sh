#!/usr/bin/env bash
# Session 9 device call on 4 H200s: the GPU tests on the final tree (OR-Tools from .whl).
#   OUT=/tmp/out bash benchmarks/h200x4_s9d.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > $OUT/wheels.log 2>&1 && export PYTHONPATH=/tmp/site
fi
python3 -m pip install --no-deps --no-build-isolation -e . -q > $OUT/pip.log 2>&1
T=$(date -u +%Y%m%dT%H%M)
timeout 400 python3 -m pytest -q -m gpu tests/ > $OUT/gpu_tests-4xh200-$T.log 2>&1
echo "gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -4 $OUT/gpu_tests-4xh200-$T.log
