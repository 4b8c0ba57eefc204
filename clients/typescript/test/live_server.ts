/**
 * A real runservice server for the live tests: `runservice serve` from the repository's
 * `.venv` (`make venv`) on a free loopback port, with a data directory of its own and its
 * development (admin) token.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { setTimeout as delay } from "node:timers/promises";

import { RunClient } from "../src/index";

/** The server's executable (this file runs from dist/test/). */
export const SERVER_BIN = resolve(__dirname, "..", "..", "..", "..", ".venv", "bin", "runservice");

/** Why the live tests cannot run here, or undefined when they can; under CI, missing is an error. */
export function liveSkipReason(): string | undefined {
  if (existsSync(SERVER_BIN)) return undefined;
  const why = `${SERVER_BIN} is missing; \`make venv\` installs it`;
  if (process.env.CI) throw new Error(why);
  return why;
}

/** A running server; `stop()` ends it and removes its data. */
export interface LiveServer {
  address: string;
  token: string;
  stop(): Promise<void>;
}

const START_TIMEOUT_MS = 30_000;

/** Starts the server and resolves once it answers a call. */
export async function startLiveServer(): Promise<LiveServer> {
  const dir = mkdtempSync(join(tmpdir(), "runservice-ts-live-"));
  const address = `127.0.0.1:${await freePort()}`;
  const log = openSync(join(dir, "server.log"), "a");
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("RUNSERVICE_")));
  const proc = spawn(
    SERVER_BIN,
    ["serve", "--listen", address, "--data-dir", join(dir, "data"), "--dev-token", "--drain-timeout", "2s"],
    { env: { ...env, PYTHONUNBUFFERED: "1" }, stdio: ["ignore", log, log] },
  );
  closeSync(log); // the child holds its own descriptor
  const exited = new Promise<void>((done) => proc.once("exit", () => done()));
  const stop = async (): Promise<void> => {
    await terminate(proc, exited);
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const token = await ready(address, join(dir, "data", "dev-token"), exited, () => logTail(dir));
    return { address, token, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** Waits for the dev token, then for a ListAgents answer; fails if the process exits first. */
async function ready(address: string, tokenFile: string, exited: Promise<void>, tail: () => string): Promise<string> {
  let gone = false;
  void exited.then(() => (gone = true));
  const deadline = Date.now() + START_TIMEOUT_MS;
  const check = (): void => {
    if (gone) throw new Error(`the server exited while starting:\n${tail()}`);
    if (Date.now() > deadline) throw new Error(`the server at ${address} did not answer in time:\n${tail()}`);
  };
  while (!existsSync(tokenFile) || readFileSync(tokenFile, "utf8").trim() === "") {
    check();
    await delay(20);
  }
  const token = readFileSync(tokenFile, "utf8").trim();
  const client = new RunClient(address, { token, retry: { giveUpAfterMs: 500 } });
  try {
    for (;;) {
      check();
      try {
        await client.listAgents(); // retries UNAVAILABLE for giveUpAfterMs
        return token;
      } catch {
        // not listening yet
      }
    }
  } finally {
    client.close();
  }
}

/** SIGTERM, then SIGKILL if the process outlives a bound. */
async function terminate(proc: ChildProcess, exited: Promise<void>): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  proc.kill("SIGTERM");
  const timer = setTimeout(() => proc.kill("SIGKILL"), 15_000);
  await exited;
  clearTimeout(timer);
}

function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolvePort(port));
    });
  });
}

function logTail(dir: string): string {
  try {
    return readFileSync(join(dir, "server.log"), "utf8").slice(-4000);
  } catch {
    return "";
  }
}

/** Polls `condition` every 10 ms until it is truthy; throws after `timeoutMs`. */
export async function waitUntil(what: string, condition: () => Promise<boolean> | boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await delay(10);
  }
}
