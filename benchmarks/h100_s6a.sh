#!/usr/bin/env bash
# Session 6, first device call on one H100 SXM: the decode-attention kernel tests (the L2 evict-first
# variant included), then benchmarks/probes/interference_cause.py (what slows a GEMM beside decode
# attention: power, HBM or L2). Logs come back as $OUT/results.tgz.
# (When it ran, the decode kernel had a kv_eviction option (L2 evict-first hints) with two kernel tests
# and the probe a fifth partner using it; Triton 3.6 dropped the hint on the TMA loads and it changed
# nothing, so all three were taken out: benchmarks/probes/interference_cause.py says what ran.)
#   OUT=/tmp/out bash benchmarks/h100_s6a.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpu.log 2>&1; cat $W/logs/gpu.log
timeout 150 python3 -m pytest tests/test_kernels_gpu.py -q -x > $W/logs/kernel_tests.log 2>&1; echo "kernel tests rc=$?"
tail -5 $W/logs/kernel_tests.log
pack
timeout 300 python3 benchmarks/probes/interference_cause.py > $W/logs/interference_cause.txt 2>&1; echo "probe rc=$?"
cat $W/logs/interference_cause.txt | grep -v Warning | tail -40
pack
