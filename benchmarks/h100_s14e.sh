#!/usr/bin/env bash
# Session 14 device call on one H100: the shipped llama3-8b splitwise schedule (the structure family's
# pick, b = 512 tokens, decode attention on 24 SMs beside compute on 96) and variants of the family
# with the attention on 16 or 32 SMs (benchmarks/probes/sm_variants.py) or another first nano-batch
# (b = 448, 576), each benched beside its sequential schedule (30 replays); the shipped one first and last.
#   OUT=/tmp/out bash benchmarks/h100_s14e.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpu.txt 2>&1; cat $W/logs/gpu.txt
S=schedules/llama3-8b-h100-sxm-tp1-splitwise.yaml
V=benchmarks/runs/s14-variants
i=0
for s in $S $V/b512-last2-m16.yaml $V/b512-last2-m32.yaml $V/b448-last2-m24.yaml $V/b448-last2-m16.yaml \
         $V/b576-last2-m16.yaml $V/b512-last1-m16.yaml $S; do
  i=$((i+1)); n=$i-$(basename $s .yaml)
  timeout 100 python3 -m nfsearch bench --schedule $s --iters 30 --out $W/bench > $W/logs/bench-$n.log 2>&1
  echo "bench $n rc=$? at $(date -u +%H:%M:%S)"
  grep -v '%|' $W/logs/bench-$n.log | grep -E "nano-batched|speedup"; pack
done
