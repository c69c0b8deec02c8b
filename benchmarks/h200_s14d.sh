#!/usr/bin/env bash
# Session 14 device call on one H200: the llama3-8b splitwise and const schedules solved with the K = 2
# structure family ([S1.family], `nfsearch solve --structure-family`), each benched beside its
# sequential schedule (30 replays), alternately with the shipped schedule, twice each.
#   OUT=/tmp/out bash benchmarks/h200_s14d.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpu.txt 2>&1; cat $W/logs/gpu.txt
i=0
for w in splitwise const-1024-512; do
  F=benchmarks/runs/llama3-8b-h200-tp1-$w-family-s14.yaml
  S=schedules/llama3-8b-h200-tp1-$w.yaml
  for s in $F $S $F $S; do
    i=$((i+1)); n=$i-$(basename $s .yaml)
    timeout 100 python3 -m nfsearch bench --schedule $s --iters 30 --out $W/bench > $W/logs/bench-$n.log 2>&1
    echo "bench $n rc=$? at $(date -u +%H:%M:%S)"
    grep -v '%|' $W/logs/bench-$n.log | grep -E "nano-batched|sequential \(graph|speedup"; pack
  done
done
