#!/usr/bin/env bash
# Run the Durable Streams server conformance suite
# (@durable-streams/server-conformance-tests, pinned in package.json) against
# a running server.
#
# Usage:
#   conformance/run.sh URL [REPORT.json] [extra vitest args...]
#
#   URL          base URL of the server, e.g. http://127.0.0.1:4437
#                (no trailing path: the suite itself requests
#                URL/v1/stream/<name>; see NOTES.md "URL layout").
#   REPORT.json  where to write the vitest JSON report
#                (default: conformance/reports/report.json). The text log of
#                the run goes next to it as REPORT.log.
#   extra args   passed to vitest, e.g.  -t "Fork"  to run a subset.
#
# Prints failing tests, then the summary line
#   passed N failed N skipped N
#
# Exit status:
#   0  the suite ran (whatever the results), unless a gate below trips
#   1  a gate tripped:
#        CONFORMANCE_FAIL_ON_FAILURE=1  -> any failed test
#        CONFORMANCE_MIN_PASS=N         -> fewer than N passed tests
#   2  the suite could not run / produced no report (server unreachable,
#      install failure, bad arguments)
#
# Other env:
#   CONFORMANCE_LONG_POLL_TIMEOUT_MS  forwarded to the suite's
#       longPollTimeoutMs option (default 20000 inside the suite; only affects
#       the per-test timeout of a few long-poll tests). Leave unset for
#       results comparable to the official CLI.
#   CONFORMANCE_SUBSCRIPTIONS=1       also run the 6 "Reserved subscription
#       APIs" tests (skipped by the official CLI; not part of the baseline).
#   CONFORMANCE_SKIP_REACHABILITY=1   do not probe URL before running.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
  [[ $# -lt 1 ]] && exit 2 || exit 0
fi

url="${1%/}"
shift
report="${here}/reports/report.json"
if [[ $# -gt 0 && "$1" != -* ]]; then
  report="$1"
  shift
fi
extra_args=("$@")

case "$url" in
  http://* | https://*) ;;
  *)
    echo "run.sh: URL must start with http:// or https:// (got '$url')" >&2
    exit 2
    ;;
esac

mkdir -p "$(dirname "$report")"
report="$(cd "$(dirname "$report")" && pwd)/$(basename "$report")"
log="${report%.json}.log"

cd "$here"

if [[ ! -d node_modules/@durable-streams/server-conformance-tests ]]; then
  echo "run.sh: installing pinned packages (npm ci)..." >&2
  if ! npm ci --no-audit --no-fund >&2; then
    echo "run.sh: npm ci failed" >&2
    exit 2
  fi
fi

if [[ "${CONFORMANCE_SKIP_REACHABILITY:-0}" != "1" ]]; then
  # Any HTTP answer (even 404) means something is listening.
  if ! node -e '
    const url = process.argv[1] + "/v1/stream/__conformance_probe__"
    fetch(url, { method: "HEAD", signal: AbortSignal.timeout(5000) })
      .then(() => process.exit(0))
      .catch((e) => { console.error("run.sh: " + url + " unreachable: " + (e.cause?.code ?? e.message)); process.exit(1) })
  ' "$url"; then
    exit 2
  fi
fi

rm -f "$report"
start_s=$(date +%s)
set +e
CONFORMANCE_TEST_URL="$url" ./node_modules/.bin/vitest run \
  --config vitest.config.mjs \
  --reporter=default --reporter=json \
  --outputFile.json="$report" \
  ${extra_args[@]+"${extra_args[@]}"} >"$log" 2>&1
vitest_rc=$?
set -e
end_s=$(date +%s)

if [[ ! -s "$report" ]]; then
  echo "run.sh: vitest exited $vitest_rc without writing $report; last log lines:" >&2
  tail -n 30 "$log" >&2
  exit 2
fi

echo "run.sh: suite took $((end_s - start_s))s (vitest exit $vitest_rc); report $report; log $log" >&2

summary="$(node summarize.mjs "$report")"
echo "$summary"

read -r _ n_passed _ n_failed _ n_skipped <<<"$(tail -n 1 <<<"$summary")"

gate_rc=0
if [[ "${CONFORMANCE_FAIL_ON_FAILURE:-0}" == "1" && "$n_failed" -gt 0 ]]; then
  echo "run.sh: CONFORMANCE_FAIL_ON_FAILURE=1 and $n_failed test(s) failed" >&2
  gate_rc=1
fi
if [[ -n "${CONFORMANCE_MIN_PASS:-}" && "$n_passed" -lt "${CONFORMANCE_MIN_PASS}" ]]; then
  echo "run.sh: $n_passed passed < CONFORMANCE_MIN_PASS=${CONFORMANCE_MIN_PASS}" >&2
  gate_rc=1
fi
exit "$gate_rc"
