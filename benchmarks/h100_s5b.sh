#!/usr/bin/env bash
# Session 5, second H100 call: bench the llama3-8b splitwise schedule re-solved with the structure
# families of the search ([S1.family], [S1.refit]) from the profile measured in the first call,
# twice (two processes, each with its own sequential baseline) to show the run-to-run spread.
#   OUT=/tmp/out bash benchmarks/h100_s5b.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
S=schedules/llama3-8b-h100-sxm-tp1-splitwise.yaml
for run in 1 2; do
  extra=""; [ $run = 1 ] && extra="--breakdown --timeline $W/bench/tl-split-$(date -u +%H%M%S).png"
  timeout 150 python3 -m nfsearch bench --schedule $S --iters 30 --out $W/bench $extra \
    > $W/logs/bench-split-$run.log 2>&1; echo "bench run $run rc=$?"
done
tar czf "$OUT/results.tgz" -C $W .
for f in $W/logs/bench-*.log; do echo "== $f"; grep -v '%|' "$f" | grep -v Warning | tail -22; done
