#!/usr/bin/env bash
# Session 6 review, on one H100 SXM: the GPU tests of what the review touched (nfsearch ceiling on
# corun.looped and the bench record helpers; the profiler's co-runs; bench) on the final tree.
#   OUT=/tmp/out bash benchmarks/h100_s6h.sh
set -u
OUT=${OUT:-/tmp/nfsearch-out}
python3 -m pip install --no-deps --no-build-isolation -e . -q > /dev/null 2>&1
timeout 400 python3 -m pytest -q -m gpu -rs tests/test_ceiling_gpu.py tests/test_profiler_gpu.py \
  tests/test_bench_gpu.py > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc=$?"
tail -6 $OUT/gpu_tests.log
