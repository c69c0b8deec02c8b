#!/usr/bin/env bash
# Session 12 device call on one H100: the H100 llama3-8b profile's first sustained table, held against
# its own layer on the splitwise batch (nfsearch profile --add-sustained, default heater), the two
# H100 llama3-8b schedules solved from it, each benched beside its sequential schedule.
#   OUT=/tmp/out bash benchmarks/h100_s12f.sh   (OR-Tools wheels under .whl/)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench $W/profiles $W/schedules
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q >> $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpu.txt 2>&1; cat $W/logs/gpu.txt
P=$W/profiles/llama3-8b-tp1.json; cp profiles/h100-sxm/llama3-8b-tp1.json $P
timeout 200 python3 -m nfsearch profile --model llama3-8b --add-sustained --out $P > $W/logs/heat.log 2>&1
rc=$?; echo "heat rc=$rc at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/heat.log | tail -2; pack
[ $rc = 0 ] || exit 1
for w in splitwise const:1024:512; do
  n=llama3-8b-h100-sxm-tp1-$(echo $w | tr ':' '-')
  PYTHONPATH=/tmp/site timeout 150 python3 -m nfsearch solve --model llama3-8b --profile $P --workload $w \
    -o $W/schedules/$n.yaml > $W/logs/solve-$n.log 2>&1
  echo "solve $n rc=$?"; grep predicted $W/logs/solve-$n.log
  timeout 150 python3 -m nfsearch bench --schedule $W/schedules/$n.yaml --iters 20 --out $W/bench \
    > $W/logs/bench-$n.log 2>&1
  echo "bench $n rc=$?"; grep -v '%|' $W/logs/bench-$n.log | grep -E "nano-batched|sequential \(graph|speedup"; pack
done
