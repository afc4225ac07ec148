#!/usr/bin/env bash
# One device call: build specmoe-ext for sm_90a (or reuse a carried build), then the stages named on the
# command line, inside one deadline. Logs and results go to a work folder that is packed into $OUT/all.tgz
# after every stage (the device tool brings back at most 8 files), so a stage cut short still returns
# what the others wrote. The built extension is copied to $OUT so a later call can carry it (SO=path).
# Stages:
#   tests      pytest -m gpu on the speculative / generation / acceptance files, then the rest of the suite
#   sanitize   compute-sanitizer memcheck + racecheck on tests/sanitizer_workload.py (our kernels: kns=specmoe)
#   kernels    bench_routing, bench_moe, bench_tree_attention (FlashInfer baseline when importable)
#   attention  bench_tree_attention alone (ATTN_ARGS)
#   e2e        bench/bench_e2e.py on qwen3-30b-a3b (E2E_ARGS), then the tiny pair when E2E_TINY is set
#   decode     bench/bench_decode.py (DECODE_ARGS)          plan  specmoe plan on qwen3-30b-a3b
#   offload    bench/bench_offload.py (OFFLOAD_ARGS, OFFLOAD_S)
#   invariance bench/bench_invariance.py: verify vs decode, batch vs alone, per component (tiny fp32 / bf16, qwen3 4 layers)
#   accept     bench/bench_accept.py (ACCEPT_ARGS)
#   realpair   issue 21: realpair-train (scripts/train_pair.py: the MoE target + distilled draft on the carried
#              corpus RP_CORPUS, default corpus/realpair = scripts/make_corpus.py's output made on the CPU side, into
#              RP_OUT, default runs/realpair: git-ignored, so kept while the machine stays warm; a finished run with
#              the same arguments is not redone), then realpair-bench (bench/bench_real_pair.py on the held-out
#              split into $W). RP_TRAIN_S / RP_BENCH_S: stage limits; RP_TRAIN_ARGS / RP_BENCH_ARGS: extra flags.
#              Carry corpus/realpair (37 MiB) and, to skip the build, SO=.gpu/_C*.so (14 MiB): 64 MiB at most.
# Usage (device tool): DEADLINE_S=560 bash scripts/h200_run.sh tests sanitize kernels
set -uo pipefail
OUT=${OUT:-/tmp/out}
W=${WORK_DIR:-/tmp/h200_work}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/flashinfer}
DAY=$(date +%F)
t0=$SECONDS
END=$((t0 + ${DEADLINE_S:-560}))
log() { echo "[$(date +%H:%M:%S) +$((SECONDS - t0))s] $*" | tee -a "$W/log"; }
left() { local l=$((END - SECONDS)); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }   # min(stage limit, time left)
pack() { cp bench/results/*"$DAY"* "$W/" 2>/dev/null; tar czf "$OUT/all.tgz" -C "$W" . 2>/dev/null; }
log "$(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader) kernel $(uname -r)"
if [ -n "${SO:-}" ] && [ -f "$SO" ]; then
  cp "$SO" python/specmoe_ext/ && log "carried build $SO"
else
  log "build"
  TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 timeout "$(left 420)" python3 setup.py build_ext --inplace > "$W/build.log" 2>&1 \
    || { tail -40 "$W/build.log"; pack; exit 1; }
  cp python/specmoe_ext/_C*.so "$OUT/"
fi
python3 -c "import specmoe_ext, torch; print('kernels', specmoe_ext.cuda_kernels_available(), torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$W/log"
pack
for stage in "$@"; do
  log "stage $stage"
  [ "$(left 30)" -lt 30 ] && { log "skipped: deadline"; continue; }
  case $stage in
    tests)
      first=${TESTS_FIRST:-tests/test_spec_engine.py tests/test_generate.py tests/test_accept_ops.py tests/test_host_reads.py}
      timeout "$(left ${TESTS_FIRST_S:-300})" python3 -m pytest -q -m gpu -p no:cacheprovider $first > "$W/tests_first.log" 2>&1
      tail -25 "$W/tests_first.log"
      rest=${TESTS_REST:-$(ls tests/test_*.py | grep -v -e test_spec_engine -e test_generate -e test_accept_ops -e test_host_reads)}
      timeout "$(left ${TESTS_REST_S:-300})" python3 -m pytest -q -m gpu -p no:cacheprovider $rest > "$W/tests_rest.log" 2>&1
      tail -25 "$W/tests_rest.log" ;;
    sanitize)
      for tool in ${SAN_TOOLS:-memcheck racecheck}; do
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(left ${SAN_S:-200})" compute-sanitizer --tool $tool --error-exitcode 9 --kernel-name kns=specmoe \
          python3 tests/sanitizer_workload.py > "$W/sanitizer_$tool.log" 2>&1
        log "$tool exit $?"; tail -4 "$W/sanitizer_$tool.log"
      done ;;
    kernels)
      timeout "$(left 120)" python3 bench/bench_routing.py ${ROUTING_ARGS:-} > "$W/routing.log" 2>&1; tail -12 "$W/routing.log"
      timeout "$(left 200)" python3 bench/bench_moe.py ${MOE_ARGS:-} > "$W/moe.log" 2>&1; tail -20 "$W/moe.log"
      timeout "$(left 200)" python3 bench/bench_tree_attention.py ${ATTN_ARGS:-} > "$W/attn.log" 2>&1; tail -20 "$W/attn.log" ;;
    attention)
      timeout "$(left 200)" python3 bench/bench_tree_attention.py ${ATTN_ARGS:-} > "$W/attn.log" 2>&1; tail -25 "$W/attn.log" ;;
    e2e)
      timeout "$(left ${E2E_S:-330})" python3 bench/bench_e2e.py --out-dir "$W" --no-progress ${E2E_ARGS:-} > "$W/e2e.log" 2>&1
      tail -40 "$W/e2e.log"
      if [ -n "${E2E_TINY:-}" ]; then
        timeout "$(left 120)" python3 bench/bench_e2e.py --preset tiny --out-dir "$W" --no-progress --batch-sizes 1,4,16 > "$W/e2e_tiny.log" 2>&1
        tail -20 "$W/e2e_tiny.log"
      fi ;;
    offload)
      timeout "$(left ${OFFLOAD_S:-200})" python3 bench/bench_offload.py --out-dir "$W" --time-limit $(( $(left ${OFFLOAD_S:-200}) - 30 )) \
        ${OFFLOAD_ARGS:-} > "$W/offload.log" 2>&1
      log "bench_offload exit $?"; tail -30 "$W/offload.log" ;;
    invariance)
      for args in "--preset tiny --dtype float32" "--preset tiny --dtype bfloat16" "--preset qwen3-30b-a3b --layers 4 --dtype bfloat16"; do
        timeout "$(left 90)" python3 bench/bench_invariance.py $args --out-dir "$W/invariance_${args// /_}" >> "$W/invariance.log" 2>&1
      done
      tail -30 "$W/invariance.log" ;;
    decode)
      timeout "$(left ${DECODE_S:-200})" python3 bench/bench_decode.py --out "$W/decode_h200_$DAY.json" ${DECODE_ARGS:-} > "$W/decode.log" 2>&1
      tail -20 "$W/decode.log" ;;
    plan)
      timeout "$(left ${PLAN_S:-200})" python3 -m specmoe_ext plan --preset qwen3-30b-a3b --budgets ${PLAN_BUDGETS:-none,16,32} --ridge-point 206 \
        --out "$W/plan_qwen3-30b-a3b_h200_$DAY.json" --plot "$W/plan_qwen3-30b-a3b_h200_$DAY.png" > "$W/plan.log" 2>&1
      tail -30 "$W/plan.log" ;;
    accept)
      timeout "$(left ${ACCEPT_S:-150})" python3 bench/bench_accept.py --out "$W" ${ACCEPT_ARGS:-} > "$W/accept.log" 2>&1
      tail -20 "$W/accept.log" ;;
    realpair|realpair-train|realpair-bench)
      RP_CORPUS=${RP_CORPUS:-corpus/realpair}; RP_OUT=${RP_OUT:-runs/realpair}
      if [ ! -f "$RP_CORPUS/manifest.json" ]; then
        log "realpair: no corpus at $RP_CORPUS (run python scripts/make_corpus.py on the CPU side and carry it)"
        continue
      fi
      cp "$RP_CORPUS/manifest.json" "$W/realpair_corpus_manifest.json"
      if [ "$stage" != realpair-bench ]; then
        tl=$(left ${RP_TRAIN_S:-330})
        timeout "$tl" python3 scripts/train_pair.py --corpus "$RP_CORPUS" --out "$RP_OUT" --max-seconds $((tl - 25)) \
          ${RP_TRAIN_ARGS:-} > "$W/realpair_train.log" 2>&1
        log "train_pair exit $?"; tail -25 "$W/realpair_train.log"
        cp "$RP_OUT/training.json" "$W/realpair_training.json" 2>/dev/null
        for m in target draft; do cp "$RP_OUT/$m/config.json" "$W/realpair_${m}_config.json" 2>/dev/null; done
        pack
      fi
      if [ "$stage" != realpair-train ]; then
        if [ -f "$RP_OUT/draft/model.safetensors" ] && [ "$(left 60)" -ge 60 ]; then
          bl=$(left ${RP_BENCH_S:-400})
          timeout "$bl" python3 bench/bench_real_pair.py --target "$RP_OUT/target" --draft "$RP_OUT/draft" \
            --corpus "$RP_CORPUS" --out-dir "$W" --time-limit $((bl - 45)) ${RP_BENCH_ARGS:-} > "$W/realpair_bench.log" 2>&1
          log "bench_real_pair exit $?"; tail -40 "$W/realpair_bench.log"
        else
          log "realpair: no trained pair in $RP_OUT, or under 60 s left for the benchmark"
        fi
      fi ;;
    *) log "unknown stage $stage" ;;
  esac
  pack
done
log "done"
pack
