#!/usr/bin/env bash
# Session 14 device call on one H100 after the review (ceiling_measure.placed_corun): the ceiling's
# GPU tests.
#   OUT=/tmp/out bash benchmarks/h100_s14k.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
timeout 300 python3 -m pytest -q -m gpu tests/test_ceiling_gpu.py > $W/logs/gpu_tests.log 2>&1
echo "gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -3 $W/logs/gpu_tests.log
tar czf "$OUT/results.tgz" -C $W .
