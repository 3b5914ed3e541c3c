#!/usr/bin/env bash
# Run HERE (the dev machine, Debian 12, network): fetches the Debian packages the GPU-only build
# needs on the device machine (which has nvcc/cmake but no dev packages and no network) and
# unpacks them into .devdata/sysroot. Carry it with `carry: [".devdata"]`; scripts/device.sh
# (run THERE) points CMake at it.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .devdata/debs .devdata/sysroot
cd .devdata/debs
apt-get download libfmt-dev libfmt9 libgtest-dev
cd ..
for f in debs/*.deb; do dpkg -x "$f" sysroot; done
# Docs and man pages only cost carry space.
rm -rf sysroot/usr/share/doc sysroot/usr/share/man
du -sh sysroot
