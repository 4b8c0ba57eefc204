/** Unary calls, pagination, error mapping and the client's helpers, against a fake server. */
import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";

import { Metadata, Server, ServerCredentials, status as Status, type ServiceError } from "@grpc/grpc-js";

import {
  AlreadyExistsError,
  DEFAULT_RETRY_POLICY,
  FailedPreconditionError,
  InternalError,
  InvalidArgumentError,
  ListRunsResponse,
  MultitaskStrategy,
  NotFoundError,
  PermissionDeniedError,
  ResourceExhaustedError,
  Run,
  RunChange,
  RunClient,
  RunServiceError,
  RunServiceService,
  RunState,
  UnauthenticatedError,
  UnavailableError,
  WebhookDelivery,
  WebhookDeliveryState,
  backoffMs,
  fromServiceError,
  isLoopbackAddress,
  isTerminalEvent,
  isTransient,
  stateName,
  type RunClientOptions,
} from "../src/index";
import { FakeRunService, makeEvent, serveAll, statusError, type FakeOptions } from "./fake_server";

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

async function fake(options: FakeOptions): Promise<FakeRunService> {
  const server = new FakeRunService(options);
  await server.start(0);
  cleanups.push(() => server.kill());
  return server;
}

function client(server: FakeRunService, options: RunClientOptions = {}): RunClient {
  const c = new RunClient(server.address, {
    token: "secret",
    retry: { initialBackoffMs: 5, maxBackoffMs: 20, giveUpAfterMs: 2_000 },
    ...options,
  });
  cleanups.push(() => c.close());
  return c;
}

function run(id: string, extra: Partial<Run> = {}): Run {
  return Run.fromPartial({ runId: id, agent: "ticker", state: RunState.RUN_STATE_RUNNING, ...extra });
}

function serviceError(code: Status, details: string, metadata = new Metadata()): ServiceError {
  return Object.assign(new Error(`${code} ${Status[code]}: ${details}`), { code, details, metadata });
}

describe("unary calls", () => {
  it("startRun sends every field and returns the run with bigint int64s", async () => {
    const server = await fake({
      unary: {
        startRun: () => ({ run: run("r1", { lastSeq: 7n, labels: { team: "a" }, input: { count: 3 } }) }),
      },
    });
    const c = client(server);
    const started = await c.startRun("ticker", { count: 3, nested: { ok: true }, list: [1, "x"] }, {
      threadId: "th",
      requestId: "req-1",
      labels: { team: "a" },
      timeoutSeconds: 1.5,
      multitaskStrategy: MultitaskStrategy.MULTITASK_STRATEGY_ENQUEUE,
    });
    assert.equal(started.runId, "r1");
    assert.equal(started.lastSeq, 7n);
    assert.deepEqual(started.input, { count: 3 });
    const call = server.unaryCalls[0]!;
    assert.equal(call.authorization, "Bearer secret");
    assert.deepEqual(call.request, {
      agent: "ticker",
      input: { count: 3, nested: { ok: true }, list: [1, "x"] },
      threadId: "th",
      multitaskStrategy: MultitaskStrategy.MULTITASK_STRATEGY_ENQUEUE,
      requestId: "req-1",
      labels: { team: "a" },
      timeout: { seconds: 1n, nanos: 500_000_000 },
      retention: undefined,
      webhookUrl: "",
    });
  });

  it("getRun, stopRun, deleteRun and listAgents", async () => {
    const server = await fake({
      unary: {
        getRun: (req: { runId: string }) => ({ run: run(req.runId, { state: RunState.RUN_STATE_SUCCEEDED }) }),
        stopRun: (req: { runId: string; reason: string }) => ({
          run: run(req.runId, { state: RunState.RUN_STATE_STOPPED, stopReason: req.reason }),
        }),
        deleteRun: () => ({}),
        listAgents: () => ({ agents: [{ name: "echo", description: "echoes" }, { name: "ticker", description: "ticks" }] }),
      },
    });
    const c = client(server);
    assert.equal((await c.getRun("a")).state, RunState.RUN_STATE_SUCCEEDED);
    const stopped = await c.stopRun("b", "enough");
    assert.equal(stateName(stopped.state), "STOPPED");
    assert.equal(stopped.stopReason, "enough");
    assert.equal(await c.deleteRun("c"), undefined);
    assert.deepEqual((await c.listAgents()).map((a) => a.name), ["echo", "ticker"]);
    assert.deepEqual(server.unaryCalls.map((u) => u.method), ["getRun", "stopRun", "deleteRun", "listAgents"]);
  });

  it("listAllRuns follows next_page_token with the same filters, and stops at limit", async () => {
    const all = Array.from({ length: 7 }, (_, i) => run(`r${7 - i}`));
    const server = await fake({
      unary: {
        listRuns: (req: { pageSize: number; pageToken: string }) => {
          const start = req.pageToken ? Number(req.pageToken) : 0;
          const runs = all.slice(start, start + req.pageSize);
          const next = start + req.pageSize < all.length ? String(start + req.pageSize) : "";
          return ListRunsResponse.fromPartial({ runs, nextPageToken: next });
        },
      },
    });
    const c = client(server);
    const ids: string[] = [];
    const filter = { agent: "ticker", states: [RunState.RUN_STATE_RUNNING], waitingForInput: true };
    for await (const r of c.listAllRuns({ pageSize: 3, ...filter })) ids.push(r.runId);
    assert.deepEqual(ids, ["r7", "r6", "r5", "r4", "r3", "r2", "r1"]);
    const requests = server.unaryCalls.map(
      (u) => u.request as { pageToken: string; agent: string; states: RunState[]; waitingForInput: boolean },
    );
    assert.deepEqual(requests.map((r) => r.pageToken), ["", "3", "6"]);
    assert.ok(requests.every((r) => r.agent === "ticker" && r.states[0] === RunState.RUN_STATE_RUNNING && r.waitingForInput));

    const limited: string[] = [];
    for await (const r of c.listAllRuns({ pageSize: 3, limit: 4 })) limited.push(r.runId);
    assert.deepEqual(limited, ["r7", "r6", "r5", "r4"]);

    const page = await c.listRuns({ pageSize: 5 });
    assert.equal(page.runs.length, 5);
    assert.equal(page.nextPageToken, "5");
  });

  it("retries UNAVAILABLE for idempotent calls, not for the others", async () => {
    let failures = 2;
    const unavailable = (): never => {
      throw statusError(Status.UNAVAILABLE, "restarting");
    };
    const server = await fake({
      unary: {
        getRun: () => (failures-- > 0 ? unavailable() : { run: run("r1") }),
        deleteRun: unavailable,
        startRun: unavailable,
      },
    });
    const c = client(server);
    assert.equal((await c.getRun("r1")).runId, "r1");
    assert.equal(server.unaryCalls.length, 3);
    await assert.rejects(c.deleteRun("r1"), UnavailableError);
    assert.equal(server.unaryCalls.length, 4);
    await assert.rejects(c.startRun("ticker"), UnavailableError);
    assert.equal(server.unaryCalls.length, 5);
    // With a request_id StartRun is idempotent, so it is retried, within the bounds.
    const bounded = client(server, { retry: { initialBackoffMs: 5, maxBackoffMs: 5, maxAttempts: 3 } });
    await assert.rejects(bounded.startRun("ticker", {}, { requestId: "k" }), UnavailableError);
    assert.equal(server.unaryCalls.length, 5 + 4);
  });

  it("watchRuns streams the snapshot and the changes", async () => {
    // WatchRuns is scripted with a raw grpc-js handler.
    const raw = new Server();
    raw.addService(RunServiceService, {
      watchRuns: (call: { write: (m: unknown) => void; end: () => void }) => {
        call.write({ change: RunChange.RUN_CHANGE_EXISTING, run: run("r1") });
        call.write({ change: RunChange.RUN_CHANGE_SNAPSHOT_END, run: undefined });
        call.write({ change: RunChange.RUN_CHANGE_STATE_CHANGED, run: run("r1", { state: RunState.RUN_STATE_SUCCEEDED }) });
        call.end();
      },
    } as never);
    const port = await new Promise<number>((resolve, reject) =>
      raw.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))),
    );
    cleanups.push(() => raw.forceShutdown());
    const c = new RunClient(`127.0.0.1:${port}`, { token: "x" });
    cleanups.push(() => c.close());
    const changes: string[] = [];
    for await (const update of c.watchRuns({ states: [RunState.RUN_STATE_RUNNING] })) {
      changes.push(`${RunChange[update.change]} ${update.run?.runId ?? "-"}`);
    }
    assert.deepEqual(changes, ["RUN_CHANGE_EXISTING r1", "RUN_CHANGE_SNAPSHOT_END -", "RUN_CHANGE_STATE_CHANGED r1"]);
  });

  it("wait follows the log from last_seq + 1 and returns the terminal run", async () => {
    let gets = 0;
    const server = await fake({
      subscribe: [serveAll(10)],
      unary: {
        getRun: () => {
          gets += 1;
          return gets === 1
            ? { run: run("run-1", { lastSeq: 4n }) }
            : { run: run("run-1", { lastSeq: 10n, state: RunState.RUN_STATE_SUCCEEDED }) };
        },
      },
    });
    const done = await client(server).wait("run-1");
    assert.equal(done.state, RunState.RUN_STATE_SUCCEEDED);
    assert.deepEqual(server.subscribes.map((s) => s.fromSeq), [5n]);
  });
});

describe("input and external runs", () => {
  const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

  it("sendInput retries UNAVAILABLE under one request id: a new UUID per call, or the caller's", async () => {
    let calls = 0;
    const server = await fake({
      unary: {
        sendInput: (req: { runId: string; requestId: string }) => {
          calls += 1;
          if (calls % 3 !== 0) throw statusError(Status.UNAVAILABLE, "restarting");
          return { event: makeEvent(3, 5, req.runId) };
        },
      },
    });
    const c = client(server);
    const event = await c.sendInput("r1", { approve: true, note: "ok" });
    assert.equal(event.seq, 3n);
    await c.sendInput("r1", { approve: false }, { requestId: "mine" });
    await c.sendInput("r1", { approve: true });
    const requests = server.unaryCalls.map((u) => u.request as { runId: string; input: unknown; requestId: string });
    assert.equal(requests.length, 9);
    const ids = requests.map((r) => r.requestId);
    assert.match(ids[0]!, UUID);
    assert.deepEqual(ids.slice(0, 6), [ids[0], ids[0], ids[0], "mine", "mine", "mine"]);
    assert.match(ids[6]!, UUID);
    assert.notEqual(ids[6], ids[0]);
    assert.deepEqual(requests[0], { runId: "r1", input: { approve: true, note: "ok" }, requestId: ids[0] });
  });

  it("sendInput rejects at once with the typed error of a refusal", async () => {
    const server = await fake({
      unary: {
        sendInput: () => {
          throw statusError(Status.FAILED_PRECONDITION, "the run has ended", { reason: "RUN_ENDED" });
        },
      },
    });
    await assert.rejects(client(server).sendInput("r1", {}), (err: unknown) => {
      assert.ok(err instanceof FailedPreconditionError);
      assert.equal(err.reason, "RUN_ENDED");
      return true;
    });
    assert.equal(server.unaryCalls.length, 1);
  });

  it("appendEvents, closeRun and listWebhookDeliveries send their fields; appends retry only with a producer", async () => {
    let appends = 0;
    const server = await fake({
      unary: {
        appendEvents: () => {
          appends += 1;
          if (appends === 1 || appends === 2) throw statusError(Status.UNAVAILABLE, "restarting");
          return { lastSeq: 4n, duplicate: false, closed: false, producerEpoch: 1n, producerSeq: 2n };
        },
        closeRun: (req: { runId: string }) => ({ run: run(req.runId, { state: RunState.RUN_STATE_SUCCEEDED }) }),
        listWebhookDeliveries: () => ({
          deliveries: [
            WebhookDelivery.fromPartial({ deliveryId: "d1", state: WebhookDeliveryState.WEBHOOK_DELIVERY_STATE_DELIVERED }),
          ],
        }),
      },
    });
    const c = client(server);
    await assert.rejects(c.appendEvents("r1", [{ text: "x" }]), UnavailableError);
    const appended = await c.appendEvents("r1", [{ type: "token", text: "hi" }, { value: [1, 2] }], {
      producerId: "p",
      producerEpoch: 1,
      producerSeq: 2n,
    });
    assert.equal(appended.lastSeq, 4n);
    assert.deepEqual(server.unaryCalls[2]!.request, {
      runId: "r1",
      events: [
        { type: "token", data: undefined, text: "hi", binary: undefined, value: undefined },
        { type: "", data: undefined, text: undefined, binary: undefined, value: [1, 2] },
      ],
      producerId: "p",
      producerEpoch: 1n,
      producerSeq: 2n,
      close: false,
    });
    const closed = await c.closeRun("r1", { total: 3 });
    assert.equal(closed.state, RunState.RUN_STATE_SUCCEEDED);
    assert.deepEqual(server.unaryCalls[3]!.request, { runId: "r1", result: { total: 3 } });
    const deliveries = await c.listWebhookDeliveries("r1");
    assert.deepEqual(deliveries.map((d) => [d.deliveryId, d.state]), [["d1", WebhookDeliveryState.WEBHOOK_DELIVERY_STATE_DELIVERED]]);
    assert.deepEqual(server.unaryCalls.map((u) => u.method), ["appendEvents", "appendEvents", "appendEvents", "closeRun", "listWebhookDeliveries"]);
  });
});

describe("error mapping", () => {
  const cases: Array<[Status, string, new (...args: never[]) => RunServiceError]> = [
    [Status.NOT_FOUND, "RUN_NOT_FOUND", NotFoundError],
    [Status.INVALID_ARGUMENT, "UNKNOWN_AGENT", InvalidArgumentError],
    [Status.ALREADY_EXISTS, "REQUEST_ID_REUSED", AlreadyExistsError],
    [Status.FAILED_PRECONDITION, "THREAD_BUSY", FailedPreconditionError],
    [Status.RESOURCE_EXHAUSTED, "TOO_MANY_ACTIVE_RUNS", ResourceExhaustedError],
    [Status.UNAUTHENTICATED, "TOKEN_EXPIRED", UnauthenticatedError],
    [Status.PERMISSION_DENIED, "ADMIN_ONLY", PermissionDeniedError],
    [Status.INTERNAL, "INTERNAL_ERROR", InternalError],
  ];
  for (const [code, reason, cls] of cases) {
    it(`${Status[code]} (${reason}) over the wire`, async () => {
      const server = await fake({
        unary: {
          deleteRun: () => {
            throw statusError(code, `refused: ${reason}`, { reason, metadata: { field: "x", run_id: "r1" } });
          },
        },
      });
      await assert.rejects(client(server).deleteRun("r1"), (err: unknown) => {
        assert.ok(err instanceof cls, `expected ${cls.name}, got ${String(err)}`);
        assert.ok(err instanceof RunServiceError);
        assert.equal(err.code, code);
        assert.equal(err.codeName, Status[code]);
        assert.equal(err.reason, reason);
        assert.equal(err.domain, "runservice");
        assert.deepEqual(err.metadata, { field: "x", run_id: "r1" });
        assert.equal(err.details, `refused: ${reason}`);
        assert.equal(err.message, `${Status[code]} (${reason}): refused: ${reason}`);
        assert.equal(err.name, cls.name);
        return true;
      });
    });
  }

  it("a status without details has an empty reason", async () => {
    const server = await fake({
      unary: {
        getRun: () => {
          throw statusError(Status.INVALID_ARGUMENT, "bad");
        },
      },
    });
    await assert.rejects(client(server).getRun("r1"), (err: unknown) => {
      assert.ok(err instanceof InvalidArgumentError);
      assert.equal(err.reason, "");
      assert.deepEqual(err.metadata, {});
      assert.equal(err.message, "INVALID_ARGUMENT: bad");
      return true;
    });
  });

  it("an ErrorInfo of another domain is not runservice's reason", async () => {
    const server = await fake({
      unary: {
        getRun: () => {
          throw statusError(Status.NOT_FOUND, "nope", { reason: "OTHER", domain: "example.com" });
        },
      },
    });
    await assert.rejects(client(server).getRun("r1"), (err: unknown) => {
      assert.ok(err instanceof NotFoundError);
      assert.equal(err.reason, "");
      return true;
    });
  });

  it("a malformed status trailer is ignored", () => {
    const metadata = new Metadata();
    metadata.set("grpc-status-details-bin", Buffer.from([0xff, 0xff, 0xff]));
    const err = fromServiceError(serviceError(Status.NOT_FOUND, "gone", metadata));
    assert.ok(err instanceof NotFoundError);
    assert.equal(err.reason, "");
  });

  it("an unknown code maps to the base class", () => {
    const err = fromServiceError(serviceError(Status.DATA_LOSS, "lost"));
    assert.equal(err.constructor, RunServiceError);
    assert.equal(err.codeName, "DATA_LOSS");
  });

  it("missing credentials surface as UNAUTHENTICATED", async () => {
    const server = await fake({
      unary: {
        listAgents: (_req: unknown, metadata: Metadata) => {
          if (!metadata.get("authorization").length) {
            throw statusError(Status.UNAUTHENTICATED, "missing credentials", { reason: "CREDENTIALS_MISSING" });
          }
          return { agents: [] };
        },
      },
    });
    await assert.rejects(client(server, { token: undefined }).listAgents(), (err: unknown) => {
      assert.ok(err instanceof UnauthenticatedError);
      assert.equal(err.reason, "CREDENTIALS_MISSING");
      return true;
    });
    assert.deepEqual(await client(server).listAgents(), []);
  });

  it("an unreachable server is UNAVAILABLE", async () => {
    const server = await fake({});
    server.kill();
    const c = client(server, { retry: { initialBackoffMs: 5, maxBackoffMs: 10, maxAttempts: 2 } });
    await assert.rejects(c.getRun("r1"), UnavailableError);
  });

  it("isTransient: UNAVAILABLE/DEADLINE_EXCEEDED always, transport codes only without ErrorInfo", () => {
    const withInfo = (code: Status): ServiceError => {
      const e = statusError(code, "x", { reason: "INTERNAL_ERROR" });
      return serviceError(code, "x", e.metadata);
    };
    assert.ok(isTransient(serviceError(Status.UNAVAILABLE, "x")));
    assert.ok(isTransient(withInfo(Status.UNAVAILABLE)));
    assert.ok(isTransient(serviceError(Status.DEADLINE_EXCEEDED, "x")));
    assert.ok(isTransient(serviceError(Status.INTERNAL, "Received RST_STREAM")));
    assert.ok(isTransient(serviceError(Status.UNKNOWN, "x")));
    assert.ok(!isTransient(withInfo(Status.INTERNAL)));
    assert.ok(!isTransient(serviceError(Status.NOT_FOUND, "x")));
    assert.ok(!isTransient(serviceError(Status.INVALID_ARGUMENT, "x")));
  });
});

describe("helpers", () => {
  it("backoff is jittered, exponential from 100 ms and capped at 2 s", () => {
    const policy = { ...DEFAULT_RETRY_POLICY };
    assert.equal(backoffMs(policy, 1, () => 1), 100);
    assert.equal(backoffMs(policy, 1, () => 0), 50);
    assert.equal(backoffMs(policy, 3, () => 1), 400);
    assert.equal(backoffMs(policy, 10, () => 1), 2000);
    assert.equal(backoffMs(policy, 10, () => 0), 1000);
    assert.equal(DEFAULT_RETRY_POLICY.giveUpAfterMs, 30_000);
  });

  it("isTerminalEvent needs a run.state event with a terminal state", () => {
    assert.ok(!isTerminalEvent(makeEvent(1, 5)));
    assert.ok(!isTerminalEvent(makeEvent(2, 5)));
    assert.ok(isTerminalEvent(makeEvent(5, 5)));
    for (const state of [RunState.RUN_STATE_FAILED, RunState.RUN_STATE_STOPPED, RunState.RUN_STATE_INTERRUPTED, RunState.RUN_STATE_TIMED_OUT]) {
      assert.ok(isTerminalEvent({ ...makeEvent(5, 5), state }));
    }
    assert.ok(!isTerminalEvent({ ...makeEvent(3, 5), state: RunState.RUN_STATE_SUCCEEDED }));
  });

  it("plaintext only to loopback unless insecure is set", () => {
    for (const a of ["127.0.0.1:50051", "localhost:1", "[::1]:50051", "127.1.2.3:9", "unix:/tmp/s"]) assert.ok(isLoopbackAddress(a), a);
    for (const a of ["10.0.0.1:50051", "example.com:443", "[2001:db8::1]:1"]) assert.ok(!isLoopbackAddress(a), a);
    assert.throws(() => new RunClient("example.com:443"), /not on loopback/);
    new RunClient("example.com:443", { insecure: true }).close();
    new RunClient("example.com:443", { tls: true }).close();
  });
});
