#!/usr/bin/env bash
# Session 14 device call on one H100, on the session's final code: the shipped llama3-8b splitwise
# schedule (the structure family's pick from the 09:01 profile) benched five more times beside its
# sequential schedule (30 replays each), then every GPU test (with OR-Tools).
#   OUT=/tmp/out bash benchmarks/h100_s14i.sh   (OR-Tools wheels under .whl/)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q >> $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv > $W/logs/gpu.txt 2>&1; cat $W/logs/gpu.txt
S=schedules/llama3-8b-h100-sxm-tp1-splitwise.yaml
for i in 1 2 3 4 5; do
  timeout 100 python3 -m nfsearch bench --schedule $S --iters 30 --out $W/bench > $W/logs/bench-$i.log 2>&1
  echo "bench $i rc=$? at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/bench-$i.log | grep -E "nano-batched|speedup"; pack
done
PYTHONPATH=/tmp/site timeout 420 python3 -m pytest -q -m gpu tests/ > $W/logs/gpu_tests.log 2>&1
echo "gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -4 $W/logs/gpu_tests.log; pack
