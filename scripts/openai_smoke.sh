#!/usr/bin/env bash
# The official `openai` npm client against `nibble serve` on stories260K (scripts/openai_smoke.mjs).
# Skips with a message when npm cannot install the package (no network) or the data is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
data="${NIBBLE_DATA:-../shared/data}/models/stories260K"
if [ ! -f "$data/model.safetensors" ]; then echo "openai smoke: skipped (no $data)"; exit 0; fi
tmp="$(mktemp -d)"
server=""
cleanup() { if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi; rm -rf "$tmp"; }
trap cleanup EXIT
if ! timeout 180 npm install --prefix "$tmp" --no-audit --no-fund --silent openai >"$tmp/npm.log" 2>&1; then
  echo "openai smoke: skipped (npm could not install the openai package: no network?)"; tail -3 "$tmp/npm.log"; exit 0
fi
build/bin/nibble serve -m "$data" --device cpu --port 0 --api-key smoke-key --chat-template llama-2 -t 1 2>"$tmp/serve.log" &
server=$!
for _ in $(seq 100); do
  url="$(grep -o 'http://[0-9.]*:[0-9]*' "$tmp/serve.log" || true)"
  [ -n "$url" ] && break
  sleep 0.1
done
[ -n "$url" ] || { echo "openai smoke: the server did not start"; cat "$tmp/serve.log"; exit 1; }
cp scripts/openai_smoke.mjs "$tmp/"  # an ES module finds packages next to itself
timeout 120 node "$tmp/openai_smoke.mjs" "$url"
