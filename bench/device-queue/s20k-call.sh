#!/usr/bin/env bash
# s20k's call (session 20 call C, never ran: no device could be started): is stream-K's run-to-run difference (call B: 1 case of 59, s20k) s20k's or main's too?
# The failing seed replayed, the stream-K test repeated on both; the streamk tables main vs s20k (call A's
# came back cut); ncu pipe utilisation of v9 at 4096^3 (what bounds it if not the fold's serialization).
set -u
mkdir -p .devdata/pack && cp .devdata/pack-k/pack.tar.xz .devdata/pack/
. scripts/device_unpack.sh
export NIBBLE_REQUIRE_GPU=1
L=$OUT/c.log
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $L
f=--gtest_filter=GemmW4A4StreamK.MatchesV9AndTheFormatReference
echo "== replay call B's seed, s20k" >> $L
NIBBLE_TEST_SEED=13089219393312422721 timeout 40 k_gpu_test_gemm_w4a4 $f > $OUT/replay.log 2>&1; echo "rc $?" >> $L
grep -E "unwritten [1-9]|FAILED  \]|PASSED" $OUT/replay.log >> $L
for b in main k; do
  bin=gpu_test_gemm_w4a4; [ $b = k ] && bin=k_gpu_test_gemm_w4a4
  echo "== stream-K test x3, $b" >> $L
  timeout 70 $bin $f --gtest_repeat=3 > $OUT/rep_$b.log 2>&1; echo "rc $?" >> $L
  echo "cases $(grep -c '^stream-K M=' $OUT/rep_$b.log), with unwritten: $(grep -c 'unwritten [1-9]' $OUT/rep_$b.log)" >> $L
  grep -E "unwritten [1-9]|run seed" $OUT/rep_$b.log | head -6 >> $L
done
for b in now k; do
  bin=bench_gemm_w4a4; [ $b = k ] && bin=k_bench_gemm_w4a4
  echo "== streamk table $b" >> $L
  timeout 60 $bin streamk 64 100 128 256 512 1024 2048 4096 2>&1 | grep -E "^\|" >> $L
done
m="sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_fmaheavy_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_imma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_xu_cycles_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active"
echo "== ncu k v9 4096^3 pipes" >> $L
timeout 50 ncu --metrics $m -k regex:"wgmma_specialized" --launch-skip 2 --launch-count 1 k_bench_gemm_w4a4 one 4096 4096 4096 pre-widened 2>&1 |
  grep -E "sm__|smsp__|ERR|rror" | sed 's/^ *//' >> $L
cat $L
