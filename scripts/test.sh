#!/usr/bin/env bash
# The whole test suite: installs what is missing and builds (scripts/setup.sh --no-demo), fuzzes
# each parser for a fixed time, then runs every test with ctest (GPU tests skip with a message on
# machines without a GPU; reference-data tests skip only when $NIBBLE_DATA is unset and ../shared/data
# is absent, and fail when it is set but wrong), then the openai npm client against `nibble serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --no-demo
# Two test binaries run at once on 2 cores: OpenMP threads must sleep, not spin, while waiting.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
# The reference data is asked for (tests that miss it fail) when NIBBLE_DATA is set or the default
# folder exists; only a checkout without any data skips those tests.
if [ -z "${NIBBLE_DATA:-}" ] && [ -d ../shared/data ]; then export NIBBLE_DATA="$(cd ../shared/data && pwd)"; fi
scripts/fuzz.sh "${NIBBLE_FUZZ_SECONDS:-15}"  # per target: 5 targets, 75 s in all
ctest --test-dir build --output-on-failure -j 2 --timeout 1200
# The official openai npm client against `nibble serve` (skips with a message without network).
scripts/openai_smoke.sh
