#!/usr/bin/env bash
# Runs every benchmark scenario against every baseline in the same run, alternating
# them, and prints one table (benches/report.py): throughput, latency, and CPU per
# request of each server, its workers and the load generator. See BENCHMARKS.md.
#
#   benches/run.sh                 # all scenarios, 3 rounds of 5 s each
#   ROUNDS=5 SECONDS_PER_RUN=10 benches/run.sh
#   WORKERS=4 benches/run.sh       # pool size for pitboss, the floor and the peer
#   SKIP_PEER=1 benches/run.sh     # without the grpcio peer (no PyPI access)
#   SCENARIOS="echo-64B-c1 echo-64B-c8" benches/run.sh   # only these scenarios
#   SKIP_STARTUP=1 benches/run.sh  # without the startup and memory runs
#   SKIP_TRANSPARENT=1 benches/run.sh  # without the grpc_proxy passthrough (needs grpcio)
#   SKIP_TLS=1 benches/run.sh      # without pitboss-tls (the Bridge over TLS; needs openssl)
#   BIN=path/to/pitboss benches/run.sh   # a binary already built (no cargo build)
#
# Results: benches/results/<timestamp>/*.json and report.md.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_RUN:-5}
WARMUP=${WARMUP:-1}
WORKERS=${WORKERS:-2}
OUT=${OUT:-benches/results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/pitboss
fi
export RUST_LOG=${RUST_LOG:-warn}

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# pitboss under test.
PITBOSS_POOL_SIZE=$WORKERS "$BIN" --config benches/pitboss-bench.toml >"$OUT/pitboss.log" 2>&1 &
PB_PID=$!; pids+=($PB_PID)
# The gRPC ceiling.
"$BIN" bench ceiling --listen 127.0.0.1:50161 >"$OUT/ceiling.log" 2>&1 &
CEILING_PID=$!; pids+=($CEILING_PID)
# The grpcio + ProcessPoolExecutor peer.
PEER=""
if [ -z "${SKIP_PEER:-}" ]; then
  PY=$(bash benches/peers/setup.sh | tail -1)
  "$PY" benches/peers/grpcio_peer.py --port 50171 --workers "$WORKERS" --adapter demo:adapter \
    --python-path python --python-path python/examples >"$OUT/peer.log" 2>&1 &
  PEER_PID=$!; pids+=($PEER_PID)
  PEER=http://127.0.0.1:50171
fi

# pitboss-tls: the same pitboss with TLS on the Bridge ([tls.bridge], a CA and a
# server certificate made here with openssl), measured against the plaintext one in
# the same rounds: report.py gives the TLS / plaintext ratios.
TLS=""
if [ -z "${SKIP_TLS:-}" ] && command -v openssl >/dev/null; then
  # Absolute: paths in the config (and its overrides) are relative to the config file.
  mkdir -p "$OUT/tls"; TLS_DIR=$(cd "$OUT/tls" && pwd)
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -days 2 -subj "/CN=pitboss bench ca" \
    -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.crt" 2>/dev/null
  openssl req "${ec[@]}" -subj "/CN=localhost" -keyout "$TLS_DIR/tls.key" -out "$TLS_DIR/tls.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$TLS_DIR/ext"
  openssl x509 -req -in "$TLS_DIR/tls.csr" -CA "$TLS_DIR/ca.crt" -CAkey "$TLS_DIR/ca.key" \
    -CAcreateserial -days 2 -extfile "$TLS_DIR/ext" -out "$TLS_DIR/tls.crt" 2>/dev/null
  PITBOSS_POOL_SIZE=$WORKERS PITBOSS_SERVER_LISTEN=127.0.0.1:50181 \
    PITBOSS_SERVER_ADMIN_LISTEN=127.0.0.1:50182 PITBOSS_SERVER_METRICS_LISTEN=127.0.0.1:50183 \
    PITBOSS_TLS_BRIDGE_CERT_FILE="$TLS_DIR/tls.crt" PITBOSS_TLS_BRIDGE_KEY_FILE="$TLS_DIR/tls.key" \
    "$BIN" --config benches/pitboss-bench.toml >"$OUT/pitboss-tls.log" 2>&1 &
  TLS_PID=$!; pids+=($TLS_PID)
  TLS=(--addr https://127.0.0.1:50181 --ca "$TLS_DIR/ca.crt")
fi

wait_serving() { # load arguments that name the server
  for _ in $(seq 1 100); do
    if "$BIN" bench load "$@" --requests 1 --warmup-s 0 --concurrency 1 >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "no answer from $*" >&2; return 1
}
wait_serving --addr http://127.0.0.1:50151
wait_serving --addr http://127.0.0.1:50161
[ -n "$PEER" ] && wait_serving --addr "$PEER"
[ -n "$TLS" ] && wait_serving "${TLS[@]}"

# scenario name | load arguments
scenarios=(
  "echo-64B-c1|--command echo --payload-size 64 --concurrency 1"
  "echo-64B-c8|--command echo --payload-size 64 --concurrency 8"
  "echo-64KiB-c8|--command echo --payload-size 65536 --concurrency 8"
  "compute-c8|--command compute --payload {\"n\":10000} --concurrency 8"
  "sessions-1000-c8|--command counter --payload {} --sessions 1000 --concurrency 8"
  "stream-100-c4|--command stream --payload {\"n\":100} --stream --concurrency 4"
)

targets=(floor pitboss ceiling)
[ -n "$PEER" ] && targets+=(peer)
[ -n "$TLS" ] && targets+=(pitboss-tls)

for round in $(seq 1 "$ROUNDS"); do
  for sc in "${scenarios[@]}"; do
    name=${sc%%|*}; args=${sc#*|}
    if [ -n "${SCENARIOS:-}" ] && [[ " $SCENARIOS " != *" $name "* ]]; then continue; fi
    # Alternate the order each round so no target always runs first (or last).
    order=("${targets[@]}")
    if [ $((round % 2)) -eq 0 ]; then order=($(printf '%s\n' "${targets[@]}" | tac)); fi
    for t in "${order[@]}"; do
      case $t in
        # --cpu-pid: the server whose CPU (and its workers') is read from /proc.
        floor)   where=(--floor --workers "$WORKERS" --config benches/pitboss-bench.toml) ;;
        pitboss) where=(--addr http://127.0.0.1:50151 --cpu-pid "$PB_PID") ;;
        ceiling) where=(--addr http://127.0.0.1:50161 --cpu-pid "$CEILING_PID") ;;
        peer)    where=(--addr "$PEER" --cpu-pid "$PEER_PID") ;;
        pitboss-tls) where=("${TLS[@]}" --cpu-pid "$TLS_PID") ;;
      esac
      # The ceiling has no Python: it only makes sense for echo-like scenarios.
      if [ "$t" = ceiling ] && [[ $name == compute* ]]; then continue; fi
      # TLS costs per byte and per call: the echo scenarios show both.
      if [ "$t" = pitboss-tls ] && [[ $name != echo* ]]; then continue; fi
      # shellcheck disable=SC2086
      "$BIN" bench load "${where[@]}" $args --duration-s "$SECS" --warmup-s "$WARMUP" \
        --name "$t" --json "$OUT/$name.$t.$round.json" | sed "s/^/[$name r$round] /"
    done
  done
done

# Issue 17: the transparent passthrough at c=1. The grpcio calculator of
# python/examples/calculator called directly ("direct") and through a pitboss whose
# legacy is a grpc_proxy in front of it ("pitboss"), and through the passthrough
# ceiling (`pitboss bench proxy-ceiling`: a bare hyper proxy over the same upstream
# connection, "proxy"), with the same raw Add request, rotating the order, by the same
# Rust load generator (a grpcio client would measure mostly Python).
# SKIP_TRANSPARENT=1 leaves it out.
T_NAME=transparent-add-c1
if [ -z "${SKIP_TRANSPARENT:-}" ] && { [ -z "${SCENARIOS:-}" ] || [[ " $SCENARIOS " == *" $T_NAME "* ]]; }; then
  TPY=${PY:-$(bash benches/peers/setup.sh | tail -1)}
  GEN=benches/results/calc-gen
  mkdir -p "$GEN"
  "$TPY" -m grpc_tools.protoc -I python/examples/calculator --python_out="$GEN" \
    --grpc_python_out="$GEN" --include_imports --descriptor_set_out="$GEN/calc.pb" calc.proto
  PYTHONPATH="$GEN" "$TPY" python/examples/calculator/legacy_server.py 50201 >"$OUT/calc-legacy.log" 2>&1 &
  CALC_PID=$!; pids+=($CALC_PID)
  "$BIN" --config benches/pitboss-transparent.toml >"$OUT/pitboss-transparent.log" 2>&1 &
  PT_PID=$!; pids+=($PT_PID)
  "$BIN" bench proxy-ceiling --listen 127.0.0.1:50221 --upstream http://127.0.0.1:50201 \
    >"$OUT/proxy-ceiling.log" 2>&1 &
  PC_PID=$!; pids+=($PC_PID)
  # AddRequest{a: 2, b: 3}.
  add=(--method /calc.Calculator/Add --payload-hex 08021003 --concurrency 1)
  for addr in http://127.0.0.1:50201 http://127.0.0.1:50211 http://127.0.0.1:50221; do
    up=""
    for _ in $(seq 1 100); do
      if "$BIN" bench load --addr "$addr" "${add[@]}" --requests 1 --warmup-s 0 2>&1 | grep -q " 0 errors"; then up=1; break; fi
      sleep 0.2
    done
    [ -n "$up" ] || { echo "no answer from $addr (see $OUT/calc-legacy.log, $OUT/pitboss-transparent.log)" >&2; exit 1; }
  done
  for round in $(seq 1 "$ROUNDS"); do
    case $((round % 3)) in
      1) order=(direct pitboss proxy) ;;
      2) order=(pitboss proxy direct) ;;
      0) order=(proxy direct pitboss) ;;
    esac
    for t in "${order[@]}"; do
      case $t in
        direct)  where=(--addr http://127.0.0.1:50201 --cpu-pid "$CALC_PID") ;;
        pitboss) where=(--addr http://127.0.0.1:50211 --cpu-pid "$PT_PID") ;;
        proxy)   where=(--addr http://127.0.0.1:50221 --cpu-pid "$PC_PID") ;;
      esac
      "$BIN" bench load "${where[@]}" "${add[@]}" --duration-s "$SECS" --warmup-s "$WARMUP" \
        --name "$t" --json "$OUT/$T_NAME.$t.$round.json" | sed "s/^/[$T_NAME r$round] /"
    done
  done
fi

# Startup and memory.
if [ -z "${SKIP_STARTUP:-}" ]; then
  for n in 1 4 8; do
    "$BIN" --config benches/pitboss-bench.toml bench startup --workers "$n" --runs 5 --json "$OUT/startup.$n.json"
  done
  "$BIN" bench sessions --addr http://127.0.0.1:50151 --pid "$PB_PID" --sessions 100000 --json "$OUT/rss.json"
fi

python3 benches/report.py "$OUT" | tee "$OUT/report.md"
