#!/usr/bin/env bash
# Session 13 device call on 4 H200s: every GPU test on the session's final tree, with OR-Tools.
#   OUT=/tmp/out bash benchmarks/h200x4_s13e.sh   (OR-Tools wheels under .whl/)
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q >> $W/logs/pip.log 2>&1
T=$(date -u +%Y%m%dT%H%M)
PYTHONPATH=/tmp/site timeout 540 python3 -m pytest -q -m gpu tests/ > $W/logs/gpu_tests-4xh200-$T.log 2>&1
echo "gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -4 $W/logs/gpu_tests-4xh200-$T.log; pack
