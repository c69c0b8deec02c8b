#!/usr/bin/env bash
# Session 6, on one H100 SXM: the shipped llama3-8b splitwise schedule and the one solved with the
# workload's own unit co-runs as interference (16:41), benched alternately, twice each, in one call,
# so the 1.060x vs 1.074x of separate calls is compared on the same machine. Records in $OUT/results.tgz.
#   OUT=/tmp/out bash benchmarks/h100_s6g.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
for i in 1 2; do
  for s in schedules/llama3-8b-h100-sxm-tp1-splitwise.yaml \
           benchmarks/runs/llama3-8b-h100-sxm-tp1-splitwise-unitinterference-20261121T1640.yaml; do
    tag=$(basename $s .yaml)-$i
    timeout 120 python3 -m nfsearch bench --schedule $s --iters 20 --out $W/bench > $W/logs/bench-$tag.log 2>&1
    echo "$tag rc=$?: $(grep 'speedup over' $W/logs/bench-$tag.log)"
    grep "nano-batched (graph)\|sequential (graph)" $W/logs/bench-$tag.log
    pack
  done
done
