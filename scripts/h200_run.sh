#!/usr/bin/env bash
# One device call: build specmoe-ext for sm_90a, then the stages named on the command line, logging to
# $OUT (the device tool brings $OUT back). Stages:
#   tests      pytest -m gpu on the speculative / generation / acceptance files, then the rest of the suite
#   sanitize   compute-sanitizer memcheck + racecheck on tests/sanitizer_workload.py
#   e2e        bench/bench_e2e.py on qwen3-30b-a3b (E2E_ARGS) and the tiny pair
#   decode     bench/bench_decode.py (DECODE_ARGS)          plan  specmoe plan on qwen3-30b-a3b
#   accept     bench/bench_accept.py                        kernels  bench_routing, bench_moe (quick)
# Usage (device tool): bash scripts/h200_run.sh tests sanitize
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/log"; }
t0=$SECONDS
log "build"
TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import specmoe_ext, torch; print('kernels', specmoe_ext.cuda_kernels_available(), torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/log"
for stage in "$@"; do
  log "stage $stage ($((SECONDS - t0)) s)"
  case $stage in
    tests)
      first="tests/test_spec_engine.py tests/test_generate.py tests/test_accept_ops.py tests/test_host_reads.py"
      timeout ${TESTS_FIRST_S:-300} python3 -m pytest -q -m gpu -p no:cacheprovider $first 2>&1 | tail -60 | tee -a "$OUT/tests_first.log"
      rest=$(ls tests/test_*.py | grep -v -e test_spec_engine -e test_generate -e test_accept_ops -e test_host_reads)
      timeout ${TESTS_REST_S:-300} python3 -m pytest -q -m gpu -p no:cacheprovider $rest 2>&1 | tail -40 | tee -a "$OUT/tests_rest.log" ;;
    sanitize)
      for tool in memcheck racecheck; do
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SAN_S:-200} compute-sanitizer --tool $tool --error-exitcode 9 \
          python3 tests/sanitizer_workload.py > "$OUT/sanitizer_$tool.log" 2>&1
        echo "$tool exit $?" | tee -a "$OUT/log"; tail -5 "$OUT/sanitizer_$tool.log" | tee -a "$OUT/log"
      done ;;
    e2e)
      timeout ${E2E_S:-330} python3 bench/bench_e2e.py --out-dir "$OUT" --no-progress ${E2E_ARGS:-} 2>&1 | tail -60 | tee -a "$OUT/e2e.log"
      [ -n "${E2E_TINY:-}" ] && timeout 120 python3 bench/bench_e2e.py --preset tiny --out-dir "$OUT" --no-progress --batch-sizes 1,4,16 2>&1 | tail -30 | tee -a "$OUT/e2e_tiny.log" ;;
    decode)
      timeout ${DECODE_S:-200} python3 bench/bench_decode.py --out "$OUT/decode_h200_$(date +%F).json" ${DECODE_ARGS:-} 2>&1 | tail -20 | tee -a "$OUT/decode.log" ;;
    plan)
      timeout ${PLAN_S:-200} python3 -m specmoe_ext plan --preset qwen3-30b-a3b --budgets none,16,32 --ridge-point 206 \
        --out "$OUT/plan_qwen3-30b-a3b_h200_$(date +%F).json" --plot "$OUT/plan_qwen3-30b-a3b_h200_$(date +%F).png" 2>&1 | tail -40 | tee -a "$OUT/plan.log" ;;
    accept)
      timeout ${ACCEPT_S:-150} python3 bench/bench_accept.py --out "$OUT" ${ACCEPT_ARGS:-} 2>&1 | tail -30 | tee -a "$OUT/accept.log" ;;
    kernels)
      timeout 120 python3 bench/bench_routing.py --out "$OUT" 2>&1 | tail -15 | tee -a "$OUT/routing.log"
      timeout 200 python3 bench/bench_moe.py --out "$OUT" ${MOE_ARGS:-} 2>&1 | tail -25 | tee -a "$OUT/moe.log" ;;
  esac
done
cp bench/results/*"$(date +%F)"* "$OUT/" 2>/dev/null
log "done ($((SECONDS - t0)) s)"
