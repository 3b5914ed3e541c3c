#!/usr/bin/env bash
# The whole test suite: installs what is missing and builds (scripts/setup.sh --no-demo), fuzzes
# each parser for a fixed time, then runs every test with ctest (GPU tests skip with a message on
# machines without a GPU; reference-data tests skip without $NIBBLE_DATA).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --no-demo
# Two test binaries run at once on 2 cores: OpenMP threads must sleep, not spin, while waiting.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
export NIBBLE_DATA="${NIBBLE_DATA:-$(pwd)/../shared/data}"
scripts/fuzz.sh "${NIBBLE_FUZZ_SECONDS:-15}"  # per target: 5 targets, 75 s in all
ctest --test-dir build --output-on-failure -j 2 --timeout 1200
