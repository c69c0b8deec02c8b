#!/usr/bin/env bash
# Session 6, last device call on one H200: the GPU tests on the final tree, then
# benchmarks/probes/overlap_ceiling.py again for the three H200 rows of issue 6 (the repeat of the
# 16:37 run). Logs and JSON come back as $OUT/results.tgz.
#   OUT=/tmp/out bash benchmarks/h200_s6e.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpu.log 2>&1; cat $W/logs/gpu.log
timeout 300 python3 -m pytest -q -m gpu -rs tests > $W/logs/gpu_tests.log 2>&1; echo "gpu tests rc=$?"
tail -4 $W/logs/gpu_tests.log
pack
for s in llama3-8b-h200-tp1-splitwise llama3-8b-h200-tp1-const-1024-512 mixtral-8x7b-h200-tp1-splitwise; do
  timeout 200 python3 benchmarks/probes/overlap_ceiling.py --schedule schedules/$s.yaml \
    --json $W/logs/ceiling-$s.json > $W/logs/ceiling-$s.txt 2>&1; echo "ceiling $s rc=$?"
  grep "best mix\|ceiling over\|alone on all" $W/logs/ceiling-$s.txt
  pack
done
