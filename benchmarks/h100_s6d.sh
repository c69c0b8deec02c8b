#!/usr/bin/env bash
# Session 6, fourth device call on one H100 SXM: bench the llama3-8b schedules solved from the H100
# profile with its interference replaced by the unit co-runs of benchmarks/probes/overlap_ceiling.py
# at each workload's own batch (the 16:3x H100 run). Records come back as $OUT/results.tgz.
# (When it ran, the two schedules lay at schedules/exp-llama3-8b-h100-sxm-tp1-{const-1024-512,splitwise}-unit.yaml;
# they were moved to benchmarks/runs/ afterwards and the paths below follow them.)
#   OUT=/tmp/out bash benchmarks/h100_s6d.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
bench() {  # bench SCHEDULE TAG
  timeout 150 python3 -m nfsearch bench --schedule "$1" --iters 20 --out $W/bench --breakdown \
    --timeline $W/bench/tl-$2-$(date -u +%H%M%S).png > $W/logs/bench-$2.log 2>&1; echo "bench $1 rc=$?"; }
bench benchmarks/runs/llama3-8b-h100-sxm-tp1-const-1024-512-unitinterference-20261121T1640.yaml const-unit
pack
bench benchmarks/runs/llama3-8b-h100-sxm-tp1-splitwise-unitinterference-20261121T1640.yaml split-unit
pack
for f in $W/logs/bench-*.log; do echo "== $f"; grep -v '%|' "$f" | tail -14; done
