#!/usr/bin/env bash
# Session 7, second device call on a 4-GPU H200 host, after [S2.back] and the prediction fix
# (shared-SM order in the unrolled layers): every GPU test on the final tree, then the re-solved
# TP schedules (llama3-70b TP 4 twice, one with the per-stream timeline; mixtral TP 2), with the
# single-GPU llama3-8b rows side by side on GPUs 2 and 3 while mixtral runs on 0 and 1.
#   OUT=/tmp/out bash benchmarks/h200x4_s7b.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
if ls .whl/*.whl >/dev/null 2>&1; then  # OR-Tools for the tests that solve (no registry here)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > $W/logs/wheels.log 2>&1 && export PYTHONPATH=/tmp/site
fi
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
bench() {  # bench GPUS SCHEDULE TAG [extra args]
  local g=$1 s=$2 tag=$3; shift 3
  CUDA_VISIBLE_DEVICES=$g timeout 280 python3 -m nfsearch bench --schedule "$s" --iters 20 --out $W/bench "$@" \
    > $W/logs/bench-$(basename "$s" .yaml)-$tag.log 2>&1
  echo "bench $s $tag $* rc=$? at $(date -u +%H:%M:%S)"; }
T=$(date -u +%Y%m%dT%H%M)
timeout 330 python3 -m pytest -q -m gpu tests/ > $W/logs/gpu_tests-4xh200-$T.log 2>&1
echo "gpu tests rc=$? at $(date -u +%H:%M:%S)"; tail -3 $W/logs/gpu_tests-4xh200-$T.log; pack
bench 0,1,2,3 schedules/llama3-70b-h200-tp4-splitwise.yaml a --rtol 0.1 --timeline $W/bench/tl-70b-$T.png; pack
bench 0,1,2,3 schedules/llama3-70b-h200-tp4-splitwise.yaml b --rtol 0.1; pack
bench 0,1 schedules/mixtral-8x7b-h200-tp2-splitwise.yaml a --timeline $W/bench/tl-mixtral-tp2-$T.png &
bench 2 schedules/llama3-8b-h200-tp1-const-1024-512.yaml a --breakdown &
bench 3 schedules/llama3-8b-h200-tp1-splitwise.yaml a --breakdown & wait; pack
for f in $W/logs/bench-*.log; do echo "== $f"; grep -v '%|\|Warning' "$f" | grep -E "speedup|batched|sequential \(graph\)|check" ; done
