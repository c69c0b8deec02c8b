#!/usr/bin/env bash
# Session 8 device call on 2 H200s: mixtral re-profiled with the expert GEMMs every 64 tokens
# (nfsearch.profiler.grid.FULL_EXPERT_TOKENS), TP 1 and TP 2; both splitwise schedules re-solved
# here from the new profiles (OR-Tools from .whl) and benched beside their sequential schedules.
# Everything comes back as $OUT/results.tgz (packed after every step).
#   OUT=/tmp/out bash benchmarks/h200x2_s8.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench $W/profiles $W/schedules
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > $W/logs/wheels.log 2>&1 && export PYTHONPATH=/tmp/site
fi
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpus.log 2>&1
for tp in 1 2; do
  g=$([ $tp = 1 ] && echo 0 || echo 0,1)
  CUDA_VISIBLE_DEVICES=$g timeout 240 python3 -m nfsearch profile --model mixtral-8x7b --tp $tp \
    --out $W/profiles/mixtral-8x7b-tp$tp.json > $W/logs/profile-tp$tp.log 2>&1
  echo "profile tp$tp rc=$? at $(date -u +%H:%M:%S)"; tail -2 $W/logs/profile-tp$tp.log; pack
done
for tp in 1 2; do
  s=$W/schedules/mixtral-8x7b-h200-tp$tp-splitwise.yaml
  timeout 120 python3 -m nfsearch solve --model mixtral-8x7b --tp $tp --workload splitwise \
    --profile $W/profiles/mixtral-8x7b-tp$tp.json -o $s > $W/logs/solve-tp$tp.log 2>&1 &
done
wait; echo "solves done at $(date -u +%H:%M:%S)"; tail -3 $W/logs/solve-tp*.log; pack
bench() {  # bench GPUS SCHEDULE [extra args]
  local g=$1 s=$2; shift 2
  CUDA_VISIBLE_DEVICES=$g timeout 200 python3 -m nfsearch bench --schedule "$s" --iters 20 --out $W/bench "$@" \
    > $W/logs/bench-$(basename "$s" .yaml).log 2>&1
  echo "bench $s $* rc=$? at $(date -u +%H:%M:%S)"; }
T=$(date -u +%Y%m%dT%H%M)
bench 0 $W/schedules/mixtral-8x7b-h200-tp1-splitwise.yaml --timeline $W/bench/tl-mixtral-tp1-$T.png; pack
bench 0,1 $W/schedules/mixtral-8x7b-h200-tp2-splitwise.yaml --timeline $W/bench/tl-mixtral-tp2-$T.png; pack
for f in $W/logs/bench-*.log; do echo "== $f"; grep -v '%|' "$f" | grep -E "speedup|batched|sequential|check|predicted|bound" | head -12; done
