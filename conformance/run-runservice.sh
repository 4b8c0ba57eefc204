#!/usr/bin/env bash
# Start runservice with its HTTP edge on 127.0.0.1 (a fresh SQLite data dir, no
# authentication: loopback only), run the conformance suite against its
# /v1/streams, stop it. `make conformance` runs this with the CI gate.
#
# Usage:
#   conformance/run-runservice.sh [REPORT.json] [extra vitest args...]
# Env:
#   RUNSERVICE     the runservice command (default: ../.venv/bin/runservice)
#   PORT           the HTTP port (default: a free one)
#   LONG_POLL      --http-long-poll-timeout (default 3s: two tests of the suite
#                  wait for a long-poll's 204 within their 5 s timeout)
# Other run.sh env vars (CONFORMANCE_*) are honoured.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
runservice="${RUNSERVICE:-$root/.venv/bin/runservice}"
report="${1:-${here}/reports/runservice-report.json}"
[[ $# -gt 0 ]] && shift
port="${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

cd "$here"
if [[ ! -d node_modules/@durable-streams/server-conformance-tests ]]; then
  npm ci --no-audit --no-fund >&2
fi

mkdir -p "$(dirname "$report")"
data_dir="$(mktemp -d)"
server_log="${report%.json}.server.log"
$runservice serve --listen 127.0.0.1:0 --http-listen "127.0.0.1:${port}" \
  --data-dir "$data_dir" --insecure-no-auth --http-cors-origin '*' \
  --http-long-poll-timeout "${LONG_POLL:-3s}" >"$server_log" 2>&1 &
server_pid=$!
cleanup() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  rm -rf "$data_dir"
}
trap cleanup EXIT

for _ in $(seq 1 100); do
  if python3 -c "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$port" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "run-runservice.sh: runservice exited:" >&2
    cat "$server_log" >&2
    exit 2
  fi
  sleep 0.1
done

set +e
"$here/run.sh" "http://127.0.0.1:${port}/v1/streams" "$report" "$@"
rc=$?
set -e
exit "$rc"
