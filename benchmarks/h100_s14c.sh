#!/usr/bin/env bash
# Session 14 device call on one H100: the four best hand-picked K = 2 structures of llama3-8b
# splitwise by the shipped profile's stage 2 (benchmarks/probes/hand_structures.py), each benched
# beside its sequential schedule (30 replays); the best (b8-down2) and the shipped schedule twice,
# alternately; then the best once more with a per-stream timeline.
#   OUT=/tmp/out bash benchmarks/h100_s14c.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
pack() { tar czf "$OUT/results.tgz" -C $W . ; }
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > $W/logs/gpu.txt 2>&1; cat $W/logs/gpu.txt
H=benchmarks/runs/llama3-8b-h100-sxm-splitwise-hand
B=$H-b8-down2-prefill1-shippedprofile-s14.yaml
S=schedules/llama3-8b-h100-sxm-tp1-splitwise.yaml
i=0
for s in $B $S $B $S $H-b9-down1-prefill1-shippedprofile-s14.yaml $H-b9-down2-prefill1-shippedprofile-s14.yaml \
         $H-b8-down1-prefill1-shippedprofile-s14.yaml; do
  i=$((i+1)); n=$i-$(basename $s .yaml)
  timeout 100 python3 -m nfsearch bench --schedule $s --iters 30 --out $W/bench > $W/logs/bench-$n.log 2>&1
  echo "bench $n rc=$? at $(date -u +%H:%M:%S)"
  grep -v '%|' $W/logs/bench-$n.log | grep -E "nano-batched|sequential \(graph|speedup"; pack
done
timeout 150 python3 -m nfsearch bench --schedule $B --iters 20 --out $W/bench --timeline $W/bench/tl-b8-down2.png \
  > $W/logs/bench-timeline.log 2>&1
echo "bench timeline rc=$? at $(date -u +%H:%M:%S)"; grep -v '%|' $W/logs/bench-timeline.log | tail -30; pack
