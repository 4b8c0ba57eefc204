/**
 * The cross-language resume scenario, run by the test harness (which kills and restarts
 * the server while this reads):
 *
 *   node dist/examples/scenario.js --addr HOST:PORT --token TOKEN --scenario replay|live
 *
 * Without --token it uses RUNSERVICE_TOKEN, else, on a loopback address, the development
 * token of `make run`, as the runservice CLI does.
 *
 * stdout: JSON lines, one per line, each written at once: progress lines carry a
 * "phase" key; the last line is {"summary": {...}}. Diagnostics go to stderr. Exit 0 on
 * success; non-zero, with the reason on stderr, on failure.
 *
 * replay: start `ticker` {"count": 200}; wait until the run is terminal; read seqs 1..50
 *   with a plain (non-resuming) Subscribe and cancel it ({"phase":"first50"}); then follow
 *   with the resumable subscribe from 51, 20 ms per event, announcing seq 51
 *   ({"phase":"resumed"}), to the terminal event.
 * live: start `ticker` {"count": 10000, "interval": 0.01}; follow with the resumable
 *   subscribe from 1, announcing the first seq >= 100 ({"phase":"live"}), to the terminal
 *   event (INTERRUPTED when the server is killed and restarted meanwhile).
 */
import { parseArgs } from "node:util";

import { RunClient, RunState, TERMINAL_STATES, isTerminalEvent, stateName, type RunEvent } from "../src/index";
import { tokenFromEnv } from "./env";

// The token's source is named, never its value: --help must not print a secret.
const USAGE = `usage: scenario.js --addr HOST:PORT [--token TOKEN] --scenario replay|live

  --addr HOST:PORT   server address
  --token TOKEN      bearer token (from RUNSERVICE_TOKEN or the dev token)
  --scenario NAME    replay or live
`;

function emit(line: object): void {
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

function log(message: string): void {
  process.stderr.write(`scenario: ${message}\n`);
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

interface Tally {
  seqs: number[];
  ticks: number;
  finalState: string;
  runId?: string;
}

function record(tally: Tally, event: RunEvent): void {
  tally.seqs.push(Number(event.seq));
  if (event.type === "tick") tally.ticks += 1;
  if (isTerminalEvent(event)) tally.finalState = stateName(event.state);
}

function onRetry(info: { attempt: number; delayMs: number; fromSeq: bigint; error: Error }): void {
  log(`resuming from seq ${info.fromSeq} (attempt ${info.attempt}, in ${Math.round(info.delayMs)} ms): ${info.error.message}`);
}

async function replay(client: RunClient, tally: Tally): Promise<void> {
  const run = await client.startRun("ticker", { count: 200 });
  log(`started ${run.runId}`);
  for (;;) {
    const current = await client.getRun(run.runId);
    if (TERMINAL_STATES.has(current.state)) break;
    await sleep(50);
  }

  // A plain Subscribe: exactly seqs 1..50, then cancel it.
  let expected = 1;
  for await (const event of client.subscribe(run.runId, { fromSeq: 1, resume: false })) {
    if (Number(event.seq) !== expected) throw new Error(`plain subscribe: got seq ${event.seq}, expected ${expected}`);
    record(tally, event);
    expected += 1;
    if (expected > 50) break; // cancels the stream
  }
  if (expected !== 51) throw new Error(`plain subscribe ended after ${expected - 1} events, before seq 50`);
  emit({ phase: "first50", last_seq: 50 });

  // The resumable subscribe from 51: the harness kills and restarts the server after 51.
  for await (const event of client.subscribe(run.runId, { fromSeq: 51, onRetry })) {
    record(tally, event);
    if (event.seq === 51n) emit({ phase: "resumed", seq: 51 });
    await sleep(20);
  }
  tally.runId = run.runId;
}

async function live(client: RunClient, tally: Tally): Promise<void> {
  const run = await client.startRun("ticker", { count: 10000, interval: 0.01 });
  log(`started ${run.runId}`);
  let announced = false;
  for await (const event of client.subscribe(run.runId, { fromSeq: 1, onRetry })) {
    record(tally, event);
    if (!announced && event.seq >= 100n) {
      announced = true;
      emit({ phase: "live", seq: Number(event.seq) });
    }
  }
  tally.runId = run.runId;
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      addr: { type: "string" },
      token: { type: "string" },
      scenario: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const { addr, scenario } = values;
  if (!addr || (scenario !== "replay" && scenario !== "live")) {
    process.stderr.write(USAGE);
    return 2;
  }
  const token = values.token || tokenFromEnv(addr);

  // Reads give up after 30 s without progress; the GetRun below retries UNAVAILABLE as long.
  const client = new RunClient(addr, { token, retry: { giveUpAfterMs: 30_000 } });
  try {
    const tally: Tally = { seqs: [], ticks: 0, finalState: "" };
    if (scenario === "replay") await replay(client, tally);
    else await live(client, tally);

    const run = await client.getRun(tally.runId!);
    const { seqs } = tally;
    const first = seqs[0] ?? 0;
    const last = seqs[seqs.length - 1] ?? 0;
    const summary = {
      scenario,
      first_seq: first,
      last_seq: last,
      count: seqs.length,
      gap_free: seqs.length > 0 && seqs.every((seq, i) => seq === first + i),
      duplicates: seqs.length - new Set(seqs).size,
      ticks: tally.ticks,
      final_state: tally.finalState,
      get_run_last_seq: Number(run.lastSeq),
      get_run_state: stateName(run.state),
    };
    emit({ summary });

    const problems: string[] = [];
    if (!summary.gap_free) problems.push("the sequence has gaps or is out of order");
    if (summary.duplicates) problems.push(`${summary.duplicates} duplicate events`);
    if (!summary.final_state) problems.push("no terminal event was received");
    if (!TERMINAL_STATES.has(run.state) || run.state === RunState.RUN_STATE_UNSPECIFIED) {
      problems.push(`GetRun says the run is ${summary.get_run_state}`);
    }
    if (summary.get_run_last_seq !== last) problems.push(`GetRun's last_seq ${summary.get_run_last_seq} != ${last}`);
    if (problems.length) {
      log(`failed: ${problems.join("; ")}`);
      return 1;
    }
    return 0;
  } finally {
    client.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    log(`failed: ${err instanceof Error ? err.message : String(err)}`);
    process.exitCode = 1;
  },
);
