#!/usr/bin/env bash
# Run THERE (the device), from the repo root, after `. scripts/device_unpack.sh` (programs packed
# here by scripts/device_pack.sh). Runs the packed GPU tests and the issue-13 decode-step table in
# one call, logs and tables into $OUT:
#   scripts/device_measure.sh tests                          every packed gpu_test_* (fixtures from this checkout)
#   scripts/device_measure.sh decode LIKE RECIPES [BATCHES] [CTXS]
#        e.g. decode llama-2-7b fp16,w8a8,atom-w4a4 1,16,64,256 512,2048
#        (fp16 runs bench_decode_step's in-memory random model; the others a `nibble synth` file;
#        LAYERS=N cuts the model to N layers: a 70B W8A8 file is larger than the device's disk)
#   scripts/device_measure.sh engine LIKE RECIPES N [BENCH ARGS...]
#        e.g. engine llama-2-7b fp16,w8a8,atom-w4a4 200 --gpu-mem-gb 24: `nibble bench --dist atom` with N
#        requests on each recipe's synth model (issue 14's table), one JSON per recipe
#   scripts/device_measure.sh serve LIKE RECIPES N RATES [ARGS...]
#        e.g. serve llama-2-7b fp16,atom-w4a4 200 4,0: `nibble serve --device cuda` swept by `nibble bench-serve`
#        at RATES, then `nibble bench` (offline) with the same load at OFFLINE_RATES (default RATES; empty: none),
#        one JSON each (issue 15's table)
#   KEEP=1 keeps the synth files for a later mode of the same call (the disk holds 64 GB).
#   Llama-2 shapes get .devdata/data/tokenizers/llama2 in their synth file when it is carried (serve needs one).
#   scripts/device_measure.sh peer                           ../shared/peers/torch_decode.py, carried in .devdata/peers
# Each step has its own time limit (STEP_TIMEOUT, default 150 s) so one slow row cannot eat a call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/nibble-out}
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
# Where synth files go: /tmp (disk) by default; SYNTH_DIR=/dev/shm keeps a 70B file (35 GB) in RAM.
SYNTH_DIR=${SYNTH_DIR:-/tmp}
mkdir -p "$OUT"
# synth LIKE RECIPE [LAYERS]: the model's path (made once; fp16 is a Hugging Face directory).
synth() {
  local like=$1 r=$2 path=$SYNTH_DIR/$1-$2${3:+-l$3}.nibble
  if [ ! -e "$path" ]; then
    local tok=.devdata/data/tokenizers/llama2
    [[ "$like" == llama-2-* && -d $tok ]] || tok=
    timeout "$STEP_TIMEOUT" nibble synth --like "$like" --recipe "$r" ${3:+--layers "$3"} ${tok:+--tokenizer "$tok"} \
      -o "$path" >/dev/null 2>&1 ||
      { rm -rf "$path"; return 1; }
  fi
  echo "$path"
}
# summarize FILE LABEL: one line per rate of a bench / bench-serve JSON.
summarize() {
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d=d if isinstance(d,list) else [d]
for x in d: print(sys.argv[2], *(f'{k}={x.get(k)}' for k in ('rate','completed','errors','output_tokens_per_s','tpot_mean_ms','tpot_p50_ms','ttft_p50_ms','itl_p50_ms','preemptions','peak_pages','kv_pages','mean_batch','steps','forward_s','schedule_s','sample_and_stream_s','duration_s') if k in x))" "$1" "$2"
}
export NIBBLE_REQUIRE_GPU=1 NIBBLE_SOURCE_DIR=$PWD
[ -d .devdata/data ] && export NIBBLE_DATA=$PWD/.devdata/data
what=${1:-tests}
shift || true
status=0
case "$what" in
  tests)
    for t in $(ls /tmp/nibble-pack/bin | grep '^gpu_test_'); do
      timeout "$STEP_TIMEOUT" "$t" >"$OUT/$t.log" 2>&1 || status=1
      echo "== $t: $(grep -cE '^\[       OK \]' "$OUT/$t.log") ok, $(grep -cE '^\[  FAILED  \] [A-Za-z]' "$OUT/$t.log") failed"
      grep -E "^\[  FAILED  \] [A-Za-z]|run seed" "$OUT/$t.log" | head -8
    done ;;
  decode)
    like=${1:?LIKE}; recipes=${2:-fp16,atom-w4a4}; batches=${3:-1,16,64,256}; ctxs=${4:-512}
    for r in ${recipes//,/ }; do
      args=(--like "$like" ${LAYERS:+--layers "$LAYERS"})
      if [ "$r" != fp16 ]; then
        path=$(synth "$like" "$r" "${LAYERS:-}") || { echo "synth $like $r failed"; status=1; continue; }
        args=(-m "$path")
      fi
      timeout "$STEP_TIMEOUT" bench_decode_step "${args[@]}" --batch "$batches" --ctx "$ctxs" --steps 20 \
        >"$OUT/decode-$like-$r.md" 2>"$OUT/decode-$like-$r.err" || status=1
      cat "$OUT/decode-$like-$r.md"
      [ -n "${KEEP:-}" ] || rm -rf "$SYNTH_DIR/$like-$r"*.nibble
    done ;;
  engine)
    like=${1:?LIKE}; recipes=${2:-fp16,w8a8,atom-w4a4}; n=${3:-200}; shift 3 || true
    for r in ${recipes//,/ }; do
      path=$(synth "$like" "$r" "${LAYERS:-}") || { echo "synth $like $r failed"; status=1; continue; }
      timeout "$STEP_TIMEOUT" nibble bench -m "$path" --dist atom --num-prompts "$n" --device cuda "$@" --json \
        >"$OUT/engine-$like-$r.json" 2>"$OUT/engine-$like-$r.err" || status=1
      summarize "$OUT/engine-$like-$r.json" "engine $like $r $*" || tail -3 "$OUT/engine-$like-$r.err"
      [ -n "${KEEP:-}" ] || rm -rf "$SYNTH_DIR/$like-$r"*.nibble
    done ;;
  serve)
    like=${1:?LIKE}; recipes=${2:-fp16,atom-w4a4}; n=${3:-200}; rates=${4:-0}; shift 4 || true
    offline_rates=${OFFLINE_RATES-$rates}  # OFFLINE_RATES= (empty) skips the offline runs
    for r in ${recipes//,/ }; do
      path=$(synth "$like" "$r" "${LAYERS:-}") || { echo "synth $like $r failed"; status=1; continue; }
      tag=$like-$r port=18080
      # As many HTTP threads as requests in flight, so that the server (not its thread pool) sets the batch.
      nibble serve -m "$path" --device cuda --port $port --http-threads 1024 --max-queue 4096 "$@" \
        >"$OUT/serve-$tag.log" 2>&1 &
      server=$!
      for _ in $(seq "$STEP_TIMEOUT"); do
        python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null && break
        kill -0 $server 2>/dev/null || break
        sleep 1
      done
      timeout "$STEP_TIMEOUT" nibble bench-serve --url http://127.0.0.1:$port --dist atom --num-prompts "$n" \
        --rates "$rates" --json >"$OUT/serve-$tag.json" 2>"$OUT/serve-$tag.err" || status=1
      kill -TERM $server; wait $server
      summarize "$OUT/serve-$tag.json" "http $tag" || tail -3 "$OUT/serve-$tag.err" "$OUT/serve-$tag.log"
      if [ -n "$offline_rates" ]; then
        timeout "$STEP_TIMEOUT" nibble bench -m "$path" --dist atom --num-prompts "$n" --rates "$offline_rates" --device cuda \
          "$@" --json >"$OUT/offline-$tag.json" 2>"$OUT/offline-$tag.err" || status=1
        summarize "$OUT/offline-$tag.json" "offline $tag" || tail -3 "$OUT/offline-$tag.err"
      fi
      [ -n "${KEEP:-}" ] || rm -rf "$SYNTH_DIR/$like-$r"*.nibble
    done ;;
  peer)
    timeout "$STEP_TIMEOUT" python3 .devdata/peers/torch_decode.py >"$OUT/peer.txt" 2>&1 || status=1
    python3 - "$OUT/peer_decode.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d.get("graph_decode_step", []):
    print(f"torch {r['model']} {r['kind']} batch {r['batch']} ctx {r['context']}: {r['ms_per_step']} ms")
PY
    ;;
  *) echo "unknown mode '$what' (tests, decode, engine, serve, peer)"; exit 2 ;;
esac
exit $status
