#!/usr/bin/env bash
# Where an idle MQTT connection's resident memory is: the bench's idle scenario (N connections,
# one QoS 1 subscription each) against one gateway, and the gateway's /proc status and
# smaps_rollup read once all N are connected — RSS, anonymous memory, transparent huge pages.
#
#   bash bench/idle-rss.sh                                   # target/release, N=15000
#   GATEWAY_BIN=/tmp/gw-X/amqp-gateway N=5000 bash bench/idle-rss.sh
#   MIMALLOC_ALLOW_THP=1 bash bench/idle-rss.sh              # env reaches the gateway
#   NO_BUILD=1 GATEWAY_BIN=/tmp/gw-X/amqp-gateway bash …     # a copied build, the tree not built
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] ||
  cargo build --release --locked -p amqp-gateway -p amqp-gateway-bench --bin amqp-gateway --bin bench
source bench/lib.sh
bin=${GATEWAY_BIN:-target/release/amqp-gateway}
n=${N:-15000}
work=$(mktemp -d)
gateway_flags "$work"
"$bin" "${flags[@]}" --dev >"$work/out" 2>"$work/err" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; rm -rf "$work"' EXIT
gateway_started "$work" 300
echo "at start: $(grep -E "VmRSS|RssAnon" /proc/$pid/status | tr -s " \t\n" " ")"
ulimit -n 20000
target/release/bench --target "gateway=$(listener "$work" mqtt)@$(dev_token "$work")" \
  --pid "gateway=$pid" --scenarios idle --idle-connections "$n" --runs 1 >"$work/bench" 2>&1 &
load=$!
metrics=$(listener "$work" metrics)
while kill -0 "$load" 2>/dev/null; do
  open=$(curl -s "http://$metrics/metrics" |
    awk '/^gateway_connections_open/ { s += $NF } END { printf "%d", s }')
  if [ "$open" -ge "$n" ]; then
    echo "at $open connections:"
    grep -E "VmRSS|RssAnon|THP_enabled" "/proc/$pid/status"
    grep -E "AnonHugePages" "/proc/$pid/smaps_rollup"
    break
  fi
  sleep 0.5
done
wait "$load"
grep "^| idle" "$work/bench"
