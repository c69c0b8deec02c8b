#!/usr/bin/env bash
# Session 8 device call on one H200: profile points timed in a burst vs back to back
# (benchmarks/probes/sustained_points.py).   OUT=/tmp/out bash benchmarks/h200_s8a.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
python3 -m pip install --no-deps --no-build-isolation -e . -q > $OUT/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $OUT/gpu.txt
timeout 420 python3 benchmarks/probes/sustained_points.py --ms 300 > $OUT/sustained_points.txt 2>&1
echo "probe rc=$?"; cat $OUT/sustained_points.txt | grep -v Warning
