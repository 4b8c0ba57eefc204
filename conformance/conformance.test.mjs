// Vitest entry point for the Durable Streams server conformance suite.
//
// Equivalent to the package's own dist/test-runner.js (which its CLI
// `server-conformance-tests --run URL` feeds to vitest), but lives outside
// node_modules: with vitest 4 the CLI finds "No test files found" because
// vitest's default include (**/*.{test,spec}.*) and exclude
// (**/node_modules/**) both reject node_modules/.../dist/test-runner.js.
//
// Env:
//   CONFORMANCE_TEST_URL  base URL of the server under test (required),
//                         e.g. http://127.0.0.1:4437 (no trailing slash; the
//                         suite appends /v1/stream/<name> itself).
//   CONFORMANCE_LONG_POLL_TIMEOUT_MS  optional; the suite's longPollTimeoutMs
//                         option (default 20000 in the suite). The official
//                         CLI never sets it; leave unset for official results.
//   CONFORMANCE_SUBSCRIPTIONS=1  optional; enables the suite's 6 "Reserved
//                         subscription APIs" tests (webhooks / pull-wake under
//                         /v1/stream/__ds/subscriptions/). The official CLI
//                         never enables them, so they count as skipped there.
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.CONFORMANCE_TEST_URL
if (!baseUrl) {
  throw new Error(
    "CONFORMANCE_TEST_URL is required (use ./run.sh URL [report.json])"
  )
}

const options = { baseUrl: baseUrl.replace(/\/+$/, "") }
if (process.env.CONFORMANCE_LONG_POLL_TIMEOUT_MS) {
  options.longPollTimeoutMs = Number(process.env.CONFORMANCE_LONG_POLL_TIMEOUT_MS)
}

if (process.env.CONFORMANCE_SUBSCRIPTIONS === "1") {
  options.subscriptions = true
}

runConformanceTests(options)
