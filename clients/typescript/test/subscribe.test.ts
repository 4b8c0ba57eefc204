/** The resume logic of RunClient.subscribe against a scripted fake server. */
import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";
import { setTimeout as delay } from "node:timers/promises";

import { Metadata, status as Status } from "@grpc/grpc-js";

import {
  DeadlineExceededError,
  NotFoundError,
  OutOfRangeError,
  RunClient,
  RunServiceError,
  UnauthenticatedError,
  UnavailableError,
  type RunEvent,
  type RunClientOptions,
  type RunSnapshot,
  type SubscribeOptions,
} from "../src/index";
import {
  CuttingProxy,
  FakeRunService,
  fail,
  sendEvents,
  sendSnapshot,
  serveAll,
  statusError,
  type SubscribeScript,
} from "./fake_server";

const FAST_RETRY = { initialBackoffMs: 5, maxBackoffMs: 40, giveUpAfterMs: 5_000 };

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

async function fake(scripts: SubscribeScript[]): Promise<FakeRunService> {
  const server = new FakeRunService({ subscribe: scripts });
  await server.start(0);
  cleanups.push(() => server.kill());
  return server;
}

function client(address: string, options: RunClientOptions = {}): RunClient {
  const c = new RunClient(address, { token: "t0k3n", retry: FAST_RETRY, ...options });
  cleanups.push(() => c.close());
  return c;
}

async function collect(c: RunClient, options: SubscribeOptions = {}, onEvent?: (e: RunEvent) => unknown): Promise<number[]> {
  const seqs: number[] = [];
  for await (const event of c.subscribe("run-1", options)) {
    seqs.push(Number(event.seq));
    await onEvent?.(event);
  }
  return seqs;
}

function range(from: number, to: number): number[] {
  return Array.from({ length: to - from + 1 }, (_, i) => from + i);
}

/** Serves `from..cut` then ends the attempt with `error`. */
function cutAt(cut: number, total: number, error: ReturnType<typeof statusError>, batch = 1): SubscribeScript {
  return async (call, fromSeq) => {
    await sendEvents(call, Number(fromSeq), cut, total, batch);
    fail(call, error);
  };
}

describe("subscribe", () => {
  it("delivers 1..N and stops after the terminal event", async () => {
    const server = await fake([serveAll(25, 4)]);
    assert.deepEqual(await collect(client(server.address)), range(1, 25));
    assert.deepEqual(server.subscribes.map((s) => s.fromSeq), [1n]);
    assert.equal(server.subscribes[0]!.authorization, "Bearer t0k3n");
  });

  it("starts at fromSeq, and treats 0 as the start", async () => {
    const server = await fake([serveAll(30, 3)]);
    assert.deepEqual(await collect(client(server.address), { fromSeq: 11n }), range(11, 30));
    assert.deepEqual(await collect(client(server.address), { fromSeq: 0 }), range(1, 30));
    assert.deepEqual(server.subscribes.map((s) => s.fromSeq), [11n, 1n]);
  });

  it("resumes from lastSeen+1 after UNAVAILABLE cuts at chosen points", async () => {
    const N = 40;
    const unavailable = statusError(Status.UNAVAILABLE, "server restarting");
    const server = await fake([
      cutAt(3, N, unavailable),
      cutAt(3, N, unavailable), // fails again with no progress
      cutAt(17, N, unavailable, 5),
      cutAt(39, N, unavailable, 7),
      serveAll(N),
    ]);
    const retries: Array<[bigint, number]> = [];
    const onRetry = (info: { fromSeq: bigint; attempt: number; delayMs: number; error: Error }): void => {
      assert.ok(info.error instanceof UnavailableError);
      assert.ok(info.delayMs >= FAST_RETRY.initialBackoffMs / 2 && info.delayMs <= FAST_RETRY.maxBackoffMs);
      retries.push([info.fromSeq, info.attempt]);
    };
    assert.deepEqual(await collect(client(server.address), { onRetry }), range(1, N));
    assert.deepEqual(server.subscribes.map((s) => s.fromSeq), [1n, 4n, 4n, 18n, 40n]);
    // The failure count resets with progress: the second cut at 3 is attempt 2.
    assert.deepEqual(retries, [[4n, 1], [4n, 2], [18n, 1], [40n, 1]]);
  });

  it("treats DEADLINE_EXCEEDED and transport INTERNAL/UNKNOWN as transient", async () => {
    const N = 12;
    const server = await fake([
      cutAt(2, N, statusError(Status.DEADLINE_EXCEEDED, "deadline")),
      cutAt(5, N, statusError(Status.INTERNAL, "Received RST_STREAM with code 2")),
      cutAt(8, N, statusError(Status.UNKNOWN, "stream ended without status")),
      serveAll(N),
    ]);
    assert.deepEqual(await collect(client(server.address)), range(1, N));
    assert.deepEqual(server.subscribes.map((s) => s.fromSeq), [1n, 3n, 6n, 9n]);
  });

  it("drops events the server repeats after a reconnect", async () => {
    const N = 20;
    const unavailable = statusError(Status.UNAVAILABLE, "cut");
    const server = await fake([
      cutAt(9, N, unavailable, 3),
      // A server that ignores from_seq and replays from 1: the client must skip 1..9.
      async (call) => {
        await sendEvents(call, 1, 14, N, 4);
        fail(call, unavailable);
      },
      async (call, fromSeq) => {
        await sendEvents(call, Number(fromSeq) - 3, N, N, 2);
        call.end();
      },
    ]);
    const seqs = await collect(client(server.address));
    assert.deepEqual(seqs, range(1, N));
    assert.deepEqual(server.subscribes.map((s) => s.fromSeq), [1n, 10n, 15n]);
  });

  it("rides through a connection reset (TCP RST) mid-stream", async () => {
    const N = 60;
    const server = await fake([
      async (call, fromSeq) => {
        await sendEvents(call, Number(fromSeq), 30, N, 2);
        // leave the stream open: the proxy resets the connection
      },
      serveAll(N, 5),
    ]);
    const proxy = new CuttingProxy(server.port);
    await proxy.start();
    cleanups.push(() => proxy.close());
    const seqs = await collect(client(proxy.address), {}, (event) => {
      if (event.seq === 30n) setImmediate(() => proxy.cutAll());
    });
    assert.deepEqual(seqs, range(1, N));
    assert.deepEqual(server.subscribes.map((s) => s.fromSeq), [1n, 31n]);
  });

  it("rides through a server restart on the same port", async () => {
    const N = 50;
    const server = await fake([
      async (call, fromSeq) => {
        await sendEvents(call, Number(fromSeq), 20, N);
        // hang until killed
      },
      serveAll(N, 8),
    ]);
    const c = client(server.address, { retry: { ...FAST_RETRY, maxBackoffMs: 100 } });
    const seqs = await collect(c, {}, async (event) => {
      if (event.seq === 20n) {
        server.kill();
        setTimeout(() => void server.start(), 400);
      }
    });
    assert.deepEqual(seqs, range(1, N));
    assert.deepEqual(server.subscribes.map((s) => s.fromSeq), [1n, 21n]);
  });

  it("ends when the stream ends OK before a terminal event", async () => {
    const server = await fake([
      async (call) => {
        await sendEvents(call, 1, 7, 100);
        call.end();
      },
    ]);
    assert.deepEqual(await collect(client(server.address)), range(1, 7));
    assert.equal(server.subscribes.length, 1);
  });

  it("throws a permanent error at once, typed, with its ErrorInfo", async () => {
    const server = await fake([
      async (call) => {
        fail(call, statusError(Status.NOT_FOUND, "run run-1 not found", { reason: "RUN_NOT_FOUND", metadata: { run_id: "run-1" } }));
      },
    ]);
    await assert.rejects(collect(client(server.address)), (err: unknown) => {
      assert.ok(err instanceof NotFoundError);
      assert.equal(err.code, Status.NOT_FOUND);
      assert.equal(err.reason, "RUN_NOT_FOUND");
      assert.deepEqual(err.metadata, { run_id: "run-1" });
      return true;
    });
    assert.equal(server.subscribes.length, 1);
  });

  it("does not retry an INTERNAL that carries a runservice ErrorInfo", async () => {
    const server = await fake([
      async (call) => {
        await sendEvents(call, 1, 3, 10);
        fail(call, statusError(Status.INTERNAL, "internal error (error id e1)", { reason: "INTERNAL_ERROR", metadata: { error_id: "e1" } }));
      },
    ]);
    const seqs: number[] = [];
    await assert.rejects(collect(client(server.address), {}, (e) => seqs.push(Number(e.seq))), /INTERNAL_ERROR/);
    assert.deepEqual(seqs, [1, 2, 3]);
    assert.equal(server.subscribes.length, 1);
  });

  it("maps OUT_OF_RANGE with its last_seq", async () => {
    const server = await fake([
      (call) => fail(call, statusError(Status.OUT_OF_RANGE, "from_seq 99 is past the end", { reason: "SEQ_OUT_OF_RANGE", metadata: { last_seq: "10" } })),
    ]);
    await assert.rejects(collect(client(server.address), { fromSeq: 99 }), (err: unknown) => {
      assert.ok(err instanceof OutOfRangeError);
      assert.equal(err.metadata.last_seq, "10");
      return true;
    });
  });

  it("gives up after maxAttempts consecutive failures", async () => {
    const server = await fake([(call) => fail(call, statusError(Status.UNAVAILABLE, "draining", { reason: "SERVER_DRAINING" }))]);
    const c = client(server.address, { retry: { ...FAST_RETRY, maxAttempts: 4 } });
    await assert.rejects(collect(c), (err: unknown) => {
      assert.ok(err instanceof UnavailableError);
      assert.equal(err.reason, "SERVER_DRAINING");
      assert.match(err.message, /gave up resuming after 5 attempts/);
      return true;
    });
    assert.equal(server.subscribes.length, 5);
  });

  it("gives up after giveUpAfterMs without progress, and progress resets the clock", async () => {
    const N = 30;
    const unavailable = statusError(Status.UNAVAILABLE, "down");
    // Each attempt delivers 2 events then fails: steady progress, never gives up.
    const server = await fake([cutAt(2, N, unavailable), ...range(1, 13).map((k) => cutAt(2 + 2 * k, N, unavailable)), serveAll(N)]);
    const c = client(server.address, { retry: { initialBackoffMs: 40, maxBackoffMs: 40, giveUpAfterMs: 120 } });
    assert.deepEqual(await collect(c), range(1, N));

    const dead = await fake([(call) => fail(call, unavailable)]);
    const started = Date.now();
    await assert.rejects(collect(client(dead.address, { retry: { initialBackoffMs: 20, maxBackoffMs: 40, giveUpAfterMs: 300 } })), UnavailableError);
    const elapsed = Date.now() - started;
    assert.ok(elapsed >= 300 && elapsed < 3_000, `gave up after ${elapsed} ms`);
  });

  it("gives up when the server never comes back", async () => {
    const server = await fake([
      async (call) => {
        await sendEvents(call, 1, 5, 10);
        setTimeout(() => server.kill(), 50);
      },
    ]);
    const seqs: number[] = [];
    const c = client(server.address, { retry: { initialBackoffMs: 10, maxBackoffMs: 50, giveUpAfterMs: 400 } });
    await assert.rejects(collect(c, {}, (e) => seqs.push(Number(e.seq))), UnavailableError);
    assert.deepEqual(seqs, range(1, 5));
  });

  it("with resume: false, throws the first transient failure", async () => {
    const server = await fake([cutAt(4, 10, statusError(Status.UNAVAILABLE, "cut")), serveAll(10)]);
    const seqs: number[] = [];
    await assert.rejects(collect(client(server.address), { resume: false }, (e) => seqs.push(Number(e.seq))), UnavailableError);
    assert.deepEqual(seqs, range(1, 4));
    assert.equal(server.subscribes.length, 1);
  });

  it("a DEADLINE_EXCEEDED from a per-attempt stream deadline resumes", async () => {
    const N = 15;
    const server = await fake([
      async (call, fromSeq) => {
        await sendEvents(call, Number(fromSeq), Math.min(N, Number(fromSeq) + 4), N);
        if (Number(fromSeq) + 4 >= N) call.end(); // otherwise hang past the deadline
      },
    ]);
    const c = client(server.address, { streamTimeoutMs: 150 });
    assert.deepEqual(await collect(c), range(1, N));
    assert.deepEqual(server.subscribes.map((s) => s.fromSeq), [1n, 6n, 11n]);
  });

  it("a failure the policy cannot retry keeps its own type", async () => {
    const server = await fake([(call) => fail(call, statusError(Status.DEADLINE_EXCEEDED, "deadline"))]);
    const c = client(server.address, { retry: { ...FAST_RETRY, maxAttempts: 1 } });
    await assert.rejects(collect(c, { resume: false }), DeadlineExceededError);
  });

  it("refuses a gap in the server's sequence", async () => {
    const server = await fake([
      async (call) => {
        await sendEvents(call, 1, 3, 10);
        await sendEvents(call, 5, 10, 10);
        call.end();
      },
    ]);
    await assert.rejects(collect(client(server.address)), (err: unknown) => {
      assert.ok(err instanceof RunServiceError);
      assert.equal(err.code, Status.DATA_LOSS);
      return true;
    });
  });

  it("calls the token provider on every reconnect", async () => {
    const N = 10;
    const unavailable = statusError(Status.UNAVAILABLE, "cut");
    const server = await fake([cutAt(3, N, unavailable), cutAt(6, N, unavailable), serveAll(N)]);
    let calls = 0;
    const c = client(server.address, {
      token: undefined,
      tokenProvider: async () => {
        calls += 1;
        return `token-${calls}`;
      },
    });
    assert.deepEqual(await collect(c), range(1, N));
    assert.deepEqual(
      server.subscribes.map((s) => s.authorization),
      ["Bearer token-1", "Bearer token-2", "Bearer token-3"],
    );
  });

  it("with a token provider, an expired token mid-stream resumes with a fresh token", async () => {
    const N = 12;
    const expired = statusError(Status.UNAUTHENTICATED, "the token has expired", { reason: "TOKEN_EXPIRED" });
    const scripts = [cutAt(5, N, expired), serveAll(N)];
    const server = await fake(scripts);
    let n = 0;
    const c = client(server.address, { token: undefined, tokenProvider: () => `jwt-${++n}` });
    assert.deepEqual(await collect(c), range(1, N));
    assert.deepEqual(server.subscribes.map((s) => [s.fromSeq, s.authorization]), [[1n, "Bearer jwt-1"], [6n, "Bearer jwt-2"]]);

    // With a fixed token there is nothing to refresh: the error is final.
    const fixed = await fake(scripts);
    await assert.rejects(collect(client(fixed.address)), (err: unknown) => err instanceof UnauthenticatedError && err.reason === "TOKEN_EXPIRED");
    assert.equal(fixed.subscribes.length, 1);
  });

  it("an AbortSignal cancels a live stream promptly", async () => {
    const server = await fake([
      async (call) => {
        await sendEvents(call, 1, 3, 100);
        // then follow "live": nothing more arrives
      },
    ]);
    const controller = new AbortController();
    const seqs: number[] = [];
    const started = Date.now();
    setTimeout(() => controller.abort(new Error("caller gave up")), 200);
    await assert.rejects(collect(client(server.address), { signal: controller.signal }, (e) => seqs.push(Number(e.seq))), /caller gave up/);
    assert.ok(Date.now() - started < 2_000);
    assert.deepEqual(seqs, [1, 2, 3]);
    await delay(50);
    assert.deepEqual(server.cancelled, [0]);
    assert.equal(server.subscribes.length, 1);
  });

  it("an AbortSignal cancels the backoff between attempts", async () => {
    const server = await fake([(call) => fail(call, statusError(Status.UNAVAILABLE, "down"))]);
    const controller = new AbortController();
    const c = client(server.address, { retry: { initialBackoffMs: 10_000, maxBackoffMs: 10_000, giveUpAfterMs: 60_000 } });
    setTimeout(() => controller.abort(new Error("stop waiting")), 150);
    const started = Date.now();
    await assert.rejects(collect(c, { signal: controller.signal }), /stop waiting/);
    assert.ok(Date.now() - started < 2_000);
  });

  it("breaking out of the loop cancels the stream", async () => {
    const server = await fake([serveAll(1000)]);
    const c = client(server.address);
    let n = 0;
    for await (const event of c.subscribe("run-1")) {
      n += 1;
      if (event.seq === 50n) break;
    }
    assert.equal(n, 50);
    await delay(100);
    assert.deepEqual(server.cancelled, [0]);
  });
});


describe("subscribe with a snapshot", () => {
  /** Serves the snapshot at `snapSeq` when asked, then the events after it, cut at `cut` with UNAVAILABLE. */
  function snapshotThenCut(snapSeq: number, cut: number, total: number): SubscribeScript {
    return async (call, fromSeq) => {
      let from = Number(fromSeq);
      if (call.request.snapshot) {
        await sendSnapshot(call, snapSeq, { text: `as of ${snapSeq}` });
        from = snapSeq + 1;
      }
      await sendEvents(call, from, cut, total);
      fail(call, statusError(Status.UNAVAILABLE, "cut"));
    };
  }

  it("delivers the snapshot first, then resumes from lastSeen+1 without asking again", async () => {
    const N = 30;
    const server = await fake([snapshotThenCut(20, 20, N), snapshotThenCut(20, 25, N), serveAll(N)]);
    const snapshots: RunSnapshot[] = [];
    const seqs = await collect(client(server.address), { onSnapshot: (s) => snapshots.push(s) });
    assert.deepEqual(snapshots, [{ seq: 20n, data: { text: "as of 20" } }]);
    assert.deepEqual(seqs, range(21, N));
    assert.deepEqual(server.subscribes.map((s) => [s.fromSeq, s.snapshot]), [[1n, true], [21n, false], [26n, false]]);
  });

  it("without a snapshot that far, it is a plain subscription", async () => {
    const server = await fake([cutAt(4, 10, statusError(Status.UNAVAILABLE, "cut")), serveAll(10)]);
    let called = false;
    const seqs = await collect(client(server.address), { onSnapshot: () => (called = true) });
    assert.equal(called, false);
    assert.deepEqual(seqs, range(1, 10));
    assert.deepEqual(server.subscribes.map((s) => s.snapshot), [true, false]);
  });

  it("a subscription without onSnapshot does not ask for one", async () => {
    const server = await fake([serveAll(5)]);
    assert.deepEqual(await collect(client(server.address)), range(1, 5));
    assert.deepEqual(server.subscribes.map((s) => s.snapshot), [false]);
  });

  it("an error thrown by onSnapshot rejects the subscription as is, without a retry", async () => {
    const server = await fake([snapshotThenCut(3, 10, 10)]);
    // A transient-looking error (say, from a call the handler made) must not be retried.
    const cause = Object.assign(new Error("14 UNAVAILABLE: down"), { code: Status.UNAVAILABLE, details: "down", metadata: new Metadata() });
    const failing = new UnavailableError("down", { code: Status.UNAVAILABLE, cause });
    await assert.rejects(
      collect(client(server.address), {
        onSnapshot: () => {
          throw failing;
        },
      }),
      (err: unknown) => err === failing,
    );
    assert.equal(server.subscribes.length, 1);
  });
});
