#!/usr/bin/env bash
# One device call: install, the GPU tests, then `nfsearch bench` of each schedule given.
#   OUT=/tmp/out bash benchmarks/gpu_session.sh schedules/a.yaml [schedules/b.yaml ...]
# Logs and bench records land under $OUT. TIMELINE=<substring>: also pass --timeline $OUT/<name>.png
# to the bench of each schedule whose path contains it (e.g. TIMELINE=const).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nfsearch-out}
mkdir -p "$OUT"
python3 -m pip install --no-deps --no-build-isolation -e . -q > "$OUT/pip.log" 2>&1
python3 -c "import nfrt, nfsearch" 2>>"$OUT/pip.log" || export PYTHONPATH=$PWD/runtime:$PWD
python3 -c "import setuptools, nfrt, nfsearch; print('setuptools', setuptools.__version__, 'nfrt from', nfrt.__file__)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
for s in "$@"; do
  echo "=== bench $s"
  extra=()
  if [ -n "${TIMELINE:-}" ] && [[ "$s" == *"$TIMELINE"* ]]; then
    extra=(--timeline "$OUT/$(basename "$s" .yaml).png")
  fi
  timeout 420 python3 -m nfsearch bench --schedule "$s" --iters 20 --breakdown --out "$OUT" "${extra[@]}" 2>&1 \
    | tee -a "$OUT/bench.log" | grep -v '%|'
done
