#!/usr/bin/env bash
# Session 12 device call on one H200 (second): first the heaters' power, clock and state
# (benchmarks/probes/heater_state.py), then the sustained tables of llama3-8b and mixtral TP 1 held against
# the model's own layer on the splitwise batch (nfsearch profile --add-sustained --heat splitwise), the layer now on its own activations,
# the three issue-6 schedules solved from them, each benched beside its sequential schedule.
#   OUT=/tmp/out bash benchmarks/h200_s12b.sh   (OR-Tools wheels under .whl/)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench $W/profiles $W/schedules
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q >> $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpu.txt 2>&1
heat() {  # heat MODEL
  cp profiles/h200/$1-tp1.json $W/profiles/$1-tp1.json
  timeout 200 python3 -m nfsearch profile --model $1 --add-sustained --heat splitwise \
    --out $W/profiles/$1-tp1.json > $W/logs/heat-$1.log 2>&1
  local rc=$?; echo "heat $1 rc=$rc at $(date -u +%H:%M:%S)"; tail -3 $W/logs/heat-$1.log
  if [ $rc != 0 ]; then pack; exit 1; fi; }
solve() {  # solve MODEL WORKLOAD NAME
  PYTHONPATH=/tmp/site timeout 200 python3 -m nfsearch solve --model $1 --profile $W/profiles/$1-tp1.json \
    --workload $2 -o $W/schedules/$3.yaml > $W/logs/solve-$3.log 2>&1
  echo "solve $3 rc=$? at $(date -u +%H:%M:%S)"; }
bench() {  # bench SCHEDULE
  timeout 200 python3 -m nfsearch bench --schedule "$1" --iters 20 --out $W/bench \
    > $W/logs/bench-$(basename "$1" .yaml).log 2>&1
  echo "bench $1 rc=$? at $(date -u +%H:%M:%S)"; }
for m in mixtral-8x7b llama3-8b; do
  timeout 150 python3 benchmarks/probes/heater_state.py $m > $W/logs/heater_state-$m.log 2>&1
  echo "probe $m rc=$?"; grep -v Warning $W/logs/heater_state-$m.log | grep -v "^ *$" | tail -8; done; pack
heat llama3-8b; pack
solve llama3-8b splitwise llama3-8b-h200-tp1-splitwise > $W/logs/s1.txt &
solve llama3-8b const:1024:512 llama3-8b-h200-tp1-const-1024-512 > $W/logs/s2.txt &
heat mixtral-8x7b; wait; cat $W/logs/s1.txt $W/logs/s2.txt; pack
solve mixtral-8x7b splitwise mixtral-8x7b-h200-tp1-splitwise; pack
for s in $W/schedules/*.yaml; do bench $s; pack; done
for f in $W/logs/bench-*.log; do echo "== $f"; grep -v '%|' "$f" | grep -E "nano-batched|sequential \(graph|speedup|predicted" | head -5; done
pack
T=$(date -u +%Y%m%dT%H%M)
timeout 150 python3 -m pytest -q -m gpu tests/test_profiler_gpu.py -k tiny_profile > $W/logs/gpu_tests_heat-h200-$T.log 2>&1
echo "profiler gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -3 $W/logs/gpu_tests_heat-h200-$T.log; pack
