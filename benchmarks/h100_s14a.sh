#!/usr/bin/env bash
# Session 14 device call on one H100: `nfsearch ceiling` with the other ops (norms, RoPE, KV append,
# activation) as a third unit, on the two H100 llama3-8b schedules; the ceiling and tiny-profile GPU
# tests first (the co-runs now go through corun_many_us).
#   OUT=/tmp/out bash benchmarks/h100_s14a.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/runs
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpu.txt 2>&1; cat $W/logs/gpu.txt
timeout 300 python3 -m pytest -q -m gpu tests/test_ceiling_gpu.py tests/test_profiler_gpu.py -k "tiny" > $W/logs/gpu_tests.log 2>&1
echo "gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -2 $W/logs/gpu_tests.log; pack
for w in splitwise const-1024-512; do
  s=schedules/llama3-8b-h100-sxm-tp1-$w.yaml
  timeout 240 python3 -m nfsearch ceiling --schedule $s --out $W/runs > $W/logs/ceiling-$w.log 2>&1
  echo "ceiling $w rc=$? at $(date -u +%H:%M:%S)"; grep -E "alone on all|best mix|ceiling over|third unit" -A1 $W/logs/ceiling-$w.log; pack
done
