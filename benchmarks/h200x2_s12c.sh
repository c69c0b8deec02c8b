#!/usr/bin/env bash
# Session 12 device call on 2 H200s: mixtral TP 2's sustained table held against its own layer on the
# splitwise batch (nfsearch profile --tp 2 --add-sustained --heat splitwise), its schedule solved from
# it and benched beside its sequential schedule, and the shipped schedule (table held against the
# GEMM heater) benched in the same call; then the profiler's GPU tests at TP 2 (--quick, default heat).
#   OUT=/tmp/out bash benchmarks/h200x2_s12c.sh   (OR-Tools wheels under .whl/)
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench $W/profiles $W/schedules
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q >> $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpu.txt 2>&1
P=$W/profiles/mixtral-8x7b-tp2.json; cp profiles/h200/mixtral-8x7b-tp2.json $P
timeout 240 python3 -m nfsearch profile --model mixtral-8x7b --tp 2 --add-sustained --heat splitwise --out $P \
  > $W/logs/heat-mixtral-tp2.log 2>&1
rc=$?; echo "heat rc=$rc at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/heat-mixtral-tp2.log | tail -3; pack
[ $rc = 0 ] || exit 1
S=$W/schedules/mixtral-8x7b-h200-tp2-splitwise.yaml
PYTHONPATH=/tmp/site timeout 200 python3 -m nfsearch solve --model mixtral-8x7b --tp 2 --profile $P \
  --workload splitwise -o $S > $W/logs/solve-mixtral-tp2.log 2>&1
echo "solve rc=$? at $(date -u +%H:%M:%S)"; tail -3 $W/logs/solve-mixtral-tp2.log; pack
bench() {  # bench SCHEDULE TAG
  timeout 200 python3 -m nfsearch bench --schedule "$1" --iters 20 --out $W/bench > $W/logs/bench-$2.log 2>&1
  echo "bench $2 rc=$? at $(date -u +%H:%M:%S)"
  grep -v '%|' $W/logs/bench-$2.log | grep -E "nano-batched|sequential \(graph|speedup" | head -4; pack; }
bench $S layer
bench schedules/mixtral-8x7b-h200-tp2-splitwise.yaml gemm-shipped
T=$(date -u +%Y%m%dT%H%M)
timeout 280 python3 -m pytest -q -m gpu tests/test_profiler_gpu.py > $W/logs/gpu_tests_profiler-2xh200-$T.log 2>&1
echo "profiler gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -3 $W/logs/gpu_tests_profiler-2xh200-$T.log; pack
