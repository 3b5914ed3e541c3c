#!/usr/bin/env bash
# Session 21's queued call: main's full GEMM test (session 21 call C cut it at 90 s before the stream-K and
# Auto tests), then s21t (the one-thread TMA producer) tested and benched beside main in one run.
# Pack (README.md): gpu_test_gemm_w4a4 bench_gemm_w4a4 (main) and t_gpu_test_gemm_w4a4 t_bench_gemm_w4a4
# t_gpu_test_executor (s21t) in .devdata/pack-t; carry [".devdata/pack-t", ".devdata/calls"]. One log, c.log.
set -u
mkdir -p .devdata/pack && cp .devdata/pack-t/pack.tar.xz .devdata/pack/
. scripts/device_unpack.sh
export NIBBLE_REQUIRE_GPU=1 NIBBLE_SOURCE_DIR=$PWD
L=$OUT/c.log
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; } > $L
for b in gpu_test_gemm_w4a4 t_gpu_test_gemm_w4a4 t_gpu_test_executor; do
  SECONDS=0; timeout 200 $b > $OUT/$b.log 2>&1
  echo "== $b rc $? in ${SECONDS}s: $(grep -cE '^\[       OK \]' $OUT/$b.log) ok, $(grep -cE '^\[  FAILED  \] [A-Za-z]' $OUT/$b.log) failed" >> $L
  grep -hE "^\[  FAILED  \] [A-Za-z]|run seed|^gemm_w4a4|^stream-K:|moved or NaN|Auto .*differ" $OUT/$b.log | head -10 >> $L
done
for b in main t; do
  bin=bench_gemm_w4a4; [ $b = t ] && bin=t_bench_gemm_w4a4
  echo "== streamk table $b" >> $L
  timeout 60 $bin streamk 64 100 128 256 512 1024 2048 4096 2>&1 | grep -E "^\|" >> $L
done
m="gpu__time_duration.sum,sm__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_imma_cycles_active.avg.pct_of_peak_sustained_active"
for b in main t; do
  bin=bench_gemm_w4a4; [ $b = t ] && bin=t_bench_gemm_w4a4
  echo "== ncu v9 4096^3 $b" >> $L
  timeout 40 ncu --metrics $m -k regex:wgmma_specialized --launch-skip 2 --launch-count 1 $bin one 4096 4096 4096 pre-widened 2>&1 |
    grep -E "gpu__|sm__|smsp__|rror" | sed 's/^ *//; s/  */ /g' >> $L
done
cat $L
