#!/usr/bin/env bash
# Memory per queued message: the gateway's RSS before and after N MQTT QoS 1 publishes of 64
# bytes (mosquitto_pub -l, three gateway headers each) pile up in a transient queue bound to
# amq.topic with no consumer, divided by the messages the queue holds then.
#
#   bash bench/queued-memory.sh                      # 30,000 messages, target/release
#   GATEWAY_BIN=/tmp/gw-before N=30000 bash bench/queued-memory.sh
#
# A backlog is what a slow QoS 1 subscriber leaves; the memory watermark charges each message
# its body plus an estimate of the rest (engine::embedded::held_size), which this measures.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mosquitto_pub >/dev/null || { apt-get update -qq && apt-get install -y -qq mosquitto-clients >/dev/null; }
[ -n "${GATEWAY_BIN:-}" ] || cargo build --release --locked -p amqp-gateway --bin amqp-gateway
bin=${GATEWAY_BIN:-target/release/amqp-gateway}
n=${N:-30000}
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT

source bench/lib.sh
gateway_flags "$work"
"$bin" "${flags[@]}" --dev >"$work/out" 2>"$work/err" &
pid=$!
gateway_started "$work"
token=$(dev_token "$work")
mqtt_port=$(listener "$work" mqtt)
mqtt_port=${mqtt_port##*:}
http=$(listener "$work" http)
auth="Authorization: Bearer $token"
json='content-type: application/json'
curl -sf -X PUT -H "$auth" -H "$json" "http://$http/v1/queues/backlog" -d '{"durable":false}' >/dev/null
curl -sf -X POST -H "$auth" -H "$json" "http://$http/v1/queues/backlog/bindings" \
  -d '{"exchange":"amq.topic","routing_key":"backlog.x"}' >/dev/null
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
queued() { curl -s -H "$auth" "http://$http/v1/queues/backlog" | sed -E 's/.*"messages":([0-9]+).*/\1/'; }

before=$(rss)
seq "$n" | awk '{printf "%064d\n", $1}' |
  timeout 300 mosquitto_pub -p "$mqtt_port" -u bench -P "$token" -l -q 1 -t backlog/x
for _ in $(seq 120); do
  [ "$(queued)" = "$n" ] && break
  sleep 0.5
done
held=$(queued)
after=$(rss)
echo "$bin: $held messages queued, RSS $before -> $after KiB: $(((after - before) * 1024 / held)) bytes per queued message"
