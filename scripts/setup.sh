#!/usr/bin/env bash
# Sets nibble up on a fresh Debian (bookworm) machine: installs every package the build needs,
# builds a Release build into build/ (the CLI lands at build/bin/nibble), then runs the demo on
# $NIBBLE_DATA/models/stories260K (default ../shared/data): generation, perplexity, and an Atom
# quantization whose packed file is scored against the full-precision model.
#   scripts/setup.sh            install + build + demo
#   scripts/setup.sh --no-demo  install + build (what scripts/test.sh uses)
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
packages=(build-essential cmake ninja-build pkg-config clang libclang-rt-14-dev
          libgtest-dev libbenchmark-dev nlohmann-json3-dev libfmt-dev libcli11-dev libcpp-httplib-dev
          libpcre2-dev libopenblas-openmp-dev libssl-dev libicu-dev gnuplot-nox)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# CUDA kernels are compiled when nvcc is found (it is looked for in /usr/local/cuda too).
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$(nproc)"

[ "${1:-}" = "--no-demo" ] && exit 0

data="${NIBBLE_DATA:-../shared/data}"
model="$data/models/stories260K"
if [ ! -d "$model" ]; then
  cat <<MSG
Built build/bin/nibble. No demo model at $model (set NIBBLE_DATA to the shared data folder).
Point nibble at any Hugging Face Llama/Mistral/Qwen2/Mixtral checkpoint directory instead:
  build/bin/nibble generate   -m /path/to/Llama-2-7b-hf -p "The capital of France is" -n 32
  build/bin/nibble perplexity -m /path/to/Llama-2-7b-hf -f wikitext2_test_gptq_join.txt
  build/bin/nibble quantize   -m /path/to/Llama-2-7b-hf -f calib.txt --recipe atom-w4a4 -o llama2-7b-w4a4.safetensors
MSG
  exit 0
fi
set -x
build/bin/nibble generate -m "$model" -p "Once upon a time" -n 64
build/bin/nibble perplexity -m "$model" -f "$data/text/wikitext2_test_gptq_join.txt" --chunks 200
# stories260K is 64 wide: Atom's group-128 recipe does not fit it, the scaled-down one does.
build/bin/nibble quantize -m "$model" -f "$data/text/tinystories_valid_sample.txt" --recipe atom-w4a4 \
  --group 32 --keeper 8 --calib-windows 16 --calib-ctx 256 -o build/stories260K-atom-w4a4.safetensors
build/bin/nibble perplexity -m build/stories260K-atom-w4a4.safetensors -f "$data/text/wikitext2_test_gptq_join.txt" \
  --chunks 200 --kld-base "$model"
build/bin/nibble generate -m build/stories260K-atom-w4a4.safetensors -p "Once upon a time" -n 64
