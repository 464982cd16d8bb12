#!/usr/bin/env bash
# Instructions per delivered message, under valgrind's callgrind: a figure that repeats where
# throughput moves 20 % between runs of one binary and the VM has no hardware counters.
#
#   bash bench/callgrind.sh                      # qos0,qos1,fanout,fanin on target/release
#   GATEWAY_BIN=/tmp/gw-before bash bench/callgrind.sh qos0
#   bash bench/callgrind.sh amqp                 # the AMQP listener (RabbitMQ at AMQP_PEER times too)
#   NO_BUILD=1 GATEWAY_BIN=/tmp/gw-x bash …      # profile a copied build while sources change
#
# Starts the gateway (embedded engine, --dev, the bench's raised publish limits) under
# callgrind with instrumentation off, switches it on once the gateway listens, runs one bench
# scenario for DURATION (default 3s) against it, dumps, and divides the instructions counted
# by the messages the gateway delivered meanwhile (`gateway_messages_out_total`). Connection
# setup is inside the window; at tens of thousands of messages per run it is noise. Under
# valgrind the gateway runs on one core at a fraction of its speed, so batching differs from
# a real run: compare binaries with this, not with the bench's throughput. The profiles stay
# in $OUT (default /tmp/amqp-gateway-callgrind) for `callgrind_annotate`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
[ -n "${NO_BUILD:-}" ] ||
  cargo build --release --locked -p amqp-gateway -p amqp-gateway-bench --bin amqp-gateway --bin bench
bin=${GATEWAY_BIN:-target/release/amqp-gateway}
out=${OUT:-/tmp/amqp-gateway-callgrind}
mkdir -p "$out"
source bench/lib.sh

metric() { # sum of a counter's series
  curl -s "http://$1/metrics" | awk -v m="$2" 'index($0, m) == 1 { s += $NF } END { print s + 0 }'
}

for scenario in ${@:-qos0 qos1 fanout fanin}; do
  work=$(mktemp -d)
  file="$out/$scenario.$(date +%s)"
  gateway_flags "$work"
  RUST_LOG=warn,amqp_gateway=info valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$file" "$bin" "${flags[@]}" --dev >"$work/out" 2>"$work/err" &
  pid=$!
  gateway_started "$work" 600
  token=$(dev_token "$work")
  mqtt=$(listener "$work" mqtt)
  metrics=$(listener "$work" metrics)
  extra=()
  if [ "$scenario" = amqp ]; then
    # The AMQP listener, 1→1 with lapin; the scenario also times RabbitMQ direct (the test
    # node here), while the gateway idles.
    extra=(--gateway-amqp "amqp://bench:$token@$(listener "$work" amqp)/%2f"
      --amqp "${AMQP_PEER:-amqp://guest:guest@127.0.0.1:5672/%2f}")
  fi
  callgrind_control -i on "$pid" >/dev/null 2>&1
  target/release/bench --target "gateway=$mqtt@$token" --scenarios "$scenario" "${extra[@]}" \
    --duration "${DURATION:-3s}" --runs 1 >/dev/null
  callgrind_control -i off "$pid" >/dev/null 2>&1
  delivered=$(metric "$metrics" gateway_messages_out_total)
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  total=$(callgrind_annotate "$file.1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !n++ { gsub(",", "", $1); print $1 }')
  echo "$scenario: $delivered delivered, $((total / delivered)) instructions per delivered message ($file.1)"
  rm -rf "$work"
done
