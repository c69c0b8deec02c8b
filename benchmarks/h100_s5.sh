#!/usr/bin/env bash
# Session 5 device call on one H100 SXM: re-measure the llama3-8b profile with the current profiler
# (clocks per point, GEMM SM target, sustained co-runs), solve splitwise and const:1024:512 on the
# machine's CPUs (ortools carried as wheels in .whl), then bench both with per-stream timelines and
# per-variant clock and power. Everything comes back as $OUT/results.tgz.
#   OUT=/tmp/out bash benchmarks/h100_s5.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench $W/profiles/h100-sxm $W/schedules
pack() { cp profiles/h100-sxm/*.json $W/profiles/h100-sxm/ 2>/dev/null; cp schedules/*h100*.yaml $W/schedules/ 2>/dev/null
         tar czf "$OUT/results.tgz" -C $W . ; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > $W/logs/wheels.log 2>&1 && export PYTHONPATH=/tmp/site
fi
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,power.max_limit,clocks.max.sm --format=csv > $W/logs/gpu.log 2>&1; cat $W/logs/gpu.log
timeout 200 python3 -m nfsearch profile --model llama3-8b > $W/logs/profile-llama3-8b.log 2>&1; echo "profile rc=$?"
pack
solve() {  # solve WORKLOAD
  timeout 150 python3 -m nfsearch solve --model llama3-8b --gpu h100-sxm --workload "$1" \
    > $W/logs/solve-${1//:/-}.log 2>&1; echo "solve $1 rc=$?"; }
solve splitwise & solve const:1024:512 & wait
pack
grep -h "chose\|predicted\|speedup" $W/logs/solve-*.log | head -20
bench() {  # bench SCHEDULE TAG
  timeout 130 python3 -m nfsearch bench --schedule "$1" --iters 20 --out $W/bench --breakdown \
    --timeline $W/bench/tl-$2-$(date -u +%H%M%S).png > $W/logs/bench-$2.log 2>&1; echo "bench $1 rc=$?"; }
bench schedules/llama3-8b-h100-sxm-tp1-splitwise.yaml split
bench schedules/llama3-8b-h100-sxm-tp1-const-1024-512.yaml const
pack
for f in $W/logs/bench-*.log; do echo "== $f"; grep -v '%|' "$f" | tail -16; done
