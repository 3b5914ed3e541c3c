#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (library instrumented, ASan + UBSan) and runs each for a
# fixed time on its seed corpus. Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNIBBLE_FUZZ=ON \
  -DNIBBLE_CUDA=OFF -DNIBBLE_TESTS=OFF -DNIBBLE_BENCH=OFF >/dev/null
ninja -C build-fuzz fuzz_safetensors fuzz_tokenizer >/dev/null
for target in safetensors tokenizer; do
  corpus="build-fuzz/corpus-$target"
  mkdir -p "$corpus"
  [ -d "fuzz/corpus/$target" ] && cp -n fuzz/corpus/"$target"/* "$corpus"/ 2>/dev/null || true
  echo "fuzz_$target: ${seconds}s"
  "build-fuzz/fuzz/fuzz_$target" -max_total_time="$seconds" -max_len=65536 -timeout=10 -print_final_stats=1 \
    "$corpus" 2>&1 | grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb)|ERROR|SUMMARY" || true
  # libFuzzer exits non-zero on a crash; re-check so a failure stops the script.
  "build-fuzz/fuzz/fuzz_$target" -runs=0 "$corpus" >/dev/null 2>&1 || { echo "fuzz_$target: crash found" >&2; exit 1; }
done
echo "fuzzing: no crash"
