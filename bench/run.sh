#!/usr/bin/env bash
# Runs the bench against the gateway and the reference peers in one go, so every figure has a
# peer measured beside it. Builds both in release mode, starts the gateway (embedded engine,
# --dev, port 0) with the publish rate limits raised out of the way — the bench measures the
# data path, not the rate limiter; every other limit keeps its default (outbound QoS 0 buffer
# 1000, as Mosquitto's max_queued_messages) — starts the peers with ../shared/peers/start.sh,
# and passes the bench's own arguments through:
#
#   bash bench/run.sh                        # every scenario, 10 s, median of 3
#   bash bench/run.sh --duration 5s --runs 1 --scenarios qos0,fanout
#   bash bench/run.sh --scenarios durable    # confirmed persistent publishes vs RabbitMQ
#   PEERS="mosquitto rabbitmq" bash bench/run.sh --scenarios wsfanout,wsidle,wspublish,rest
#
# PEERS="mosquitto nats rabbitmq rumqttd" (default: mosquitto nats) picks the peers; rumqttd
# 0.20 (the Rust broker) is installed with cargo when missing and started here, MQTT 18841 and
# MQTT over WebSocket 18842 (configuration in start_rumqttd below).
# GATEWAY_WS=json|mqtt|both (default both) picks the gateway's WebSocket targets.
# GATEWAY_BIN=path runs another gateway binary (a before/after comparison in one session).
# BENCH_PROFILE=dev uses debug builds (the CI smoke: the tests built them already; figures
# from it mean nothing).
# ENGINE=upstream runs the gateway on the bench RabbitMQ node (AMQP 127.0.0.1:11873) instead of
# the embedded engine: with PEERS=rabbitmq the same node's own MQTT plugin is measured beside it.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${BENCH_PROFILE:-release}
cargo build --profile "$profile" --locked -p amqp-gateway -p amqp-gateway-bench --bin amqp-gateway --bin bench
bin=target/$([ "$profile" = dev ] && echo debug || echo "$profile")

work=$(mktemp -d)
gateway_pid=
cleanup() {
  [ -n "$gateway_pid" ] && kill "$gateway_pid" 2>/dev/null || true
  [ -n "${ceiling_pid:-}" ] && kill "$ceiling_pid" 2>/dev/null || true
  [ -n "${rumqttd_pid:-}" ] && kill "$rumqttd_pid" 2>/dev/null || true
  [ -n "${KEEP_LOG:-}" ] && cp "$work/out" "$KEEP_LOG"
  rm -rf "$work"
}
trap cleanup EXIT

# The raised limits and the gateway's start, shared with the other bench scripts.
source bench/lib.sh
# Both the bench and the gateway hold thousands of sockets.
ulimit -n "$(ulimit -Hn)"
# QoS 1 windows of 100 each way (defaults: 64 inbound, 32 outbound), the load generator's own
# (rumqttc's in-flight 100), rumqttd's here (max_inflight_count 100 below) and lapin's in the hop
# scenario: at QoS 1 the window over the round trip bounds the rate, so brokers compared at QoS 1
# run with the same one. With 32 out, the subscriber's window stalls it on each round trip while
# the publisher runs ahead into a queue that grows (docs/bench.md, 2026-12-03 "QoS 1").
export GATEWAY_MQTT__RECEIVE_MAXIMUM=${GATEWAY_MQTT__RECEIVE_MAXIMUM:-100} \
  GATEWAY_MQTT__MAX_INFLIGHT=${GATEWAY_MQTT__MAX_INFLIGHT:-100}
gateway_flags "$work"
gateway=("${GATEWAY_BIN:-$bin/amqp-gateway}" "${flags[@]}")
if [ "${ENGINE:-embedded}" = upstream ]; then
  bash ../shared/peers/start.sh >&2
  GATEWAY_AUTH__HS256_SECRET=$(head -c 32 /dev/urandom | base64)
  export GATEWAY_AUTH__HS256_SECRET GATEWAY_ENGINE__KIND=upstream \
    GATEWAY_ENGINE__UPSTREAM__URL="amqp://guest:guest@127.0.0.1:11873/%2f"
  RUST_LOG=warn,amqp_gateway=info "${gateway[@]}" >"$work/out" 2>"$work/err" &
  gateway_pid=$!
  token=$("${gateway[0]}" token --sub bench --scope "gateway.tag:administrator" --ttl 2h)
else
  RUST_LOG=${RUST_LOG:-warn,amqp_gateway=info} "${gateway[@]}" --dev >"$work/out" 2>"$work/err" &
  gateway_pid=$!
fi
gateway_started "$work"
[ -n "${token:-}" ] || token=$(dev_token "$work")
mqtt=$(listener "$work" mqtt)
http=$(listener "$work" http)

targets=(--target "gateway=$mqtt@$token" --pid "gateway=$gateway_pid" --gateway-http "http://$http")
# GATEWAY_WS=json or mqtt keeps one of the gateway's two WebSocket targets: idle memory is
# measured as the process's growth, so a target measured after another on the same process
# would grow into what the first one freed (bench/report.sh runs each on a fresh gateway).
case ${GATEWAY_WS:-both} in
  json | both) targets+=(--ws-target "gateway /ws JSON=json,ws://$http/ws,gateway") ;;&
  mqtt | both) targets+=(--ws-target "gateway MQTT over WS=mqtt,ws://$http/mqtt,gateway") ;;
  json) ;;
  *) echo "GATEWAY_WS is json, mqtt or both, not ${GATEWAY_WS}" >&2; exit 2 ;;
esac
amqp=$(listener "$work" amqp)
[ -n "$amqp" ] && targets+=(--gateway-amqp "amqp://bench:$token@$amqp/%2f")
# rumqttd 0.20 from crates.io, without --locked: its locked `metrics` 0.22.1 does not build on
# Rust 1.95. Its sample configuration's router and connection limits, but 20,000 connections
# and no delay between accepts (the idle scenarios open up to 15,000), on loopback ports of its own.
start_rumqttd() {
  command -v rumqttd >/dev/null || cargo install rumqttd --version 0.20.0 >&2
  cat >"$work/rumqttd.toml" <<'TOML'
id = 0
[router]
id = 0
max_connections = 20000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:18841"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 20480
    max_inflight_count = 100
    dynamic_filters = true
[ws.1]
name = "ws-1"
listen = "127.0.0.1:18842"
next_connection_delay_ms = 0
    [ws.1.connections]
    connection_timeout_ms = 60000
    max_client_id_len = 256
    throttle_delay_ms = 0
    max_payload_size = 20480
    max_inflight_count = 500
    max_inflight_size = 1024
TOML
  rumqttd --quiet --config "$work/rumqttd.toml" >"$work/rumqttd.log" 2>&1 &
  rumqttd_pid=$!
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/18841) 2>/dev/null && return
    sleep 0.1
  done
  echo "rumqttd did not start:" >&2; cat "$work/rumqttd.log" >&2; exit 1
}

peers=${PEERS-mosquitto nats}
if [ -n "$peers" ]; then
  bash ../shared/peers/start.sh >&2
  # The durable scenario's peer: the bench RabbitMQ node's durable queues with confirms.
  targets+=(--amqp "amqp://guest:guest@127.0.0.1:11873/%2f" --rabbit-http http://127.0.0.1:11872)
  for p in $peers; do
    case $p in
      mosquitto) targets+=(--target mosquitto=127.0.0.1:18831 --pid "mosquitto=$(cat /tmp/amqp-gateway-peers/mosquitto.pid)"
        --ws-target "Mosquitto MQTT over WS=mqtt,ws://127.0.0.1:18832/mqtt,mosquitto") ;;
      nats) targets+=(--target nats=127.0.0.1:11886 --pid "nats=$(cat /tmp/amqp-gateway-peers/nats.pid)") ;;
      rabbitmq) targets+=(--target rabbitmq=127.0.0.1:11885
        --pid "rabbitmq=$(rabbitmqctl -n bench@localhost eval 'list_to_integer(os:getpid()).' | tail -1)"
        --ws-target "RabbitMQ Web-MQTT=mqtt,ws://127.0.0.1:11875/ws,rabbitmq") ;;
      rumqttd) start_rumqttd
        targets+=(--target rumqttd=127.0.0.1:18841 --pid "rumqttd=$rumqttd_pid"
        --ws-target "rumqttd MQTT over WS=mqtt,ws://127.0.0.1:18842/mqtt,rumqttd") ;;
      *) echo "unknown peer $p" >&2; exit 2 ;;
    esac
  done
fi

# The rest scenario's ceiling: an axum JSON handler in a process of its own.
ceiling_pid=
if [[ " $* " == *rest* ]]; then
  "$bin/bench" --serve-ceiling 127.0.0.1:0 >"$work/ceiling" &
  ceiling_pid=$!
  for _ in $(seq 100); do
    grep -q 'listening on' "$work/ceiling" 2>/dev/null && break
    sleep 0.1
  done
  targets+=(--ceiling-http "http://$(sed -E 's/.*listening on //' "$work/ceiling")")
fi

echo "$(nproc) cores, $(date -u +%FT%TZ), gateway $(git rev-parse --short HEAD)"
"$bin/bench" "${targets[@]}" "$@"
# What the gateway did about the load: pacing, slow consumers, drops (DESIGN.md §7).
metrics=$(listener "$work" metrics)
curl -s "http://$metrics/metrics" |
  grep -E "^gateway_(publish_paced_seconds_total|slow_consumers_marked_total|deliveries_dropped_total|engine_dropped_total|refusals_total|messages_(in|out)_total)" >&2 || true
