/** SendInput, snapshots, filters and external runs against a real server (test/live_server.ts). */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, it } from "node:test";

import {
  AlreadyExistsError,
  FailedPreconditionError,
  RunClient,
  RunState,
  isTerminalEvent,
  type Run,
  type RunEvent,
  type RunSnapshot,
} from "../src/index";
import { liveSkipReason, startLiveServer, waitUntil, type LiveServer } from "./live_server";

describe("against a real server", { skip: liveSkipReason() }, () => {
  let server: LiveServer;
  let client: RunClient;

  before(async () => {
    server = await startLiveServer();
    client = new RunClient(server.address, { token: server.token });
  });

  after(async () => {
    client?.close();
    await server?.stop();
  });

  /** Starts an approval run and resolves once GetRun shows that it waits for input. */
  async function startWaiting(): Promise<Run> {
    let run = await client.startRun("approval", { question: "ship it?" });
    await waitUntil("the run waits for input", async () => {
      run = await client.getRun(run.runId);
      return run.waitingForInput;
    });
    return run;
  }

  async function logOf(runId: string): Promise<RunEvent[]> {
    const events: RunEvent[] = [];
    for await (const event of client.subscribe(runId)) events.push(event);
    return events;
  }

  it("the approval agent takes its answer from sendInput and ends SUCCEEDED with it", async () => {
    const run = await startWaiting();
    const waiting: string[] = [];
    for await (const r of client.listAllRuns({ agent: "approval", waitingForInput: true, pageSize: 1 })) {
      assert.ok(r.waitingForInput, `listed ${r.runId}, which does not wait`);
      waiting.push(r.runId);
    }
    assert.ok(waiting.includes(run.runId), "listRuns({ waitingForInput }) does not list the waiting run");

    const event = await client.sendInput(run.runId, { approve: true, note: "lgtm" });
    assert.equal(event.type, "input");
    assert.deepEqual(event.data, { approve: true, note: "lgtm" });
    const done = await client.wait(run.runId);
    assert.equal(done.state, RunState.RUN_STATE_SUCCEEDED);
    assert.deepEqual(done.result, { approved: true, note: "lgtm" });
    assert.equal(done.waitingForInput, false);
    assert.deepEqual((await logOf(run.runId)).map((e) => e.type), ["run.state", "input.requested", "input", "run.state"]);
  });

  it("a repeated requestId delivers the input once and refuses another input", async () => {
    const run = await startWaiting();
    const requestId = randomUUID();
    const first = await client.sendInput(run.runId, { approve: false, note: "not yet" }, { requestId });
    const again = await client.sendInput(run.runId, { approve: false, note: "not yet" }, { requestId });
    assert.equal(again.seq, first.seq);
    await assert.rejects(client.sendInput(run.runId, { approve: true }, { requestId }), (err: unknown) => {
      assert.ok(err instanceof AlreadyExistsError);
      assert.equal(err.reason, "REQUEST_ID_REUSED");
      return true;
    });
    const done = await client.wait(run.runId);
    assert.deepEqual(done.result, { approved: false, note: "not yet" });
    assert.equal((await logOf(run.runId)).filter((e) => e.type === "input").length, 1);
  });

  it("sendInput to a run that has ended rejects with reason RUN_ENDED", async () => {
    const run = await client.startRun("echo", { text: "done already", delay: 0 });
    await client.wait(run.runId);
    await assert.rejects(client.sendInput(run.runId, { more: true }), (err: unknown) => {
      assert.ok(err instanceof FailedPreconditionError);
      assert.equal(err.reason, "RUN_ENDED");
      return true;
    });
  });

  it("a snapshot subscription of a finished echo run yields the snapshot, then the terminal event only", async () => {
    const words = Array.from({ length: 300 }, (_, i) => `w${i}`);
    const run = await client.startRun("echo", { text: words.join(" "), delay: 0 });
    const done = await client.wait(run.runId);
    const snapshots: RunSnapshot[] = [];
    const events: RunEvent[] = [];
    for await (const event of client.subscribe(run.runId, { onSnapshot: (s) => snapshots.push(s) })) {
      events.push(event);
    }
    assert.equal(snapshots.length, 1);
    assert.equal(snapshots[0]!.seq, done.lastSeq - 1n);
    assert.deepEqual(snapshots[0]!.data, { text: words.join("") });
    assert.deepEqual(events.map((e) => e.seq), [done.lastSeq]);
    assert.ok(isTerminalEvent(events[0]!));
  });

  it("an external run takes appendEvents and closeRun, and refuses input", async () => {
    const run = await client.startRun("external");
    const events = [{ type: "token", text: "hi" }];
    const first = await client.appendEvents(run.runId, events, { producerId: "p1" });
    const retry = await client.appendEvents(run.runId, events, { producerId: "p1" });
    assert.equal(first.duplicate, false);
    assert.equal(retry.duplicate, true);
    assert.equal(retry.lastSeq, first.lastSeq);
    await assert.rejects(client.sendInput(run.runId, { x: 1 }), (err: unknown) => {
      assert.ok(err instanceof FailedPreconditionError);
      assert.equal(err.reason, "EXTERNAL_RUN");
      return true;
    });
    const closed = await client.closeRun(run.runId, { ok: true });
    assert.equal(closed.state, RunState.RUN_STATE_SUCCEEDED);
    assert.deepEqual(closed.result, { ok: true });
    await assert.rejects(client.appendEvents(run.runId, events, { producerId: "p1", producerSeq: 1 }), (err: unknown) => {
      assert.ok(err instanceof FailedPreconditionError);
      assert.equal(err.reason, "STREAM_CLOSED");
      return true;
    });
    assert.deepEqual(await client.listWebhookDeliveries(run.runId), []);
  });
});
