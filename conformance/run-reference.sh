#!/usr/bin/env bash
# Start the Node reference server (@durable-streams/server, pinned) on
# 127.0.0.1, run the conformance suite against it with run.sh, stop it.
# A known-good baseline for the harness itself.
#
# Usage:
#   conformance/run-reference.sh [REPORT.json] [extra vitest args...]
# Env:
#   REF_PORT       port for the reference server (default 4437)
#   LONG_POLL_MS   reference server long-poll timeout (default 30000, its own
#                  default; 3000 makes the two offset=now long-poll tests pass)
#   DATA_DIR       use the file-backed (LMDB) store in DATA_DIR instead of memory
# Other run.sh env vars (CONFORMANCE_*) are honoured.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
port="${REF_PORT:-4437}"
report="${1:-${here}/reports/reference-report.json}"
[[ $# -gt 0 ]] && shift

cd "$here"
if [[ ! -d node_modules/@durable-streams/server ]]; then
  npm ci --no-audit --no-fund >&2
fi

mkdir -p "$(dirname "$report")"
server_log="${report%.json}.server.log"
PORT="$port" node reference-server.mjs >"$server_log" 2>&1 &
server_pid=$!
cleanup() { kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; }
trap cleanup EXIT

for _ in $(seq 1 50); do
  grep -q '^LISTENING ' "$server_log" 2>/dev/null && break
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "run-reference.sh: reference server exited:" >&2
    cat "$server_log" >&2
    exit 2
  fi
  sleep 0.1
done
if ! grep -q '^LISTENING ' "$server_log"; then
  echo "run-reference.sh: reference server did not start" >&2
  exit 2
fi

set +e
"$here/run.sh" "http://127.0.0.1:${port}" "$report" "$@"
rc=$?
set -e
exit "$rc"
