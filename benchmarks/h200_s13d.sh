#!/usr/bin/env bash
# Session 13 device call on one H200: the Triton grouped GEMM for the MoE experts
# (nfrt.kernels.triton_grouped_gemm) against torch._grouped_mm at mixtral's shapes
# (benchmarks/probes/grouped_gemm.py: both timed in one process, CUDA-graph replays, medians), then
# the model's GPU tests (the grouped GEMM on both backends, graph replay on new routing).
#   OUT=/tmp/out bash benchmarks/h200_s13d.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
T=$(date -u +%Y%m%dT%H%M)
timeout 300 python3 benchmarks/probes/grouped_gemm.py --configs > $W/logs/grouped_gemm-h200-$T.txt 2>&1
echo "probe rc=$? at $(date -u +%H:%M:%S)"; grep -v Warning $W/logs/grouped_gemm-h200-$T.txt | cut -c1-110; pack
timeout 240 python3 -m pytest -q -m gpu tests/test_model_hf_gpu.py > $W/logs/gpu_tests_model-h200-$T.log 2>&1
echo "model gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -3 $W/logs/gpu_tests_model-h200-$T.log; pack
