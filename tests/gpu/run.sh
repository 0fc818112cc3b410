#!/usr/bin/env bash
# GPU check on the lent Hopper machine: build, GPU tests, memcheck, benchmark; short table last.
#   tests/gpu/run.sh [build] [smoke] [test] [sanitize] [graphs] [example] [multi] [bench]
#                    [bench-quick] [bench-variants] [bench-mma] [test-fp8] [sanitize-fp8] [bench-fp8]
#                    [racecheck] [ncu] [wgmma-rate] [xu-rate] [icache-probe] [trace] [build-exp] [cluster-probe]
#                    [power] [sched-sweep] [racecheck-sites] [part-times] [ab-patch] [ab-tuning]
#   (sanitize also runs the FP8 memcheck cases; sanitize-fp8 runs only those)
#   (default: build test sanitize graphs bench)
# Carries: .whl/ holds the nvidia-cutlass wheel (the machine has no network). Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/jfm_out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize graphs bench)
want() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
note() { echo "$*" | tee -a "$SUMMARY"; }
# compute-sanitizer segfaults at start now and then (rc 139, no output past its banner): runs
# "$@" with its output appended to log $1, up to three tries while it segfaults (every try stays
# in the log); returns the last try's status.
sanitizer_retry() {
  local log=$1 try rc; shift
  for try in 1 2 3; do
    rc=0
    "$@" >> "$log" 2>&1 || rc=$?
    [ $rc -ne 139 ] && return $rc
    echo "compute-sanitizer segfaulted (try $try): ${*: -1}" >> "$log"
  done
  return $rc
}
# A standalone nvcc probe tests/gpu/$2.cu (stage $1, extra nvcc flags after $3): built and run
# with its output in $OUT/$2.log; its lines tagged $3 go to the summary.
standalone_probe() {
  local stage=$1 name=$2 tag=$3 rc=0; shift 3
  nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a "$@" "tests/gpu/$name.cu" \
    -o "/tmp/$name" > "$OUT/$name.log" 2>&1 && "/tmp/$name" >> "$OUT/$name.log" 2>&1 || rc=$?
  note "$stage: rc=$rc"
  grep "$tag" "$OUT/$name.log" | tee -a "$SUMMARY"
}
# Installs the tree with pip (no build isolation). $1: log file in $OUT; $2: build directory
# ("" = pip's default); $3: macros for CMAKE_CUDA_FLAGS ("" = none). Sets INSTALL_S to the
# seconds taken; on failure prints the log's tail and returns pip's status.
install_tree() {
  local log=$OUT/$1 t0 rc=0 args=(--no-build-isolation --no-deps -v)
  t0=$(date +%s)
  [ -n "$2" ] && args+=("--config-settings=build-dir=$2")
  if [ -n "$3" ]; then
    CMAKE_ARGS="'-DCMAKE_CUDA_FLAGS=$3'" python3 -m pip install "${args[@]}" . > "$log" 2>&1 || rc=$?
  else
    python3 -m pip install "${args[@]}" . > "$log" 2>&1 || rc=$?
  fi
  INSTALL_S=$(( $(date +%s) - t0 ))
  [ $rc -eq 0 ] || tail -30 "$log"
  return $rc
}
# One A/B bench (ab-patch, ab-tuning) of AB_CASES, its log $OUT/$1.log; $2 labels its summary
# lines. The environment (JAX_FLASHMLA_TUNING) is the caller's.
AB_CASES=${AB_CASES:-"s_q=1,h_q=16,s_k=4096;s_q=1,h_q=16,s_k=8192;s_q=1,h_q=16,s_k=32768;s_q=1,h_q=64,s_k=4096"}
ab_bench() {
  python3 -m jax_flashmla.bench --no-naive --reps 5 --cases "$AB_CASES" > "$OUT/$1.log" 2>&1
  note "$2: rc=$?"
  grep -E "^ *[0-9]+ +[0-9]+ +[0-9]+" "$OUT/$1.log" | tee -a "$SUMMARY"
}
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader \
  | tee "$OUT/gpu.txt"

if want build; then
  install_tree build.log "" "" || { note "build: FAILED"; cat "$SUMMARY"; exit 1; }
  note "build: ok ($INSTALL_S s)"
  grep -E "spill|registers" "$OUT/build.log" | sort -u | head -8
  lib=$(find build -name "libjfm_kernels.a" | head -1)
  if [ -n "$lib" ] && command -v cuobjdump >/dev/null; then
    cuobjdump -sass "$lib" > "$OUT/kernels.sass" 2>/dev/null
    note "sass: HGMMA=$(grep -c HGMMA "$OUT/kernels.sass") HMMA=$(grep -c ' HMMA' "$OUT/kernels.sass") local-mem LDL/STL=$(grep -c -E 'LDL|STL' "$OUT/kernels.sass")"
  fi
  python3 -c "import jax, jax_flashmla as f; print('jax', jax.__version__, f.build_info(), jax.devices())"
fi

if want build-exp; then  # the same package built with experiment macros (EXP_FLAGS, e.g. -DJFM_EXP_X)
  install_tree build_exp.log "build/exp${BUILD_EXP_TAG:+_$BUILD_EXP_TAG}" "${EXP_FLAGS:?EXP_FLAGS names the macros}" \
    || { note "build-exp: FAILED"; cat "$SUMMARY"; exit 1; }
  note "build-exp ($EXP_FLAGS): ok ($INSTALL_S s)"
  grep -E "spill" "$OUT/build_exp.log" | sort | uniq -c | head -8
fi

if want ab-patch; then  # the tree against itself with each of AB_PATCHES applied alone, same call
  # AB_PATCHES: patch files (-p1, e.g. docs/patches/*.patch); AB_ROUNDS rounds of base, patch 1,
  # patch 2, ... (each its own build directory, reinstalled before its bench); AB_CASES: bench
  # cases. AB_KEEP: a patch left applied and installed afterwards, so that the stages after this
  # one (smoke, test, sanitize, bench, ...) run on it.
  command -v patch > /dev/null || { note "ab-patch: no patch command here"; cat "$SUMMARY"; exit 1; }
  ab_install() {  # $1: tag; installs the tree as it is now
    local rc=0
    install_tree "ab_install_$1.log" "build/ab_$1" "" || rc=$?
    note "ab-patch install $1: rc=$rc ($INSTALL_S s)"
    return $rc
  }
  for r in $(seq "${AB_ROUNDS:-2}"); do
    for v in base ${AB_PATCHES:?AB_PATCHES names the patch files}; do
      tag=base
      if [ "$v" != base ]; then
        tag=$(basename "$v" .patch)
        patch -s -p1 < "$v" || { note "ab-patch: $v does not apply"; continue; }
      fi
      # The bench runs with the patch still applied: it imports the package from this tree, so
      # a patch's Python changes (FFI target names, workspace shapes) must be there too.
      ab_install "$tag" && ab_bench "ab_${tag}_$r" "ab-patch round $r $tag"
      [ "$v" != base ] && patch -s -R -p1 < "$v"
    done
  done
  if [ -n "${AB_KEEP:-}" ]; then
    patch -s -p1 < "$AB_KEEP" && ab_install "$(basename "$AB_KEEP" .patch)" \
      && note "ab-patch: $AB_KEEP applied and installed for the stages after this one" \
      || { note "ab-patch: AB_KEEP $AB_KEEP failed"; cat "$SUMMARY"; exit 1; }
  else
    ab_install base || exit 1
  fi
fi

if want ab-tuning; then  # the installed build under each of AB_TUNINGS (JAX_FLASHMLA_TUNING), alternating
  for r in $(seq "${AB_ROUNDS:-2}"); do
    for t in ${AB_TUNINGS:?AB_TUNINGS names the tuning values}; do
      JAX_FLASHMLA_TUNING=$t ab_bench "ab_tuning_${t}_$r" "ab-tuning round $r tuning $t"
    done
  done
fi

if want smoke; then  # a few grid cases, time-limited: a hang or wrong result shows up in seconds
  XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 240 python3 -m pytest tests/gpu -m gpu -q -x \
    --tb=short -p no:cacheprovider -k "test_dense_grid and bf16 and (1-1-1- or 2-128-1- or 4-64-8- or 1-9-3-)" \
    > "$OUT/smoke.log" 2>&1
  rc=$?
  tail -15 "$OUT/smoke.log"
  note "smoke: rc=$rc $(grep -E 'passed|failed' "$OUT/smoke.log" | tail -1)"
  [ $rc -ne 0 ] && { cat "$SUMMARY"; exit 1; }
fi

if want test; then
  # Compiles dominate (one per configuration): run 4 workers, no GEMM autotuning for the
  # reference, and the platform allocator so that each worker returns memory it no longer needs
  # (XLA's pool keeps its peak, and four workers' peaks do not fit together).
  XLA_FLAGS=--xla_gpu_autotune_level=0 XLA_PYTHON_CLIENT_ALLOCATOR=platform \
    timeout 560 python3 -m pytest tests/gpu -m gpu -q -x -n 4 --tb=short -p no:cacheprovider \
    --durations=8 > "$OUT/pytest_gpu.log" 2>&1
  rc=$?
  tail -25 "$OUT/pytest_gpu.log"
  note "gpu tests: rc=$rc $(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$OUT/pytest_gpu.log" | tail -1)"
fi

if want test-fp8; then  # only the FP8 KV-cache tests (issue 5), quick to iterate on
  XLA_FLAGS=--xla_gpu_autotune_level=0 XLA_PYTHON_CLIENT_ALLOCATOR=platform \
    timeout 300 python3 -m pytest tests/gpu/test_fp8_gpu.py -m gpu -q -x -n 4 --tb=short \
    -p no:cacheprovider > "$OUT/pytest_fp8.log" 2>&1
  rc=$?
  tail -25 "$OUT/pytest_fp8.log"
  note "fp8 gpu tests: rc=$rc $(grep -E 'passed|failed' "$OUT/pytest_fp8.log" | tail -1)"
fi

if want sanitize; then
  XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false \
    timeout 480 compute-sanitizer --tool memcheck --show-backtrace no --error-exitcode 3 --kernel-name kns=jfm \
    python3 tests/gpu/sanitize_cases.py ${SANITIZE_CASES:-} > "$OUT/sanitize.log" 2>&1
  rc=$?
  tail -12 "$OUT/sanitize.log"
  note "memcheck: rc=$rc $(grep -E 'ERROR SUMMARY' "$OUT/sanitize.log" | tail -1) $(grep -c SANITIZE_OK "$OUT/sanitize.log") ok-lines"
fi

if want sanitize || want sanitize-fp8; then  # the FP8 KV-cache kernels (issue 5)
  # One process per case: compute-sanitizer itself segfaulted running all seven in one process
  # (each case alone is clean). --show-backtrace no: its host backtrace collection segfaulted
  # (dmesg: inside compute-sanitizer) on the two long with-scale cases every time; without it
  # they run to the end with 0 errors (an error is still reported, only without a host stack).
  # Segfaults of compute-sanitizer itself are retried (sanitizer_retry).
  : > "$OUT/sanitize_fp8.log"; rc=0
  for c in ${SANITIZE_FP8_CASES:-$(seq 0 $(( $(grep -c '^    ("fp8_' tests/gpu/fp8_sanitize_cases.py) - 1 )))}; do
    crc=0
    XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false \
      sanitizer_retry "$OUT/sanitize_fp8.log" \
      timeout 200 compute-sanitizer --tool memcheck --show-backtrace no --error-exitcode 3 --kernel-name kns=jfm \
      python3 tests/gpu/fp8_sanitize_cases.py $c || crc=$?
    [ $crc -ne 0 ] && rc=$crc
  done
  grep -E "ok:|ERROR SUMMARY" "$OUT/sanitize_fp8.log" | tail -16
  note "memcheck (fp8): rc=$rc $(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitize_fp8.log") clean runs, $(grep -c SANITIZE_OK "$OUT/sanitize_fp8.log") ok-lines"
fi

if want racecheck; then  # shared-memory hazards (default: the narrow kernel's two consumer warpgroups)
  : > "$OUT/racecheck.log"; rc=0
  XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false \
    sanitizer_retry "$OUT/racecheck.log" \
    timeout 200 compute-sanitizer --tool racecheck --racecheck-report hazard --show-backtrace no --error-exitcode 3 \
    --kernel-name kns=${RACECHECK_KERNEL:-narrow} python3 tests/gpu/fp8_sanitize_cases.py ${RACECHECK_CASES:-2 6} \
    || rc=$?
  grep -E "ok:|SUMMARY" "$OUT/racecheck.log" | tail -6
  note "racecheck (fp8 ${RACECHECK_KERNEL:-narrow}): rc=$rc $(grep -E 'RACECHECK SUMMARY' "$OUT/racecheck.log" | tail -1)"
fi

if want racecheck-sites; then  # racecheck of the native kernels, hazards counted by (kind, sites)
  # racecheck does not model named bar.sync/bar.arrive pairs, so the pipelined kernel reports
  # thousands of hazards across them (perf-notes v5.12); a new site pair is what to look for.
  XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false \
    timeout 200 compute-sanitizer --tool racecheck --racecheck-report hazard --print-limit 100000000 \
    --show-backtrace no --kernel-name kns=${RACECHECK_KERNEL:-pipelined} \
    python3 tests/gpu/sanitize_cases.py ${RACECHECK_CASES:-4} > "$OUT/racecheck_sites.log" 2>&1
  note "racecheck-sites (${RACECHECK_KERNEL:-pipelined}, cases ${RACECHECK_CASES:-4}): rc=$? $(grep -E 'RACECHECK SUMMARY' "$OUT/racecheck_sites.log" | tail -1)"
  grep -E "hazard detected|Thread" "$OUT/racecheck_sites.log" \
    | sed -E 's/at __shared__ 0x[0-9a-f]+ in block \([0-9,]+\)//; s/Thread \([0-9,]+\)//; s/at void .*\+0x[0-9a-f]+ in//; s/\+0x[0-9a-f]+ in/ in/; s/=+ +//g' \
    | paste - - - | sort | uniq -c | sort -rn | head -30 | tee -a "$SUMMARY"
  rm -f "$OUT/racecheck_sites.log"  # hundreds of MB with every hazard printed
fi

if want graphs; then
  for b in 1 8; do
    on=$(XLA_FLAGS=--xla_gpu_graph_min_graph_size=1 python3 tests/gpu/graph_replay.py "$OUT/g_on.npz" $b 1024 --time 2>&1 | grep STEP_TIME)
    off=$(XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 tests/gpu/graph_replay.py "$OUT/g_off.npz" $b 1024 --time 2>&1 | grep STEP_TIME)
    note "cuda graphs b=$b s_k=1024 (2 layers, h_q=128, s_q=2): on: ${on#STEP_TIME_US } us | off: ${off#STEP_TIME_US } us"
  done
fi

if want example; then  # a small DeepSeek-style decoder generating with one jitted step per token
  python3 examples/decode_loop.py --layers 8 --dim 2048 --heads 16 --batch 64 --max-prompt 1024 \
    --new-tokens 128 > "$OUT/example.log" 2>&1
  note "example: rc=$? $(grep -E 'attention:|tokens/s' "$OUT/example.log" | tr '\n' ' ')"
fi

if want multi; then  # on nvidia-h200-x2: data- and head-parallel decode on 2 real GPUs
  python3 tests/gpu/multi_gpu_check.py > "$OUT/multi_gpu.log" 2>&1
  note "multi-gpu: rc=$? $(grep -E 'MULTI_GPU_(OK|FAIL)' "$OUT/multi_gpu.log" | tail -1)"
  tail -30 "$OUT/multi_gpu.log"
fi

if want bench || want bench-quick; then
  extra=(); want bench-quick && extra=(--quick)
  python3 -m jax_flashmla.bench --json "$OUT/bench.json" "${extra[@]}" > "$OUT/bench.log" 2>&1
  note "bench: rc=$?"
  tail -32 "$OUT/bench.log"
fi

if want bench-fp8; then  # FP8 KV caches (both layouts) beside bf16 on the same cases
  cases=${BENCH_FP8_CASES:-"s_q=1,h_q=16,s_k=4096;s_q=1,h_q=16,s_k=32768;s_q=1,h_q=64,s_k=16384;s_q=1,h_q=128,s_k=4096;s_q=2,h_q=128,s_k=4096;s_q=2,h_q=128,s_k=16384"}
  for t in ${BENCH_TUNINGS:-0}; do  # JAX_FLASHMLA_TUNING bit flags (decode_pipelined.cu)
    JAX_FLASHMLA_TUNING=$t timeout 400 python3 -m jax_flashmla.bench --kv ${BENCH_FP8_KV:-all} --no-naive \
      --cases "$cases" --json "$OUT/bench_fp8_$t.json" > "$OUT/bench_fp8_$t.log" 2>&1
    note "bench (fp8, tuning $t${BUILD_EXP_TAG:+, $BUILD_EXP_TAG}): rc=$?"
    grep -E "^ *[0-9]+ +[0-9]+ +[0-9]+" "$OUT/bench_fp8_$t.log" \
      | awk '{printf "  s_q=%s h_q=%s s_k=%s %s us %s TF %s GB/s %s %s\n", $2, $3, $5, $6, $7, $8, $(NF-1), $NF}' \
      | tee -a "$SUMMARY"
  done
fi

if want bench-variants; then  # the grid's corners under each back end (BENCH_KERNELS overrides)
  cases=${BENCH_CASES:-"s_q=1,h_q=16,s_k=4096;s_q=1,h_q=16,s_k=32768;s_q=1,h_q=64,s_k=16384;s_q=1,h_q=128,s_k=4096;s_q=2,h_q=128,s_k=4096;s_q=2,h_q=128,s_k=16384"}
  for k in ${BENCH_KERNELS:-pipelined seesaw wgmma}; do
    for t in ${BENCH_TUNINGS:-0}; do  # JAX_FLASHMLA_TUNING bit flags (decode_pipelined.cu)
      JAX_FLASHMLA_TUNING=$t JAX_FLASHMLA_DECODE_KERNEL=$k python3 -m jax_flashmla.bench --no-naive \
        --reps 5 --cases "$cases" --json "$OUT/bench_${k}_$t.json" > "$OUT/bench_${k}_$t.log" 2>&1
      note "bench ($k, tuning $t): rc=$?"
      grep -E "^ *[0-9]+ +[0-9]+ +[0-9]+" "$OUT/bench_${k}_$t.log" | tee -a "$SUMMARY"
    done
  done
fi

if want ncu; then  # one decode launch per KV layout (NCU_KVS) under Nsight Compute
  # (NCU_CASE: the bench case; NCU_METRICS: extra comma-separated metrics, printed with the rest)
  case=${NCU_CASE:-"b=128,s_q=2,h_q=128,s_k=4096"}
  for kv in ${NCU_KVS:-bf16}; do
    # The bench runs a bf16 row before each FP8 row: pick the FP8 kernel by its mangled template
    # argument (KvFormat 1 = with scale, 2 = per tensor) unless NCU_KERNEL says otherwise.
    base=${NCU_NAME_BASE:-function}; kre=${NCU_KERNEL:-pipelined}
    if [ -z "${NCU_KERNEL:-}" ] && [ "$kv" != bf16 ]; then
      base=mangled; kre=$([ "$kv" = fp8_with_scale ] && echo KvFormatE1 || echo KvFormatE2)
    fi
    timeout 300 ncu --target-processes all --kernel-name-base "$base" -k "regex:$kre" --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy \
      --section InstructionStats ${NCU_METRICS:+--metrics "$NCU_METRICS"} \
      python3 -m jax_flashmla.bench --no-naive --kv "$kv" --reps 1 --target-ms 1 --cases "$case" \
      > "$OUT/ncu_$kv.log" 2>&1
    note "ncu ($kv, tuning ${JAX_FLASHMLA_TUNING:-0}): rc=$?"
    grep -E "Duration|Elapsed Cycles|SM Frequency|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Shared|Tensor|Stall|Issued|Eligible|Warp Cycles|L2 Hit|L1/TEX Hit|Registers|Executed Ipc|Executed Instructions |Local|Mem Busy|Max Bandwidth|Mem Pipes|Cache Throughput${NCU_METRICS:+|${NCU_METRICS//,/|}}" "$OUT/ncu_$kv.log" | awk '!seen[$0]++' | head -60
  done
fi

if want power; then  # SM clock and board power while each KV layout's decode runs (power limit?)
  timeout 300 python3 tests/gpu/power_probe.py > "$OUT/power.log" 2>&1
  note "power: rc=$?"
  grep POWER "$OUT/power.log" | tee -a "$SUMMARY"
fi

# concurrent clusters of 1, 2, 4 CTAs of the decode kernels' shape
want cluster-probe && standalone_probe cluster-probe cluster_probe CLUSTER_PROBE -O2

# wgmma shapes of the decode kernel in isolation (cycles per instruction)
want wgmma-rate && standalone_probe wgmma-rate wgmma_rate WGMMA_RATE -O3 -I csrc

# softmax instruction rates in isolation (MUFU ex2, F2FP, FMA-pipe 2^x)
want xu-rate && standalone_probe xu-rate xu_rate XU_RATE -O3

# cycles per instruction of straight-line code as its size grows
want icache-probe && standalone_probe icache-probe icache_probe ICACHE -O3

if want sched-sweep; then  # split-KV schedules with other per-request costs, and what a request costs
  timeout 560 python3 tests/gpu/sched_sweep.py > "$OUT/sched_sweep.log" 2>&1
  note "sched-sweep: rc=$?"
  grep -E "^(SCHED|PIECE)" "$OUT/sched_sweep.log" | tee -a "$SUMMARY"
fi

if want bench-mma; then  # the v1 (mma.sync) kernel on the same grid, for comparison
  JAX_FLASHMLA_DECODE_KERNEL=mma python3 -m jax_flashmla.bench --no-naive \
    --json "$OUT/bench_mma.json" > "$OUT/bench_mma.log" 2>&1
  note "bench (mma.sync kernel): rc=$?"
  tail -26 "$OUT/bench_mma.log"
fi

# Last (with trace): it reinstalls the package as a probe build, which every later stage would use.
if want part-times; then  # per-CTA start/end clocks of one launch: what a page and a piece cost
  install_tree build_part_times.log build/part_times -DJFM_PART_TIMES || note "part-times build: FAILED"
  note "part-times build: $INSTALL_S s"
  # The host reads the stamps after the launch, which it cannot do inside a CUDA graph capture.
  XLA_FLAGS="--xla_gpu_enable_command_buffer=" PART_RAW="$OUT/part_stamps.npz" timeout 400 python3 tests/gpu/part_times.py \
    > "$OUT/part_times.log" 2>&1
  note "part-times: rc=$?"
  grep -E "^(PARTS|LAST|SMS)" "$OUT/part_times.log" | tee -a "$SUMMARY"
fi

if want trace; then  # timeline probe: a -DJFM_TRACE build prints SM-clock stamps of CTA (0,0,0)
  # (TRACE_FLAGS: more macros for that build, e.g. an experiment's)
  install_tree build_trace.log build/trace "-DJFM_TRACE ${TRACE_FLAGS:-}" || note "trace build: FAILED"
  note "trace build: $INSTALL_S s"
  # The host prints the stamps after the first launch (dump_trace), which it cannot do inside a
  # CUDA graph capture: XLA's command buffers are off here. TRACE_TUNING=1: the no-loads build.
  for c in ${TRACE_CASES:-"s_q=2,h_q=128,s_k=16384"}; do
    for tu in ${TRACE_TUNING:-0}; do
      f="$OUT/trace_${c//[=,]/_}_t$tu.txt"
      XLA_FLAGS="--xla_gpu_enable_command_buffer=" JAX_FLASHMLA_TUNING=$tu \
        python3 -m jax_flashmla.bench --no-naive --reps 1 --target-ms 1 --cases "$c" 2>&1 \
        | grep JFM_TRACE > "$f"
      note "trace $c tuning=$tu: $(wc -l < "$f") stamps"
      python3 tests/gpu/trace_table.py "$f" >> "$SUMMARY"
    done
  done
fi

echo "================ summary ================"
cat "$SUMMARY"
