#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (library instrumented, ASan + UBSan) and runs each for a
# fixed time on its seed corpus. Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNIBBLE_FUZZ=ON \
  -DNIBBLE_CUDA=OFF -DNIBBLE_TESTS=OFF -DNIBBLE_BENCH=OFF >/dev/null
# Every fuzz/fuzz_<target>.cpp, each seeded from fuzz/corpus/<target>/.
targets=$(cd fuzz && ls fuzz_*.cpp | sed 's/^fuzz_//; s/\.cpp$//')
if ! ninja -C build-fuzz $(printf 'fuzz_%s ' $targets) >build-fuzz/build.log 2>&1; then
  grep -E "error|FAILED" build-fuzz/build.log | head -20
  echo "fuzz.sh: building the fuzzers (clang) failed; build-fuzz/build.log has the whole log" >&2
  exit 1
fi
for target in $targets; do
  corpus="build-fuzz/corpus-$target"
  mkdir -p "$corpus"
  [ -d "fuzz/corpus/$target" ] && cp -n fuzz/corpus/"$target"/* "$corpus"/ 2>/dev/null || true
  echo "fuzz_$target: ${seconds}s"
  log="build-fuzz/fuzz-$target.log"
  status=0
  "build-fuzz/bin/fuzz_$target" -max_total_time="$seconds" -max_len=65536 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="build-fuzz/crash-$target-" "$corpus" >"$log" 2>&1 || status=$?
  grep -E "^stat::(number_of_executed_units|peak_rss_mb)" "$log" || true
  # libFuzzer exits non-zero on a crash, a leak or a timeout, and saves the input as an artifact.
  if [ "$status" -ne 0 ]; then
    echo "fuzz_$target: failure (exit $status), input saved under build-fuzz/crash-$target-*" >&2
    tail -40 "$log" >&2
    exit 1
  fi
done
echo "fuzzing: no crash"
