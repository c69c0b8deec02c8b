#!/usr/bin/env bash
# Session 14 device call on one H100: stage 2 on hand-picked K = 2 structures of llama3-8b splitwise
# (benchmarks/probes/hand_structures.py: a decode-heavy nano-batch 0 whose decode attention runs on
# 16-24 SMs beside nano-batch 1's compute, the best mode of the 08:36 ceiling), each benched beside
# its sequential schedule, with the shipped schedule in the same call.
#   OUT=/tmp/out bash benchmarks/h100_s14b.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpu.txt 2>&1; cat $W/logs/gpu.txt
for s in benchmarks/runs/llama3-8b-h100-sxm-splitwise-hand-b7-down2-prefill1-heattable-s14.yaml \
         schedules/llama3-8b-h100-sxm-tp1-splitwise.yaml \
         benchmarks/runs/llama3-8b-h100-sxm-splitwise-hand-b8-down2-prefill1-shippedprofile-s14.yaml \
         benchmarks/runs/llama3-8b-h100-sxm-splitwise-hand-b6-down2-prefill1-heattable-s14.yaml; do
  n=$(basename $s .yaml)
  timeout 140 python3 -m nfsearch bench --schedule $s --iters 20 --out $W/bench > $W/logs/bench-$n.log 2>&1
  echo "bench $n rc=$? at $(date -u +%H:%M:%S)"
  grep -v '%|' $W/logs/bench-$n.log | grep -E "nano-batched|sequential \(graph|speedup|bound|predicted"; pack
done
