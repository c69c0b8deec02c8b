#!/usr/bin/env bash
# Session 12 device call on 2 H200s, on the committed tree: the heaters' power, clock and state
# (benchmarks/probes/heater_state.py, sampling from a thread), then the GPU tests of the shipped
# schedules, bench, the engine and tensor parallelism (with OR-Tools).
#   OUT=/tmp/out bash benchmarks/h200x2_s12d.sh   (OR-Tools wheels under .whl/)
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q >> $W/logs/pip.log 2>&1
T=$(date -u +%Y%m%dT%H%M)
for m in mixtral-8x7b llama3-8b; do
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/probes/heater_state.py $m 2>&1 | grep -v Warning \
    > $W/logs/heater_state-$m-h200-$T.txt
  echo "probe $m rc=$?"; cat $W/logs/heater_state-$m-h200-$T.txt; done; pack
PYTHONPATH=/tmp/site timeout 200 python3 -m pytest -q -m gpu tests/test_shipped_gpu.py tests/test_bench_gpu.py \
  tests/test_engine_gpu.py > $W/logs/gpu_tests_final-2xh200-$T.log 2>&1
echo "shipped/bench/engine gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -3 $W/logs/gpu_tests_final-2xh200-$T.log; pack
PYTHONPATH=/tmp/site timeout 200 python3 -m pytest -q -m gpu tests/test_tp_gpu.py > $W/logs/gpu_tests_tp-2xh200-$T.log 2>&1
echo "tp gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -3 $W/logs/gpu_tests_tp-2xh200-$T.log; pack
