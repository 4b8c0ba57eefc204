/**
 * The server address and the bearer token, found the way the runservice CLI finds them
 * (runservice/cli.py), for the example programs: RUNSERVICE_ADDR, else 127.0.0.1:50051;
 * RUNSERVICE_TOKEN, else, on a loopback address, the development token that `make run`
 * writes to RUNSERVICE_HOME (else ~/.local/share/runservice)/dev-token.
 */
import { readFileSync } from "node:fs";
import { BlockList, isIP } from "node:net";
import { homedir } from "node:os";
import { join } from "node:path";

/** The address of a development server (`make run`). */
export const DEFAULT_ADDR = "127.0.0.1:50051";

/** RUNSERVICE_ADDR, else DEFAULT_ADDR (an empty variable counts as unset). */
export function addrFromEnv(env: NodeJS.ProcessEnv = process.env): string {
  return env.RUNSERVICE_ADDR || DEFAULT_ADDR;
}

/** RUNSERVICE_HOME, else ~/.local/share/runservice: where `--dev-token` writes its token. */
export function dataDir(env: NodeJS.ProcessEnv = process.env): string {
  return env.RUNSERVICE_HOME || join(homedir(), ".local", "share", "runservice");
}

const IPV6_LOOPBACK = new BlockList();
IPV6_LOOPBACK.addAddress("::1", "ipv6");

/**
 * Whether HOST:PORT names a loopback host (localhost, 127.0.0.0/8, ::1), by the CLI's
 * rule: the host is what precedes the last colon, brackets stripped.
 */
export function isLoopback(addr: string): boolean {
  const colon = addr.lastIndexOf(":");
  const host = (colon >= 0 ? addr.slice(0, colon) : addr).replace(/^[[\]]+|[[\]]+$/g, "");
  if (host === "localhost") return true;
  switch (isIP(host)) {
    case 4:
      return host.split(".")[0] === "127";
    case 6:
      return IPV6_LOOPBACK.check(host, "ipv6");
    default:
      return false;
  }
}

/**
 * RUNSERVICE_TOKEN; else, when `addr` is on loopback, the development token (surrounding
 * whitespace trimmed); else undefined. A missing dev-token file is no error; an
 * unreadable one throws.
 */
export function tokenFromEnv(addr: string, env: NodeJS.ProcessEnv = process.env): string | undefined {
  if (env.RUNSERVICE_TOKEN) return env.RUNSERVICE_TOKEN;
  if (!isLoopback(addr)) return undefined;
  try {
    return readFileSync(join(dataDir(env), "dev-token"), "utf8").trim();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
}
