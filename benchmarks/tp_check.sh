#!/usr/bin/env bash
# One device call on a multi-GPU H200 host: install (ortools from carried wheels in .whl/, when
# present), record the GPU links and NCCL, run every GPU test (TP ones included), then smoke-time
# the TP schedules given:  OUT=/tmp/out bash benchmarks/tp_check.sh schedules/a.yaml ...
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/nfsearch-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > "$OUT/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site
fi
python3 -m pip install --no-deps --no-build-isolation -e . -q > "$OUT/pip.log" 2>&1
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
python3 - > "$OUT/env.txt" 2>&1 <<'PY'
import torch, torch.distributed as dist
print("torch", torch.__version__, "nccl", torch.cuda.nccl.version(), "gpus", torch.cuda.device_count())
o = dist.ProcessGroupNCCL.Options()
print("nccl options config:", [a for a in dir(getattr(o, "config", None)) if not a.startswith("_")])
try:
    import ortools
    print("ortools", ortools.__version__)
except ImportError as e:
    print("no ortools", e)
PY
cat "$OUT/env.txt" "$OUT/topo.txt"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
for s in "$@"; do
  tp=$(grep -m1 '^  tp:' "$s" | awk '{print $2}')
  echo "=== smoke $s (tp $tp)"
  timeout ${SMOKE_TIMEOUT:-240} python3 -m torch.distributed.run --standalone --nproc-per-node "$tp" \
    examples/tp_smoke.py "$s" 2>&1 | tee -a "$OUT/smoke.log" | grep -v Warning | tail -8
done
