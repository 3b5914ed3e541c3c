#!/usr/bin/env bash
# Run THERE, sourced: `. scripts/device_unpack.sh` unpacks .devdata/pack/pack.tar.xz (made here by
# scripts/device_pack.sh) into /tmp/nibble-pack and puts its programs and libraries on the paths.
# NCCL (218 MB, too big to carry) comes from the device's PyTorch wheel (nvidia-nccl).
mkdir -p /tmp/nibble-pack && tar -C /tmp/nibble-pack -xJf .devdata/pack/pack.tar.xz
nccl_lib=$(python3 -c 'import os, nvidia.nccl as n; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null)
export PATH=/tmp/nibble-pack/bin:$PATH
export LD_LIBRARY_PATH=/tmp/nibble-pack/lib:/usr/local/cuda/lib64${nccl_lib:+:$nccl_lib}:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off on the lent machines (device docs)
