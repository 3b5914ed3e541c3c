#!/usr/bin/env bash
# Session 19 call D: (1) s19h's GEMM tests (v9 on half tiles; main's merged pair stream kernel in
# it too); (2) v9 s19h vs main (bench_gemm_w4a4 gemm 256 1024 4096); (3) the M <= 16 decode table
# for main-before (5787001) and main-now (the pair kernel, the plan's block cost, Auto's rule);
# (4) an 8-layer Llama-2-7B atom-w4a4 decode step at batch 1, 16: before vs now.
set -u
mkdir -p .devdata/pack && cp .devdata/pack-d/pack.tar.xz .devdata/pack/
. scripts/device_unpack.sh
export NIBBLE_REQUIRE_GPU=1
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader; } | tee $OUT/env.txt
echo "== gpu_test_gemm_w4a4 (s19h)"
timeout 100 h_gpu_test_gemm_w4a4 --gtest_random_seed=190522 > $OUT/gpu_test_gemm_w4a4.log 2>&1; echo "rc $?"
grep -E "^\[  (PASSED|FAILED) |FAILED  |Failure|^gemm_w4a4" $OUT/gpu_test_gemm_w4a4.log | head -12
for b in now h; do
  echo "== gemm table $b"
  bin=bench_gemm_w4a4; [ $b = h ] && bin=h_bench_gemm_w4a4
  timeout 80 $bin gemm 1024 4096 > $OUT/gemm_$b.md 2>&1
  grep -E "^\| (7B|70B)" $OUT/gemm_$b.md | cut -d'|' -f2-4,7,13,15-18
done
timeout 60 nibble synth --like llama-2-7b --recipe atom-w4a4 --layers 8 -o /tmp/l7-8.nibble > $OUT/synth.log 2>&1; echo "synth rc $?"
for b in before now; do
  bin=bench_decode_step; [ $b = before ] && bin=main_bench_decode_step
  echo "== decode step $b"
  timeout 40 $bin -m /tmp/l7-8.nibble --batch 1,16 --ctx 512 --steps 40 > $OUT/step_$b.md 2> $OUT/step_$b.err
  grep -E "^\|" $OUT/step_$b.md | tail -3
done
