#!/usr/bin/env bash
# What one more idle MQTT connection holds on the gateway's heap, by where it was allocated:
# heaptrack on a gateway built with the system allocator (feature `system-allocator`: heaptrack
# sees only malloc), once with N and once with 2N idle connections (the bench's idle scenario:
# one QoS 1 subscription each); the peak heap of the two runs is subtracted site by site and
# divided by N, so startup and what grows with the whole (maps, tables) cancel out.
#
#   bash bench/idle-heap.sh                # N=1000, the 30 largest sites
#   N=2000 TOP=50 bash bench/idle-heap.sh
#   SCENARIO=wsidle bash bench/idle-heap.sh  # idle `/ws` JSON subscribers instead
#   SCENARIO=mqttwsidle bash bench/idle-heap.sh  # idle MQTT-over-WebSocket subscribers
#   DEPTH=8 bash bench/idle-heap.sh        # name each site by 8 frames, not 3
#   CARGO_TARGET_DIR=/tmp/heap bash bench/idle-heap.sh  # leave target/release's mimalloc build be
#
# Requested bytes only: the allocator's own overhead and its size classes are not in them
# (bench idle, on the shipped mimalloc build, measures what the process grows by). Peaks, not
# a snapshot: a site busy at one run's peak and not at the other's (a connection mid-handshake)
# shows as a few hundred bytes either way, a negative row among them.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v heaptrack >/dev/null || { apt-get update -qq && apt-get install -y -qq heaptrack >/dev/null; }
command -v rustfilt >/dev/null || cargo install rustfilt --version 0.2.2
cargo build --release --locked --features system-allocator --bin amqp-gateway
cargo build --release --locked -p amqp-gateway-bench --bin bench
source bench/lib.sh
release=${CARGO_TARGET_DIR:-target}/release
n=${N:-1000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# profile COUNT: heaptrack's peak heap by stack while COUNT idle connections are open, in
# flamegraph form, to $work/COUNT.txt.
profile() {
  local dir=$work/$1 pid= p
  mkdir -p "$dir"
  gateway_flags "$dir"
  heaptrack -o "$dir/heap" "$release/amqp-gateway" "${flags[@]}" --dev >"$dir/out" 2>"$dir/err" &
  local tracer=$!
  gateway_started "$dir" 300
  for p in $(pgrep -x amqp-gateway); do
    grep -qa -- "$dir" "/proc/$p/cmdline" && pid=$p
  done
  local load=(--scenarios idle)
  [ "${SCENARIO:-idle}" = wsidle ] &&
    load=(--scenarios wsidle --ws-target "gateway /ws JSON=json,ws://$(listener "$dir" http)/ws,gateway")
  [ "${SCENARIO:-idle}" = mqttwsidle ] &&
    load=(--scenarios wsidle --ws-target "gateway MQTT over WS=mqtt,ws://$(listener "$dir" http)/mqtt,gateway")
  "$release/bench" --target "gateway=$(listener "$dir" mqtt)@$(dev_token "$dir")" \
    --pid "gateway=$pid" "${load[@]}" --idle-connections "$1" --runs 1 >/dev/null
  kill -TERM "$pid"
  wait "$tracer" || true
  heaptrack_print -f "$dir"/heap*.zst -a 0 -T 0 -p 0 --flamegraph-cost-type peak \
    -F "$work/$1.txt" >/dev/null
}

profile "$n"
profile $((2 * n))
python3 - "$work/$n.txt" "$work/$((2 * n)).txt" "$n" "${TOP:-30}" "${DEPTH:-3}" <<'PY'
import collections, re, subprocess, sys

# Frames of the allocator, collections and the runtime's plumbing: a site is named by the
# innermost DEPTH frames outside them.
PLUMBING = re.compile(r'\((alloc|boxed|raw_vec|unix|sync|rc|spec_from_elem|spec_extend|spec_from_iter'
                      r'|spec_from_iter_nested|string|vec|raw|borrow|clone|slice|str|function|option'
                      r'|result|iterator|into_iter|harness|core|unsafe_cell|panicking|panic'
                      r'|unwind_safe|task_tracker|malloc|mod|node|map|entry|rustc_entry|set|lib|mem'
                      r'|bytes_mut)\.(rs|c)\)')

def sites(path, depth):
    text = subprocess.run(["rustfilt"], input=open(path).read(), capture_output=True, text=True).stdout
    total = collections.Counter()
    for line in text.splitlines():
        stack, _, size = line.rpartition(' ')
        frames = [re.sub(r'\[[0-9a-f]+\]', '', f) for f in stack.split(';') if f]
        i = len(frames) - 1
        while i > 0 and PLUMBING.search(frames[i]):
            i -= 1
        total[' < '.join(f[:70] for f in reversed(frames[max(0, i - depth + 1):i + 1]))] += int(size)
    return total

depth = int(sys.argv[5])
one, two = sites(sys.argv[1], depth), sites(sys.argv[2], depth)
n, top = int(sys.argv[3]), int(sys.argv[4])
grown = {k: two[k] - one[k] for k in set(one) | set(two)}
print(f"{sum(grown.values()) / n:.0f} bytes of heap per idle connection; the largest sites:")
for site, size in sorted(grown.items(), key=lambda kv: -abs(kv[1]))[:top]:
    print(f"{size / n:7.0f}  {site}")
PY
