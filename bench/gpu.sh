#!/usr/bin/env bash
# Every GPU check and benchmark, for a machine with a CUDA GPU, nvcc and torch (run from the repo root):
#   bash bench/gpu.sh [tests|cuda-tests] [kernels] [profile] [seme] [e2e] [startup]
#   (default: all but profile and startup; logs under $OUT)
# Builds the extensions in place, runs the CUDA and Triton tests on the GPU, then the benchmarks,
# which write their GPU sections of bench/RESULTS.md. mergekit (for the baselines) must be importable.
set -uo pipefail
OUT=${OUT:-/tmp/seme-gpu}
mkdir -p "$OUT"
stages=${*:-tests kernels seme e2e}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
SEME_CUDA_ARCHS=${SEME_CUDA_ARCHS:-90} python3 -m pip install -q --no-build-isolation --no-deps -e . \
  >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
status=0
for stage in $stages; do
  case $stage in
    tests) timeout 420 python3 -m pytest -q -p no:cacheprovider --maxfail=20 tests/test_fused_merge_cuda.py \
             tests/test_semantic_mapping_triton.py tests/test_semantic_bases_triton.py \
             tests/test_fused_merge_triton.py tests/test_backend.py tests/test_staging.py 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    cuda-tests) timeout 300 python3 -m pytest -q -p no:cacheprovider --maxfail=20 tests/test_fused_merge_cuda.py \
                  tests/test_backend.py tests/test_staging.py 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    kernels) timeout 300 python3 -m bench.kernels --device cuda --size $((1 << 26)) --repeat 20 \
               --baseline-repeat 3 2>&1 | tee "$OUT/kernels.log" ;;
    # device time per kernel of the CUDA merges (where a change should go)
    profile) timeout 120 python3 -m bench.cuda_profile 2>&1 | tee "$OUT/profile.log" ;;
    seme) timeout 240 python3 -m bench.seme --device cuda --vocab 128256 --hidden 4096 --repeat 3 2>&1 \
            | tee "$OUT/seme.log" ;;
    e2e) timeout 420 python3 -m bench.e2e --device cuda --root /tmp/seme-e2e 2>&1 | tee "$OUT/e2e.log" ;;
    # where a GPU merge's start-up goes (imports, CUDA's initialisation, planning, publishing)
    startup) timeout 120 python3 -m bench.e2e --device cuda --root /tmp/seme-e2e --recipes linear --repeat 1 \
               --no-mergekit >/dev/null 2>&1
             timeout 60 python3 -X importtime -m seme.merge /tmp/seme-e2e/linear.yml /tmp/seme-startup --device cuda \
               --overwrite 2>"$OUT/importtime.log"
             timeout 60 python3 -m cProfile -s cumtime -m seme.merge /tmp/seme-e2e/linear.yml /tmp/seme-startup \
               --device cuda --overwrite 2>&1 | head -80 | tee "$OUT/startup.log" ;;
  esac
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  cp bench/RESULTS.md "$OUT/RESULTS.md"
done
exit $status
