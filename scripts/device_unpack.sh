#!/usr/bin/env bash
# Run THERE, sourced: `. scripts/device_unpack.sh` unpacks .devdata/pack/pack.tar.xz (made here by
# scripts/device_pack.sh) into /tmp/nibble-pack and puts its programs and libraries on the paths.
mkdir -p /tmp/nibble-pack && tar -C /tmp/nibble-pack -xJf .devdata/pack/pack.tar.xz
export PATH=/tmp/nibble-pack/bin:$PATH
export LD_LIBRARY_PATH=/tmp/nibble-pack/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
