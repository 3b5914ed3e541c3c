#!/usr/bin/env bash
# Run THERE (the device machine: nvcc + cmake, no Debian dev packages, no network), from the repo
# root, with .devdata carried (scripts/device_deps.sh made it here). Builds the GPU-only tree,
# runs the GPU tests and the benches, and leaves logs and tables in $OUT.
#   scripts/device.sh [all|test|bench|sass|attention|attention-bench|attention-profile] [bench args...]
#   (NIBBLE_TARGETS="a b ..." limits the ninja build to those targets; ATTN_BENCH_MODE picks
#   bench_attention's mode, default all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/nibble-out}
mkdir -p "$OUT"
what=${1:-all}
shift || true
SYSROOT=$PWD/.devdata/sysroot
BUILD=build-device
export PATH=/usr/local/cuda/bin:$PATH

{
  echo "== $(date -u +%FT%TZ) commit $(echo ${NIBBLE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)})"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
} | tee "$OUT/env.txt"

cmake -S . -B $BUILD -G Ninja -DNIBBLE_GPU_ONLY=ON -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$SYSROOT/usr" -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc >"$OUT/build.log" 2>&1 &&
  ninja -C $BUILD -j16 ${NIBBLE_TARGETS:-} >>"$OUT/build.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
echo "build ok"
export LD_LIBRARY_PATH=$SYSROOT/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
# This machine has a GPU: a test that cannot reach it fails instead of skipping.
export NIBBLE_REQUIRE_GPU=1

# Resource usage and the tensor-core instructions actually in the kernels.
lib=$BUILD/libnibble_cuda.a
{
  cuobjdump --dump-resource-usage "$lib" 2>/dev/null | grep -E "Function|REG|SHARED" | sed 's/^ *//' | paste - - | \
    sed -E 's/Function ([^ :]*).*REG:([0-9]+).*STACK:([0-9]+).*SHARED:([0-9]+).*LOCAL:([0-9]+).*/\1 REG=\2 STACK=\3 SHARED=\4 LOCAL=\5/' | \
    c++filt | cut -c1-200
  echo "-- SASS instruction counts (IMMA = integer mma.sync, IGMMA = wgmma s8)"
  cuobjdump --dump-sass "$lib" 2>/dev/null | grep -oE "\b(IMMA|IGMMA|HMMA|HGMMA|LDG|LDS|STL|LDL|LDSM)[.A-Z0-9_]*" | sort | uniq -c
} >"$OUT/sass.txt" 2>&1
if [ "$what" = sass ]; then cat "$OUT/sass.txt"; exit 0; fi

status=0
if [ "$what" = all ] || [ "$what" = test ]; then
  for t in $BUILD/bin/gpu_test_*; do
    echo "== $t"
    "$t" --gtest_brief=0 >"$OUT/$(basename $t).log" 2>&1
    r=$?
    grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED|^norm_quantize:|^gemm_w4a4:|Failure" "$OUT/$(basename $t).log" | head -20
    [ $r -ne 0 ] && status=1
  done
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  echo "== bench_gemm_w4a4 $*"
  $BUILD/bin/bench_gemm_w4a4 "$@" >"$OUT/bench_gemm_w4a4.md" 2>&1 || status=1
  cat "$OUT/bench_gemm_w4a4.md"
  echo "== bench_norm_quantize"
  $BUILD/bin/bench_norm_quantize >"$OUT/bench_norm_quantize.md" 2>&1 || status=1
  cat "$OUT/bench_norm_quantize.md"
fi
if [ "$what" = attention ]; then
  for t in $BUILD/bin/gpu_test_kv_cache_paged $BUILD/bin/gpu_test_attention; do
    echo "== $t"
    "$t" >"$OUT/$(basename $t).log" 2>&1
    r=$?
    grep -E "^(append|decode|prefill) |^\[  (PASSED|FAILED|SKIPPED) |FAILED|Failure" "$OUT/$(basename $t).log" | head -100
    [ $r -ne 0 ] && status=1
  done
fi
if [ "$what" = all ] || [ "$what" = attention ] || [ "$what" = attention-bench ]; then
  echo "== bench_attention ${ATTN_BENCH_MODE:-all}"
  $BUILD/bin/bench_attention ${ATTN_BENCH_MODE:-all} >"$OUT/bench_attention.md" 2>&1 || status=1
  cat "$OUT/bench_attention.md"
fi
if [ "$what" = attention-profile ]; then
  # INT4 vs FP16 decode (7B, batch 256, context 2048): DRAM, issue, stalls; and the INT4 kernel's SASS.
  B=$BUILD/bin/bench_attention
  cuobjdump --dump-sass $B 2>/dev/null | awk '/Function : .*decode_kernelILi128ELb1ELb0E/{p=1} /Function : /&&!/decode_kernelILi128ELb1ELb0E/{p=0} p' >"$OUT/sass_decode_int4.txt"
  st=long_scoreboard,short_scoreboard,math_pipe_throttle,mio_throttle,wait,lg_throttle,not_selected,barrier,no_instruction,dispatch_stall,branch_resolving
  m="gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,sm__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread"
  for s in ${st//,/ }; do m="$m,smsp__average_warps_issue_stalled_${s}_per_issue_active.ratio"; done
  for dt in int4 fp16; do
    echo "== ncu decode $dt 7B 256 2048"
    timeout 150 ncu --metrics $m -k regex:decode_kernel --launch-skip 3 --launch-count 1 $B one-decode $dt 7B 256 2048 2>&1 |
      grep -E "one-decode|duration|dram|inst_executed|issue_active|warps_active|conflicts|stalled|hmma|launch__" | sed 's/^ *//; s/smsp__average_warps_issue_stalled_//'
  done 2>&1 | tee "$OUT/ncu_attention.txt"
fi
if [ "$what" = all ] || [ "$what" = profile ]; then
  # Bytes the kernels really move (vs the packed bytes the table counts), occupancy, time.
  m="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__warps_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_imma_cycles_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size,launch__occupancy_limit_registers"
  for shape in "16 11008 4096" "1 4096 4096" "4096 4096 4096"; do
    echo "== ncu gemm_w4a4 M N K = $shape"
    timeout 120 ncu --metrics $m -k regex:"decode_kernel|prefill_kernel" --launch-skip 2 --launch-count 1 \
      $BUILD/bin/bench_gemm_w4a4 one $shape 2>&1 | grep -E "one:|duration|bytes|warps_active|imma|registers|grid_size|occupancy" | sed 's/^ *//'
  done 2>&1 | tee "$OUT/ncu.txt"
  st="smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_tex_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio"
  { echo "== ncu stalls prefill 4096^3"
    timeout 120 ncu --metrics $st,gpu__time_duration.sum -k regex:prefill_kernel --launch-skip 2 --launch-count 1 \
      $BUILD/bin/bench_gemm_w4a4 one 4096 4096 4096 2>&1 | grep -E "duration|issue|stalled" | sed 's/^ *//; s/smsp__average_warps_issue_stalled_//'
    echo "== ncu rmsnorm_quantize 4096 x 4096"
    timeout 120 ncu --metrics $m,$st -k regex:act_quant --launch-skip 2 --launch-count 1 \
      $BUILD/bin/bench_norm_quantize one 4096 4096 2>&1 | grep -E "one:|duration|bytes|warps_active|registers|occupancy|issue|stalled" | sed 's/^ *//; s/smsp__average_warps_issue_stalled_//'
  } 2>&1 | tee -a "$OUT/ncu.txt"
fi
grep -E "IMMA|IGMMA|LDL|STL" "$OUT/sass.txt"
exit $status
