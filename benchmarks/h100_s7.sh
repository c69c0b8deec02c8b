#!/usr/bin/env bash
# Session 7 device call on one H100: the re-solved llama3-8b const schedule (auto now picks a
# K = 1 two-stream schedule predicted 1.002x where it picked sequential) and the splitwise one
# (same nano-ops as before), benched with the sequential schedule in the same run.
#   OUT=/tmp/out bash benchmarks/h100_s7.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
bench() {  # bench SCHEDULE TAG [extra args]
  local s=$1 tag=$2; shift 2
  timeout 280 python3 -m nfsearch bench --schedule "$s" --iters 20 --out $W/bench "$@" \
    > $W/logs/bench-$(basename "$s" .yaml)-$tag.log 2>&1
  echo "bench $s $tag $* rc=$? at $(date -u +%H:%M:%S)"; }
T=$(date -u +%Y%m%dT%H%M)
bench schedules/llama3-8b-h100-sxm-tp1-const-1024-512.yaml a --breakdown --timeline $W/bench/tl-const-$T.png; pack
bench schedules/llama3-8b-h100-sxm-tp1-splitwise.yaml a --breakdown; pack
bench schedules/llama3-8b-h100-sxm-tp1-const-1024-512.yaml b; pack
for f in $W/logs/bench-*.log; do echo "== $f"; grep -v '%|\|Warning' "$f" | grep -E "speedup|batched|sequential \(graph\)|check|timeline|busy" ; done
