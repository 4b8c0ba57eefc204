#!/usr/bin/env node
// Summarize a vitest JSON report produced by run.sh (vitest --reporter=json).
//
// Usage:
//   node summarize.mjs REPORT.json [--skipped] [--passed] [--quiet]
//
// Prints the failing tests (full name + first line of the failure message),
// optionally the skipped/passed ones, and as the LAST line:
//   passed N failed N skipped N
//
// Exit status: 0 when the report could be read (whatever it contains),
// 2 when it is missing or not a vitest JSON report. Gating on pass counts is
// done by run.sh (CONFORMANCE_FAIL_ON_FAILURE / CONFORMANCE_MIN_PASS).
import { readFileSync } from "node:fs"

const args = process.argv.slice(2)
const flags = new Set(args.filter((a) => a.startsWith("--")))
const reportPath = args.find((a) => !a.startsWith("--"))

if (!reportPath || flags.has("--help")) {
  console.error(
    "usage: node summarize.mjs REPORT.json [--skipped] [--passed] [--quiet]"
  )
  process.exit(2)
}

let report
try {
  report = JSON.parse(readFileSync(reportPath, "utf8"))
} catch (err) {
  console.error(`summarize: cannot read ${reportPath}: ${err.message}`)
  process.exit(2)
}
if (!report || !Array.isArray(report.testResults)) {
  console.error(`summarize: ${reportPath} is not a vitest JSON report`)
  process.exit(2)
}

const tests = report.testResults.flatMap((file) => file.assertionResults ?? [])

// vitest 4's JSON reporter replaces the message of a test that hit its
// timeout with "Error: STACK_TRACE_ERROR" (the text reporter says
// "Test timed out in 5000ms."). Recognise that case so the reason is readable.
function reason(t) {
  const msg = (t.failureMessages ?? [])[0] ?? ""
  const first = msg.split("\n").find((l) => l.trim() !== "") ?? "(no message)"
  if (/^Error: STACK_TRACE_ERROR\b/.test(first)) {
    const ms = Math.round(t.duration ?? 0)
    return `test timed out after ~${ms} ms (vitest test timeout; JSON reporter hides the text)`
  }
  return first.length > 300 ? `${first.slice(0, 300)}…` : first
}

const failed = tests.filter((t) => t.status === "failed")
const skipped = tests.filter((t) =>
  ["pending", "skipped", "todo", "disabled"].includes(t.status)
)
const passed = tests.filter((t) => t.status === "passed")

const nPassed = report.numPassedTests ?? passed.length
const nFailed = report.numFailedTests ?? failed.length
const nSkipped =
  (report.numPendingTests ?? skipped.length) + (report.numTodoTests ?? 0)

if (!flags.has("--quiet")) {
  // File-level errors (e.g. the test file failed to import, bad URL).
  for (const file of report.testResults) {
    if (file.status === "failed" && file.message) {
      console.log(`FILE ERROR ${file.name}: ${file.message.split("\n")[0]}`)
    }
  }
  if (failed.length > 0) {
    console.log(`Failing tests (${failed.length}):`)
    for (const t of failed) console.log(`  FAIL ${t.fullName}\n       ${reason(t)}`)
  }
  if (flags.has("--skipped") && skipped.length > 0) {
    console.log(`Skipped tests (${skipped.length}):`)
    for (const t of skipped) console.log(`  SKIP ${t.fullName}`)
  }
  if (flags.has("--passed") && passed.length > 0) {
    console.log(`Passed tests (${passed.length}):`)
    for (const t of passed) console.log(`  PASS ${t.fullName}`)
  }
}

console.log(`passed ${nPassed} failed ${nFailed} skipped ${nSkipped}`)
