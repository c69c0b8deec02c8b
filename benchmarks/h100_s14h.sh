#!/usr/bin/env bash
# Session 14 device call on one H100: schedules solved here from the 09:01 H100 profile (every GEMM
# every 64 tokens; benchmarks/runs/s14-variants/fineprofile-*), each benched beside its sequential
# schedule (30 replays), alternately with the shipped splitwise schedule (the family's pick from the
# 15:12 profile).
#   OUT=/tmp/out bash benchmarks/h100_s14h.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
S=schedules/llama3-8b-h100-sxm-tp1-splitwise.yaml
V=benchmarks/runs/s14-variants
i=0
for s in $S $V/fineprofile-splitwise-family.yaml $S $V/fineprofile-splitwise-family.yaml \
         $V/fineprofile-splitwise-default.yaml $V/fineprofile-const-1024-512-default.yaml; do
  i=$((i+1)); n=$i-$(basename $s .yaml)
  timeout 100 python3 -m nfsearch bench --schedule $s --iters 30 --out $W/bench > $W/logs/bench-$n.log 2>&1
  echo "bench $n rc=$? at $(date -u +%H:%M:%S)"
  grep -v '%|' $W/logs/bench-$n.log | grep -E "nano-batched|sequential \(graph|speedup"; pack
done
