/**
 * A tour of the client: start a run, follow its events, read it back, page through
 * runs, and branch on a typed error.
 *
 *   RUNSERVICE_ADDR=127.0.0.1:50051 RUNSERVICE_TOKEN=... node dist/examples/quickstart.js
 */
import { NotFoundError, RunClient, stateName } from "../src/index";
import { addrFromEnv, tokenFromEnv } from "./env";

// As the runservice CLI: without RUNSERVICE_TOKEN, a loopback address gets the dev token.
const addr = addrFromEnv();
const token = tokenFromEnv(addr);

async function main(): Promise<void> {
  const client = new RunClient(addr, { token });
  try {
    const run = await client.startRun("echo", { text: "one two three", delay: 0.1 });
    console.log("started", run.runId, stateName(run.state));

    for await (const event of client.subscribe(run.runId, { fromSeq: 1 })) {
      const payload = event.text ?? (event.type === "run.state" ? stateName(event.state) : JSON.stringify(event.data));
      console.log(String(event.seq), event.type, payload);
    }

    const done = await client.getRun(run.runId);
    console.log(stateName(done.state), done.result, "last_seq", String(done.lastSeq));

    for await (const r of client.listAllRuns({ agent: "echo", limit: 3 })) {
      console.log(r.runId, stateName(r.state), String(r.lastSeq));
    }

    try {
      await client.deleteRun("0190f6e4-8c4e-7a1b-9c2d-3e4f5a6b7c8d");
    } catch (err) {
      if (!(err instanceof NotFoundError)) throw err;
      console.log(err.codeName, err.reason, err.metadata);
    }
  } finally {
    client.close();
  }
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? err.message : err);
  process.exitCode = 1;
});
