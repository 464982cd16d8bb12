#!/usr/bin/env bash
# The gateway's CPU per delivered message split into user and system time, with its resident
# memory and queued messages each second: what a throughput run's single "µs CPU" hides (a
# backlog growing behind a QoS 1 subscriber shows as page faults in system time and as RSS).
#
#   bash bench/cpu-split.sh qos1                             # target/release, after a build
#   NO_BUILD=1 GATEWAY_BIN=/tmp/gw-x/amqp-gateway bash bench/cpu-split.sh qos0 qos1 fanin
#   PIN=1 bash bench/cpu-split.sh qos0 qos1      # the gateway on CPU 0, the load generator on CPU 1
#
# Per scenario: the gateway started as bench/run.sh starts it (the same raised limits and QoS 1
# windows of 100), one `bench` run of DURATION (default 6s) against it, the utime/stime
# (/proc/PID/stat) of the gateway and of the load generator, the delivered count and the
# machine's busy share (/proc/stat) read two seconds in and three seconds later.
# The bench client shares the machine's cores: compare builds run interleaved, not figures
# from different sessions. The load generator's own CPU per message is printed beside the
# gateway's because on two shared cores it decides the rate as much as the gateway does; with
# PIN=1 each has a core of its own, and whichever core is full is the bound (docs/bench.md,
# 2026-12-06, "what bounds QoS 1").
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] ||
  cargo build --release --locked -p amqp-gateway -p amqp-gateway-bench --bin amqp-gateway --bin bench
bin=${GATEWAY_BIN:-target/release/amqp-gateway}
source bench/lib.sh
export GATEWAY_MQTT__RECEIVE_MAXIMUM=${GATEWAY_MQTT__RECEIVE_MAXIMUM:-100} \
  GATEWAY_MQTT__MAX_INFLIGHT=${GATEWAY_MQTT__MAX_INFLIGHT:-100}
tick=$(getconf CLK_TCK)
# With PIN set, the commands that put the gateway on CPU 0 and the load generator on CPU 1
# (taskset execs its command, so `$!` stays the process whose times are read).
gateway_cpu=() load_cpu=()
[ -z "${PIN:-}" ] || gateway_cpu=(taskset -c 0) load_cpu=(taskset -c 1)

scenarios=("$@")
[ $# -gt 0 ] || scenarios=(qos0 qos1)
for scenario in "${scenarios[@]}"; do
  work=$(mktemp -d)
  gateway_flags "$work"
  RUST_LOG=warn,amqp_gateway=info "${gateway_cpu[@]}" "$bin" "${flags[@]}" --dev >"$work/out" 2>"$work/err" &
  pid=$!
  gateway_started "$work"
  token=$(dev_token "$work")
  mqtt=$(listener "$work" mqtt)
  metrics=$(listener "$work" metrics)
  sum() { curl -s "http://$metrics/metrics" | awk -v m="$1" 'index($0, m) == 1 { s += $NF } END { print s + 0 }'; }
  times() { awk '{ print $14, $15 }' "/proc/$1/stat"; }
  # Idle and total jiffies of the whole machine.
  machine() { awk '$1 == "cpu" { print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' /proc/stat; }
  # System calls and context switches over the three seconds, where perf can count them.
  window() {
    if perf stat -x, -e raw_syscalls:sys_enter,context-switches -o "$work/perf" -p "$pid" \
      -- sleep 3 2>/dev/null; then
      awk -F, '$3 == "raw_syscalls:sys_enter" { c = $1 } $3 == "context-switches" { x = $1 }
        END { print c + 0, x + 0 }' "$work/perf"
    else
      sleep 3
      echo - -
    fi
  }
  (
    for _ in 1 2 3 4 5 6; do
      echo "  $(grep VmRSS "/proc/$pid/status" | tr -s ' \t' ' '), queued $(sum gateway_queued_messages)"
      sleep 1
    done
  ) &
  watcher=$!
  "${load_cpu[@]}" target/release/bench --target "gateway=$mqtt@$token" --scenarios "$scenario" \
    --duration "${DURATION:-6s}" --runs 1 >"$work/bench" &
  load=$!
  (
    sleep 2
    d0=$(sum gateway_messages_out_total)
    read -r u0 s0 < <(times "$pid")
    read -r lu0 ls0 < <(times "$load")
    read -r i0 t0 < <(machine)
    read -r c x < <(window)
    d1=$(sum gateway_messages_out_total)
    read -r u1 s1 < <(times "$pid")
    read -r lu1 ls1 < <(times "$load")
    read -r i1 t1 < <(machine)
    n=$((d1 - d0))
    awk -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$tick" -v sc="$scenario" \
      -v c="$c" -v x="$x" -v lu=$((lu1 - lu0)) -v ls=$((ls1 - ls0)) \
      -v busy="$(((t1 - t0 - i1 + i0) * 100 / (t1 - t0)))" 'BEGIN {
      printf "%s: %d delivered in 3 s, %.2f µs user + %.2f µs system per delivered message,", \
        sc, n, u * 1e6 / t / n, s * 1e6 / t / n
      if (c != "-") printf " %.2f system calls and %.3f context switches each,", c / n, x / n
      printf " load generator %.2f µs user + %.2f µs system, machine %d %% busy\n", \
        lu * 1e6 / t / n, ls * 1e6 / t / n, busy }'
  ) &
  sampler=$!
  wait "$load"
  grep '^| ' "$work/bench" | tail -1
  wait "$sampler" "$watcher"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  rm -rf "$work"
done
