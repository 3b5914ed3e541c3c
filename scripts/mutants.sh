#!/usr/bin/env bash
# Mutation check of the test suite: plants plausible one-line bugs, one at a time, in a throwaway
# copy of this tree and checks that CI's ctest suite (scripts/test.sh's ctest; the fuzzers are not
# run) fails on each. Run it before calling quantization or evaluation work done; it is not in CI
# (8 minutes on 2 shared cores when every mutant dies in its first tests, about 6 more per survivor;
# notes/mutants.md has the last run).
#   scripts/mutants.sh [NAME...]       (default: every mutant; NIBBLE_DATA as scripts/test.sh;
#                                       NIBBLE_MUTANTS_BASELINE=0 skips the unmutated run)
# For each mutant the tests named in its `first` regex run first (a subset of the same ctest
# suite, only their executables rebuilt); only if they all pass does the whole suite run, so a
# survivor has faced every test.
# Prints a table mutant -> killed / SURVIVED and the time each took; exits 1 if any survived.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${NIBBLE_DATA:-}" ] && [ -d "$src/../shared/data" ]; then export NIBBLE_DATA="$(cd "$src/../shared/data" && pwd)"; fi
[ -n "${NIBBLE_DATA:-}" ] && [ -d "$NIBBLE_DATA" ] || { echo "mutants.sh: reference data needed (set NIBBLE_DATA)"; exit 1; }
export OMP_WAIT_POLICY=passive
export CCACHE_BASEDIR=/  # relative paths: the copy reuses the checkout's compiled objects
# The copy (removed at the end) and every log (kept). A fixed path, so that a second run finds the
# test objects (compiled with the source path in them) in ccache.
work=${NIBBLE_MUTANTS_DIR:-/tmp/nibble-mutants}
rm -rf "$work"
mkdir -p "$work/tree"
trap 'rm -rf "$work/tree"' EXIT
(cd "$src" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -C "$work/tree" -xf -
cd "$work/tree"
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DNIBBLE_CUDA=OFF "${launcher[@]}" >"$work/configure.log" 2>&1
ctest_all() { ctest --test-dir build -j 2 --timeout 1200 "$@"; }

# name @@ file @@ exact text (must occur once) @@ replacement @@ tests run first (ctest -R regex)
# "\n" in the texts is a newline.
mutants=$(cat <<'EOF'
salience-flipped @@ src/nibble/quant/quantize_model.cpp @@ return metric[size_t(a)] < metric[size_t(b)]; @@ return metric[size_t(a)] > metric[size_t(b)]; @@ Reorder|QuantizeQuality.Stories
gptq-keepers-uncompensated @@ src/nibble/quant/gptq.cpp @@ const double q = quantize(n, i, w); @@ const double q = quantize(n, i, i < M ? w : double(Wf[size_t(n * K + i)])); @@ Gptq|QuantizeQuality.Stories
ppl-drops-last-prediction @@ src/nibble/eval/perplexity.cpp @@ #pragma omp for\n        for (int64_t i = 0; i < preds; ++i) { @@ #pragma omp for\n        for (int64_t i = 0; i < preds - 1; ++i) { @@ PerplexityMath|tinystories
row-group-scale-from-first-row @@ src/nibble/quant/format.cpp @@ for (int r = 0; r < spec.row_group; ++r) stats.add(x + r * cols + c0, group); @@ for (int r = 0; r < 1; ++r) stats.add(x + r * cols + c0, group); @@ Format
pack-nibbles-swapped @@ src/nibble/quant/format.cpp @@ packed[i / 2] = uint8_t((codes[i] & 0xf) | (codes[i + 1] & 0xf) << 4); @@ packed[i / 2] = uint8_t((codes[i] & 0xf) << 4 | (codes[i + 1] & 0xf)); @@ Format
hadamard-butterfly-sign @@ src/nibble/quant/hadamard.h @@ x[j + h] = a - b; @@ x[j + h] = b - a; @@ KVQuant|KVCache|Reorder|GroupHadamard
calib-sum-not-squared @@ src/nibble/quant/calibrate.cpp @@ sum_sq_[size_t(c)] += v * v; @@ sum_sq_[size_t(c)] += v; @@ Calibration|QuantizeQuality.Stories
down-hessian-unpermuted @@ src/nibble/quant/quantize_model.cpp @@ add(&ex.down, {}, {LinearSlot::Down, tag}, "down_proj" + en, down_order); @@ add(&ex.down, {}, {LinearSlot::Down, tag}, "down_proj" + en); @@ QuantizeQuality.Stories
gptq-absolute-damping @@ src/nibble/quant/gptq.cpp @@ for (int64_t i = 0; i < K; ++i) H[size_t(i * K + i)] += percdamp * mean_diag; @@ for (int64_t i = 0; i < K; ++i) H[size_t(i * K + i)] += percdamp; @@ Gptq
gptq-block-update-short @@ src/nibble/quant/gptq.cpp @@ for (int64_t j = i + 1; j < i2; ++j) W[size_t(n * K + j)] -= e * U[size_t(i * K + j)]; @@ for (int64_t j = i + 1; j < i2 - 1; ++j) W[size_t(n * K + j)] -= e * U[size_t(i * K + j)]; @@ Gptq
kld-direction-swapped @@ src/nibble/eval/perplexity.cpp @@ for (int64_t t = 0; t < V; ++t) kl += std::exp(blp[t]) * (blp[t] - lp[size_t(t)]); @@ for (int64_t t = 0; t < V; ++t) kl += std::exp(lp[size_t(t)]) * (lp[size_t(t)] - blp[t]); @@ PerplexityMath
bpe-highest-rank-first @@ src/nibble/tokenizer/bpe.cpp @@ return rank != o.rank ? rank > o.rank : pos > o.pos; @@ return rank != o.rank ? rank < o.rank : pos > o.pos; @@ Tokenizer|Bpe
rope-frequency-halved-exponent @@ src/nibble/backend/cpu/ops.cpp @@ inv[size_t(i)] = 1.0f / std::pow(float(c.rope_theta), float(2 * i) / float(d)); @@ inv[size_t(i)] = 1.0f / std::pow(float(c.rope_theta), float(i) / float(d)); @@ Model
kv-clip-ignored @@ src/nibble/quant/kv_quant.cpp @@ return FormatSpec{f.bits == 4 ? Format::Int4Asym : Format::Int8Asym, int(head_dim), 1, f.clip}; @@ return FormatSpec{f.bits == 4 ? Format::Int4Asym : Format::Int8Asym, int(head_dim), 1, 1.0f}; @@ KVCache|KVQuant
safetensors-end-off-by-one @@ src/nibble/io/safetensors.cpp @@ check(end <= data_size, tw, @@ check(end <= data_size + 1, tw, @@ Safetensors
EOF
)
[ $# -gt 0 ] && mutants=$(grep -E "^($(IFS='|'; echo "$*")) @@" <<<"$mutants")

# Replaces the one occurrence of FROM by TO in FILE ("\n" = newline); fails loudly otherwise.
mutate() {
  python3 - "$@" <<'PY'
import sys
path, old, new = sys.argv[1], sys.argv[2].replace('\\n', '\n'), sys.argv[3].replace('\\n', '\n')
text = open(path).read()
n = text.count(old)
if n != 1:
    sys.exit(f"mutants.sh: {path}: expected the text once, found it {n} times: {old!r}")
open(path, 'w').write(text.replace(old, new))
PY
}

t0=$(date +%s)
echo "== building the copy in $work/tree"
ninja -C build >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; echo "mutants.sh: the unmutated tree does not build"; exit 1; }
if [ "${NIBBLE_MUTANTS_BASELINE:-1}" = 1 ]; then
  echo "== baseline: the whole suite must pass unmutated"
  ctest_all >"$work/baseline.log" 2>&1 || { grep -E "Failed|\*\*\*" "$work/baseline.log" | head; echo "mutants.sh: the baseline fails"; exit 1; }
  echo "baseline passed ($(( $(date +%s) - t0 )) s including the build)"
fi

rows=() survived=0
while IFS= read -r line; do
  [ -z "$line" ] && continue
  IFS=$'\x1f' read -r name file from to first <<<"${line// @@ /$'\x1f'}"
  t1=$(date +%s)
  cp "$file" "$work/original"
  mutate "$file" "$from" "$to"
  # Only the executables of the `first` tests are relinked before they run; everything before the rest.
  targets=$(ctest --test-dir build -N -R "$first" --show-only=json-v1 | python3 -c '
import json, os, sys
print(" ".join(sorted({os.path.basename(t["command"][0]) for t in json.load(sys.stdin)["tests"]})))')
  if [ -z "$targets" ]; then
    verdict="ERROR: no test matches $first"
  elif ! ninja -C build $targets >"$work/$name.build.log" 2>&1; then
    verdict="ERROR: does not build"
  elif ! ctest_all -R "$first" >"$work/$name.first.log" 2>&1; then
    verdict="killed by: $(grep -oE '[0-9]+ - [^ ]+ \(Failed|Timeout\)' "$work/$name.first.log" | head -3 | sed -E 's/^[0-9]+ - //; s/ \(.*//' | paste -sd, -)"
  elif ! { ninja -C build >>"$work/$name.build.log" 2>&1 && ctest_all >"$work/$name.all.log" 2>&1; }; then
    verdict="killed (whole suite) by: $(grep -oE '[0-9]+ - [^ ]+ \(Failed|Timeout\)' "$work/$name.all.log" | head -3 | sed -E 's/^[0-9]+ - //; s/ \(.*//' | paste -sd, -)"
  else
    verdict="SURVIVED"
    survived=$((survived + 1))
  fi
  cp "$work/original" "$file"
  rows+=("$(printf '| %s | %s | %s | %d s |' "$name" "$file" "$verdict" $(( $(date +%s) - t1 )))")
  echo "${rows[-1]}"
done <<<"$mutants"
ninja -C build >/dev/null 2>&1 || true

echo
echo "| mutant | file | result | time |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "$(( ${#rows[@]} - survived )) of ${#rows[@]} killed, $survived survived; total $(( $(date +%s) - t0 )) s (logs: $work)"
[ "$survived" -eq 0 ]
