#!/usr/bin/env bash
# Session 6, last device call on one H100 SXM: the GPU tests on the final tree (the new
# tests/test_ceiling_gpu.py among them), then `nfsearch ceiling` itself (the CLI) on the H100
# llama3-8b const:1024:512 schedule, the third ceiling of that row. Records come back as $OUT/results.tgz.
#   OUT=/tmp/out bash benchmarks/h100_s6f.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/runs
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
timeout 300 python3 -m pytest -q -m gpu -rs tests > $W/logs/gpu_tests.log 2>&1; echo "gpu tests rc=$?"
tail -4 $W/logs/gpu_tests.log
pack
timeout 200 python3 -m nfsearch ceiling --schedule schedules/llama3-8b-h100-sxm-tp1-const-1024-512.yaml \
  --out $W/runs > $W/logs/ceiling-const.txt 2>&1; echo "ceiling rc=$?"
grep -v Warning $W/logs/ceiling-const.txt | tail -16
pack
