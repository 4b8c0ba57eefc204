#!/usr/bin/env node
// Starts the Durable Streams Node reference server (@durable-streams/server,
// pinned in package.json) on loopback, for running the conformance suite
// against a known-good implementation.
//
// Usage:
//   node reference-server.mjs [--port N] [--data-dir DIR] [--long-poll-ms N]
// Env equivalents: PORT, DATA_DIR, LONG_POLL_MS.
// Without --data-dir the in-memory store is used.
// Prints "LISTENING <url>" on stdout once ready; stops on SIGINT/SIGTERM.
import { DurableStreamTestServer } from "@durable-streams/server"

function arg(name, envName, fallback) {
  const i = process.argv.indexOf(`--${name}`)
  if (i >= 0 && i + 1 < process.argv.length) return process.argv[i + 1]
  if (process.env[envName] !== undefined && process.env[envName] !== "")
    return process.env[envName]
  return fallback
}

const port = Number(arg("port", "PORT", "4437"))
const dataDir = arg("data-dir", "DATA_DIR", undefined)
const longPollTimeout = Number(arg("long-poll-ms", "LONG_POLL_MS", "30000"))

const server = new DurableStreamTestServer({
  host: "127.0.0.1", // loopback only
  port,
  dataDir,
  longPollTimeout,
})

const url = await server.start()
console.log(`LISTENING ${url} store=${dataDir ? `file:${dataDir}` : "memory"}`)

let stopping = false
async function shutdown(sig) {
  if (stopping) return
  stopping = true
  console.log(`received ${sig}, stopping`)
  try {
    await server.stop()
  } finally {
    process.exit(0)
  }
}
process.on("SIGINT", () => shutdown("SIGINT"))
process.on("SIGTERM", () => shutdown("SIGTERM"))
