# Sourced by the bench scripts (run.sh, callgrind.sh, queued-memory.sh): the gateway as they all
# start it, and where it listens.

# The publish rate limits raised out of the way — the bench measures the data path, not the
# rate limiter — and the per-subject connection limit (1000): every bench client is one
# subject, and the 1,000-subscriber scenarios would meet it. Every other limit keeps its default.
export GATEWAY_LIMITS__PUBLISH_RATE=1000000000 GATEWAY_LIMITS__PUBLISH_BURST=1000000000 \
  GATEWAY_LIMITS__SUBJECT_PUBLISH_RATE=1000000000 GATEWAY_LIMITS__PUBLISH_BYTES_RATE=1TiB \
  GATEWAY_LIMITS__MAX_CONNECTIONS_PER_SUBJECT=100000

# gateway_flags DIR: sets the array `flags` to what every bench gateway runs with: its data in
# DIR, JSON logs (which gateway_started and listener read), every listener on a loopback port of
# its own.
gateway_flags() {
  flags=(--data-dir "$1" --log-format json --http-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0
    --amqp-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0)
}

# gateway_started DIR [TENTHS]: waits up to TENTHS tenths of a second (default 100) for the
# gateway whose stdout is DIR/out to log that it started; shows its output and fails if not.
gateway_started() {
  for _ in $(seq "${2:-100}"); do
    grep -q 'gateway started' "$1/out" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "the gateway did not start:" >&2
  cat "$1/out" "$1/err" >&2
  return 1
}

# listener DIR NAME: the address (host:port) of the gateway's NAME listener (mqtt, http, amqp,
# metrics), from its JSON log in DIR/out; empty when it has none.
listener() {
  grep -m1 "\"listener\":\"$2\"" "$1/out" | sed -E 's/.*"addr":"([^"]+)".*/\1/' || true
}

# dev_token DIR: the administrator token a --dev gateway printed.
dev_token() {
  grep -m1 '^eyJ' "$1/out"
}
