#!/usr/bin/env bash
# Session 5, third H100 call, on the final tree: the GPU tests, then the shipped llama3-8b
# splitwise schedule (the free search from the 15:1x profile) benched again for the run-to-run spread.
#   OUT=/tmp/out bash benchmarks/h100_s5c.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
W=/tmp/nfs-work; rm -rf $W; mkdir -p $W/logs $W/bench
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > $W/logs/wheels.log 2>&1 && export PYTHONPATH=/tmp/site
fi
python3 -m pip install --no-deps --no-build-isolation -e . -q > $W/logs/pip.log 2>&1
timeout 360 python3 -m pytest -q -m gpu -rs tests > $W/logs/gpu_tests.log 2>&1; echo "gpu tests rc=$?"
tail -4 $W/logs/gpu_tests.log
timeout 150 python3 -m nfsearch bench --schedule schedules/llama3-8b-h100-sxm-tp1-splitwise.yaml --iters 30 \
  --out $W/bench > $W/logs/bench-split-again.log 2>&1; echo "bench rc=$?"
tar czf "$OUT/results.tgz" -C $W .
grep -v '%|' $W/logs/bench-split-again.log | grep -v Warning | tail -10
