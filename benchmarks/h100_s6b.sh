#!/usr/bin/env bash
# Session 6, second device call on one H100 SXM: benchmarks/probes/overlap_ceiling.py for the two
# H100 llama3-8b schedules (how much overlapping the layer's GEMMs with its decode attention can
# gain at most on this GPU, sustained). Logs and JSON come back as $OUT/results.tgz.
#   OUT=/tmp/out bash benchmarks/h100_s6b.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
for wl in splitwise const-1024-512; do
  timeout 200 python3 benchmarks/probes/overlap_ceiling.py --schedule schedules/llama3-8b-h100-sxm-tp1-$wl.yaml \
    --json $W/logs/ceiling-$wl.json > $W/logs/ceiling-$wl.txt 2>&1; echo "ceiling $wl rc=$?"
  grep -v "Warning\|CEILING" $W/logs/ceiling-$wl.txt | tail -22
  pack
done
