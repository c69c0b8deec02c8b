#!/usr/bin/env bash
# Session 14 device call on one H100: the H100 llama3-8b profile again with the current profiler (every
# GEMM every 64 tokens: the shipped one, of 2026-11-21 15:12, interpolates gate_up at 448 tokens,
# which the 09:00 timeline measured at 2x its profile), then a copy of it with the sustained table
# held against the splitwise layer.
#   OUT=/tmp/out bash benchmarks/h100_s14g.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/profiles
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv > $W/logs/gpu.txt 2>&1; cat $W/logs/gpu.txt
P=$W/profiles/llama3-8b-tp1.json
timeout 400 python3 -m nfsearch profile --model llama3-8b --out $P > $W/logs/profile.log 2>&1
echo "profile rc=$? at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/profile.log | tail -3; pack
cp $P $W/profiles/llama3-8b-tp1-heat.json
timeout 180 python3 -m nfsearch profile --model llama3-8b --add-sustained --heat splitwise \
  --out $W/profiles/llama3-8b-tp1-heat.json > $W/logs/heat.log 2>&1
echo "heat rc=$? at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/heat.log | tail -2; pack
