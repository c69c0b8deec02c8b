#!/usr/bin/env bash
# Session 14 device call on one H100: per-stream timelines of two family variants that measured far
# under their prediction at 08:58 (b = 512 with decode attention on 16 SMs; b = 448 as solved).
#   OUT=/tmp/out bash benchmarks/h100_s14f.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
V=benchmarks/runs/s14-variants
for v in b512-last2-m16 b448-last2-m24; do
  timeout 150 python3 -m nfsearch bench --schedule $V/$v.yaml --iters 20 --out $W/bench --timeline $W/bench/tl-$v.png \
    > $W/logs/bench-tl-$v.log 2>&1
  echo "bench timeline $v rc=$? at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/bench-tl-$v.log | grep -v Warning | tail -22; pack
done
