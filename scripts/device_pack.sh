#!/usr/bin/env bash
# Run HERE (the dev machine): packs programs built in build/bin (GPU tests, benches, the CLI) with
# the Debian shared libraries they need that the device image lacks (OpenBLAS, PCRE2, fmt, ...),
# stripped and xz-compressed, into .devdata/pack/pack.tar.xz. Carry `.devdata/pack` in the device
# call and start its command with scripts/device_unpack.sh's line.
#   scripts/device_pack.sh gpu_test_executor bench_decode_step nibble
#   (BUILD=build-gpu takes the programs from another build tree; PACK=.devdata/pack-x writes another pack,
#   for a call that carries two: the device script copies it to .devdata/pack before unpacking)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${PACK:-.devdata/pack}
build=${BUILD:-build}
rm -rf "$out"
mkdir -p "$out/stage/bin" "$out/stage/lib"
for b in "$@"; do strip -o "$out/stage/bin/$b" "$build/bin/$b"; done
for l in libopenblas.so.0 libgfortran.so.5 libquadmath.so.0 libpcre2-8.so.0 libfmt.so.9 libgomp.so.1 libicuuc.so.72 \
         libicudata.so.72 libcpp-httplib.so.0.11 libbrotlidec.so.1 libbrotlienc.so.1 libbrotlicommon.so.1; do
  cp -L "/usr/lib/x86_64-linux-gnu/$l" "$out/stage/lib/"
done
tar -C "$out/stage" -cJf "$out/pack.tar.xz" .
rm -rf "$out/stage"
du -sh "$out/pack.tar.xz"
