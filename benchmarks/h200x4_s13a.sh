#!/usr/bin/env bash
# Session 13 device call on 4 H200s: llama3-70b TP 4's sustained table held against its own layer on
# the splitwise batch (nfsearch profile --tp 4 --add-sustained --heat splitwise; it was the last H200
# profile still held against the GEMMs), its auto and overlap schedules solved from it, the searched
# one benched beside its sequential schedule with a timeline (per-stream times, power and clock);
# then the tensor-parallel GPU tests with OR-Tools (their 4-GPU cases), then the shipped overlap
# schedule (GEMM-heater table) benched in the same call for comparison.
#   OUT=/tmp/out bash benchmarks/h200x4_s13a.sh   (OR-Tools wheels under .whl/)
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench $W/profiles $W/schedules
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q >> $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpu.txt 2>&1; cat $W/logs/gpu.txt
echo "start $(date -u +%H:%M:%S)"
P=$W/profiles/llama3-70b-tp4.json; cp profiles/h200/llama3-70b-tp4.json $P
timeout 220 python3 -m nfsearch profile --model llama3-70b --tp 4 --add-sustained --heat splitwise --out $P \
  > $W/logs/heat-llama3-70b-tp4.log 2>&1
rc=$?; echo "heat rc=$rc at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/heat-llama3-70b-tp4.log | tail -2; pack
[ $rc = 0 ] || exit 1
for pol in auto overlap; do
  PYTHONPATH=/tmp/site timeout 150 python3 -m nfsearch solve --model llama3-70b --tp 4 --profile $P \
    --workload splitwise --policy $pol -o $W/schedules/llama3-70b-h200-tp4-splitwise-$pol.yaml \
    > $W/logs/solve-$pol.log 2>&1 &
done; wait
echo "solved at $(date -u +%H:%M:%S)"; tail -n 3 $W/logs/solve-*.log; pack
bench() {  # bench SCHEDULE TAG [extra args]
  local s=$1 t=$2; shift 2
  timeout 200 python3 -m nfsearch bench --schedule "$s" --iters 20 --rtol 0.1 --out $W/bench "$@" \
    > $W/logs/bench-$t.log 2>&1
  echo "bench $t rc=$? at $(date -u +%H:%M:%S)"
  grep -v '%|' $W/logs/bench-$t.log | grep -E "nano-batched|sequential \(graph|speedup" | head -4; pack; }
T=$(date -u +%Y%m%dT%H%M)
bench $W/schedules/llama3-70b-h200-tp4-splitwise-overlap.yaml layer --timeline $W/bench/tl-heat-llama3-70b-tp4-$T.png
PYTHONPATH=/tmp/site timeout 150 python3 -m pytest -q -m gpu tests/test_tp_gpu.py > $W/logs/gpu_tests_tp-4xh200-$T.log 2>&1
echo "tp gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -2 $W/logs/gpu_tests_tp-4xh200-$T.log; pack
bench schedules/llama3-70b-h200-tp4-splitwise-overlap.yaml gemm-shipped
