/**
 * An in-process fake RunService on a loopback port, scripted per Subscribe attempt, and
 * a TCP proxy in front of it that can cut every connection (a connection reset).
 */
import net from "node:net";

import {
  Metadata,
  Server,
  ServerCredentials,
  status as Status,
  type ServerWritableStream,
  type ServiceError,
  type UntypedHandleCall,
  type sendUnaryData,
  type ServerUnaryCall,
} from "@grpc/grpc-js";

import { ErrorInfo } from "../src/gen/google/rpc/error_details";
import { Status as RpcStatus } from "../src/gen/google/rpc/status";
import { RunState, type RunEvent } from "../src/gen/runservice/v1/run";
import {
  RunServiceService,
  type SubscribeRequest,
  type SubscribeResponse,
} from "../src/gen/runservice/v1/run_service";

export type SubscribeCall = ServerWritableStream<SubscribeRequest, SubscribeResponse>;

/** What one Subscribe attempt does; `attempt` counts from 0. */
export type SubscribeScript = (call: SubscribeCall, fromSeq: bigint, attempt: number) => Promise<void> | void;

/** A unary handler: returns the response or throws a ServiceError-like object. */
export type UnaryScript = (request: any, metadata: Metadata) => Promise<unknown> | unknown;

/** The `n`-th event of a ticker-like log of `total` events: RUNNING, ticks, SUCCEEDED. */
export function makeEvent(seq: number, total: number, runId = "run-1"): RunEvent {
  const base: RunEvent = {
    runId,
    seq: BigInt(seq),
    time: new Date(1_700_000_000_000 + seq),
    type: "tick",
    state: RunState.RUN_STATE_UNSPECIFIED,
    error: undefined,
    resumedFromSeq: 0n,
  };
  if (seq === 1) return { ...base, type: "run.state", state: RunState.RUN_STATE_RUNNING };
  if (seq === total) return { ...base, type: "run.state", state: RunState.RUN_STATE_SUCCEEDED, data: { count: total - 2 } };
  return { ...base, data: { i: seq - 1 } };
}

/** A status with a runservice ErrorInfo in `grpc-status-details-bin`. */
export function statusError(
  code: Status,
  details: string,
  info?: { reason: string; domain?: string; metadata?: Record<string, string> },
): Partial<ServiceError> {
  const metadata = new Metadata();
  if (info) {
    const errorInfo = ErrorInfo.encode({
      reason: info.reason,
      domain: info.domain ?? "runservice",
      metadata: info.metadata ?? {},
    }).finish();
    const status = RpcStatus.encode({
      code,
      message: details,
      details: [{ typeUrl: "type.googleapis.com/google.rpc.ErrorInfo", value: Buffer.from(errorInfo) }],
    }).finish();
    metadata.set("grpc-status-details-bin", Buffer.from(status));
  }
  return { code, details, metadata };
}

/** Writes events `from..to` (inclusive) in batches of `batch`, waiting for each write. */
export async function sendEvents(call: SubscribeCall, from: number, to: number, total: number, batch = 1): Promise<void> {
  for (let seq = from; seq <= to; seq += batch) {
    const events: RunEvent[] = [];
    for (let s = seq; s <= Math.min(to, seq + batch - 1); s++) events.push(makeEvent(s, total));
    await new Promise<void>((resolve) => {
      if (call.write({ events, snapshot: undefined })) resolve();
      else call.once("drain", () => resolve());
    });
  }
}

/** Writes a response carrying only a snapshot as of `seq`, waiting for the write. */
export async function sendSnapshot(call: SubscribeCall, seq: number, data: unknown): Promise<void> {
  await new Promise<void>((resolve) => {
    if (call.write({ events: [], snapshot: { seq: BigInt(seq), data } })) resolve();
    else call.once("drain", () => resolve());
  });
}

/** Ends the call with a non-OK status. */
export function fail(call: SubscribeCall, error: Partial<ServiceError>): void {
  call.emit("error", error);
}

/** The default Subscribe: the whole log from `fromSeq`, then OK. */
export function serveAll(total: number, batch = 1): SubscribeScript {
  return async (call, fromSeq) => {
    await sendEvents(call, Math.max(1, Number(fromSeq)), total, total, batch);
    call.end();
  };
}

export interface FakeOptions {
  /** One script per Subscribe attempt; the last one repeats. */
  subscribe?: SubscribeScript[];
  /** Unary handlers by method name (startRun, getRun, ...). */
  unary?: Record<string, UnaryScript>;
}

/** The fake server. `subscribes` records every Subscribe's from_seq, snapshot flag and authorization. */
export class FakeRunService {
  readonly subscribes: Array<{ fromSeq: bigint; snapshot: boolean; authorization: string | undefined }> = [];
  readonly unaryCalls: Array<{ method: string; request: unknown; authorization: string | undefined }> = [];
  readonly cancelled: number[] = [];
  server: Server | undefined;
  port = 0;

  constructor(public options: FakeOptions = {}) {}

  /** Binds to 127.0.0.1 (port 0: any free port; the same port on a restart). */
  async start(port = this.port): Promise<number> {
    const server = new Server();
    const handlers: Record<string, UntypedHandleCall> = {};
    for (const name of Object.keys(RunServiceService)) {
      handlers[name] = this.unaryHandler(name);
    }
    handlers.subscribe = (call: SubscribeCall) => void this.handleSubscribe(call);
    server.addService(RunServiceService, handlers);
    this.port = await new Promise<number>((resolve, reject) => {
      server.bindAsync(`127.0.0.1:${port}`, ServerCredentials.createInsecure(), (err, bound) =>
        err ? reject(err) : resolve(bound),
      );
    });
    this.server = server;
    return this.port;
  }

  /** Kills the server at once: every connection is dropped, streams end without a status. */
  kill(): void {
    this.server?.forceShutdown();
    this.server = undefined;
  }

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  private async handleSubscribe(call: SubscribeCall): Promise<void> {
    const attempt = this.subscribes.length;
    const fromSeq = call.request.fromSeq;
    this.subscribes.push({
      fromSeq,
      snapshot: call.request.snapshot,
      authorization: call.metadata.get("authorization")[0] as string | undefined,
    });
    call.on("cancelled", () => this.cancelled.push(attempt));
    const scripts = this.options.subscribe ?? [serveAll(10)];
    const script = scripts[Math.min(attempt, scripts.length - 1)]!;
    try {
      await script(call, fromSeq, attempt);
    } catch {
      // the client went away mid-write
    }
  }

  private unaryHandler(name: string): UntypedHandleCall {
    return async (call: ServerUnaryCall<unknown, unknown>, callback: sendUnaryData<unknown>) => {
      this.unaryCalls.push({
        method: name,
        request: call.request,
        authorization: call.metadata.get("authorization")[0] as string | undefined,
      });
      const script = this.options.unary?.[name];
      if (!script) {
        callback({ code: Status.UNIMPLEMENTED, details: `${name} is not scripted` });
        return;
      }
      try {
        callback(null, await script(call.request, call.metadata));
      } catch (err) {
        callback(err as Partial<ServiceError>);
      }
    };
  }
}

/** A TCP proxy on a loopback port that forwards to `target` and can reset every connection. */
export class CuttingProxy {
  private readonly sockets = new Set<net.Socket>();
  private server: net.Server | undefined;
  port = 0;

  constructor(private readonly targetPort: number) {}

  async start(): Promise<number> {
    this.server = net.createServer((client) => {
      const upstream = net.connect(this.targetPort, "127.0.0.1");
      for (const socket of [client, upstream]) {
        this.sockets.add(socket);
        socket.on("close", () => this.sockets.delete(socket));
        socket.on("error", () => undefined);
      }
      client.pipe(upstream);
      upstream.pipe(client);
      client.on("close", () => upstream.destroy());
      upstream.on("close", () => client.destroy());
    });
    await new Promise<void>((resolve) => this.server!.listen(0, "127.0.0.1", resolve));
    this.port = (this.server.address() as net.AddressInfo).port;
    return this.port;
  }

  /** Resets every open connection (RST, not FIN). */
  cutAll(): void {
    for (const socket of this.sockets) socket.resetAndDestroy();
  }

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  async close(): Promise<void> {
    this.cutAll();
    await new Promise<void>((resolve) => this.server?.close(() => resolve()) ?? resolve());
  }
}
