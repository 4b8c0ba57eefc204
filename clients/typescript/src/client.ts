/**
 * RunClient: every RunService call as a promise, pagination, typed errors, and a
 * Subscribe that resumes itself.
 *
 * `subscribe()` is the promise of gap-free resume made for the caller: when the stream
 * breaks for a transient reason (the server restarts, a proxy cuts the connection, a
 * per-attempt deadline passes) it reconnects from `lastSeen + 1` with jittered
 * exponential backoff, and drops anything it has already delivered, so the caller sees
 * each seq exactly once, in order, until the run's terminal event. With `onSnapshot` it
 * starts from the run's latest snapshot instead of replaying the events it covers.
 *
 * `sendInput()` sends input to a run's agent under one request id per call (a new UUID
 * unless the caller gives one), so its retries on UNAVAILABLE never deliver it twice.
 */
import { randomUUID } from "node:crypto";

import {
  credentials as grpcCredentials,
  Metadata,
  status as Status,
  type CallOptions,
  type ChannelCredentials,
  type ClientOptions,
  type ClientReadableStream,
  type ServiceError,
} from "@grpc/grpc-js";

import {
  errorInfo,
  fromServiceError,
  isServiceError,
  isTransient,
  makeError,
  RunServiceError,
  statusDetails,
} from "./errors";
import { backoffMs, retryPolicy, shouldGiveUp, sleep, type RetryPolicy } from "./retry";
import {
  type Agent,
  MultitaskStrategy,
  type Run,
  type RunEvent,
  type RunSnapshot,
  RunState,
} from "./gen/runservice/v1/run";
import {
  AppendEventsRequest,
  type AppendEventsResponse,
  CloseRunRequest,
  DeleteRunRequest,
  type EventInput,
  GetRunRequest,
  ListAgentsRequest,
  ListRunsRequest,
  type ListRunsResponse,
  ListWebhookDeliveriesRequest,
  RunServiceClient,
  SendInputRequest,
  StartRunRequest,
  StopRunRequest,
  SubscribeRequest,
  type SubscribeResponse,
  WatchRunsRequest,
  type WatchRunsResponse,
} from "./gen/runservice/v1/run_service";
import { type WebhookDelivery } from "./gen/runservice/v1/webhook";

/** Returns the bearer token to send; called before every call and every reconnect. */
export type TokenProvider = () => string | Promise<string>;

/** TLS for the channel; with `privateKey` and `certChain`, a client certificate (mTLS). */
export interface TlsOptions {
  /** PEM root certificates; the system's roots when omitted. */
  rootCerts?: Buffer;
  /** PEM private key of the client certificate. */
  privateKey?: Buffer;
  /** PEM client certificate chain. */
  certChain?: Buffer;
  /** The name to verify the server's certificate against, if not the address's host. */
  serverName?: string;
}

/** Options of a RunClient. */
export interface RunClientOptions {
  /** A fixed bearer token, sent as `authorization: Bearer <token>`. */
  token?: string;
  /** Called before every call and every reconnect (takes precedence over `token`). */
  tokenProvider?: TokenProvider;
  /** Use TLS (`true`: system roots). Without it the channel is plaintext. */
  tls?: boolean | TlsOptions;
  /**
   * Allow a plaintext channel to an address that is not on loopback. Off by default, so a
   * bearer token is never sent in clear across a network by accident.
   */
  insecure?: boolean;
  /** Backoff and bounds of resumed streams and retried idempotent calls. */
  retry?: Partial<RetryPolicy>;
  /** Deadline of unary calls, in ms (default 30000; 0: none). */
  callTimeoutMs?: number;
  /** Deadline of each attempt of a stream, in ms (default: none). */
  streamTimeoutMs?: number;
  /** Extra grpc-js channel options; they override the client's defaults. */
  channelOptions?: Partial<ClientOptions>;
}

/** The filters of ListRuns and WatchRuns. */
export interface RunFilter {
  /** Only runs in one of these states. */
  states?: RunState[];
  /** Only runs of this agent. */
  agent?: string;
  /** Only runs of this thread. */
  threadId?: string;
  /** Only runs carrying all of these labels with these values. */
  labels?: Record<string, string>;
  /** Every user's runs (admins only). */
  allUsers?: boolean;
  /**
   * Only runs whose agent waits for input now (`Run.waitingForInput`). A watch reports a
   * run that stops waiting once more, with `waitingForInput` false.
   */
  waitingForInput?: boolean;
}

/** One ListRuns page request. */
export interface ListRunsOptions extends RunFilter {
  /** Page size: default 50 on the server, at most 1000. */
  pageSize?: number;
  /** The `nextPageToken` of the previous page. */
  pageToken?: string;
}

/** Options of listAllRuns. */
export interface ListAllRunsOptions extends RunFilter {
  /** Page size of each ListRuns call (default 100). */
  pageSize?: number;
  /** Stop after this many runs. */
  limit?: number;
}

/** Options of StartRun. */
export interface StartRunOptions {
  /** The thread the run belongs to (scoped to the caller). */
  threadId?: string;
  /** Idempotency key: a retry with the same key returns the first run. Enables retries on UNAVAILABLE. */
  requestId?: string;
  /** Free-form labels. */
  labels?: Record<string, string>;
  /** The run's time limit, in seconds. */
  timeoutSeconds?: number;
  /** What to do when the thread already has an active run (default REJECT). */
  multitaskStrategy?: MultitaskStrategy;
}

/** Options of subscribe. */
export interface SubscribeOptions {
  /** The first seq to deliver (inclusive); 0 or 1 means from the start (default 1). */
  fromSeq?: number | bigint;
  /** Cancels the subscription: the iteration rejects with the signal's reason. */
  signal?: AbortSignal;
  /** Resume after transient failures (default true). With false, any failure is thrown. */
  resume?: boolean;
  /** Overrides the client's retry policy for this subscription. */
  retry?: Partial<RetryPolicy>;
  /** Called before each reconnect, e.g. to log it. */
  onRetry?: (info: RetryInfo) => void;
  /**
   * Asks for the run's latest snapshot (`RunSnapshot { seq, data }`: the state a client
   * would have after applying every event up to `seq`). When the run has one covering
   * `fromSeq - 1` or later, it is passed here (and awaited) before any event, and the
   * events then start at its `seq + 1`; otherwise it is not called and the events start at
   * `fromSeq`. Once the first response has arrived, reconnects resume from the last seq
   * seen + 1 without asking again, so it is called at most once. If it throws, the
   * subscription rejects with that error.
   */
  onSnapshot?: (snapshot: RunSnapshot) => unknown;
}

/** Options of sendInput. */
export interface SendInputOptions {
  /**
   * Idempotency key: calls with the same key and input append one `input` event (each
   * returns it); the same key with another input is ALREADY_EXISTS (REQUEST_ID_REUSED).
   * Default: a new random UUID per call.
   */
  requestId?: string;
}

/** Options of appendEvents. */
export interface AppendEventsOptions {
  /** Makes the append idempotent (and retried on UNAVAILABLE): the producer's name in the run. */
  producerId?: string;
  /** The producer's epoch: a new instance uses a higher one, fencing the older (PRODUCER_EPOCH_STALE). */
  producerEpoch?: number | bigint;
  /** The producer's seq in its epoch: 0, 1, 2, … (a gap is PRODUCER_SEQ_GAP). */
  producerSeq?: number | bigint;
  /** End the run SUCCEEDED after the events. */
  close?: boolean;
}

/** What `onRetry` is told before a reconnect. */
export interface RetryInfo {
  /** Consecutive failures so far (1 for the first retry). */
  attempt: number;
  /** The backoff before the reconnect, in ms. */
  delayMs: number;
  /** The seq the reconnect asks for: last delivered + 1. */
  fromSeq: bigint;
  /** The transient failure. */
  error: RunServiceError;
}

/** Options of watchRuns. */
export interface WatchRunsOptions extends RunFilter {
  /** Cancels the watch: the iteration rejects with the signal's reason. */
  signal?: AbortSignal;
}

/** The terminal run states. */
export const TERMINAL_STATES: ReadonlySet<RunState> = new Set([
  RunState.RUN_STATE_SUCCEEDED,
  RunState.RUN_STATE_FAILED,
  RunState.RUN_STATE_STOPPED,
  RunState.RUN_STATE_INTERRUPTED,
  RunState.RUN_STATE_TIMED_OUT,
]);

/** The lifecycle event type. */
export const RUN_STATE_EVENT = "run.state";

/** True for the event that ends a run's log: a `run.state` event with a terminal state. */
export function isTerminalEvent(event: RunEvent): boolean {
  return event.type === RUN_STATE_EVENT && TERMINAL_STATES.has(event.state);
}

/** The state's name without the RUN_STATE_ prefix, e.g. "SUCCEEDED". */
export function stateName(state: RunState): string {
  const name = RunState[state] as string | undefined;
  return name ? name.replace(/^RUN_STATE_/, "") : String(state);
}

// Reconnect quickly after a server restart: grpc's default backoff grows to 120 s.
const DEFAULT_CHANNEL_OPTIONS: Partial<ClientOptions> = {
  "grpc.initial_reconnect_backoff_ms": 100,
  "grpc.min_reconnect_backoff_ms": 100,
  "grpc.max_reconnect_backoff_ms": 2000,
  "grpc.keepalive_time_ms": 30_000,
  "grpc.keepalive_timeout_ms": 10_000,
  "grpc.max_receive_message_length": 64 * 1024 * 1024,
};

/** True when `address` (HOST:PORT, [V6]:PORT, unix:…) is on this machine. */
export function isLoopbackAddress(address: string): boolean {
  if (address.startsWith("unix:")) return true;
  let host = address.replace(/^(dns|ipv4|ipv6):(\/\/[^/]*\/)?/, "");
  if (host.startsWith("[")) host = host.slice(1, host.indexOf("]"));
  else if (host.split(":").length === 2) host = host.slice(0, host.lastIndexOf(":"));
  host = host.toLowerCase();
  return host === "localhost" || host === "::1" || /^127\.\d+\.\d+\.\d+$/.test(host);
}

function toSeq(value: number | bigint | undefined): bigint {
  if (value === undefined) return 1n;
  const seq = typeof value === "bigint" ? value : BigInt(Math.trunc(value));
  return seq < 1n ? 1n : seq;
}

type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => unknown;

/** A connection to a runservice server. Close it with `close()`. */
export class RunClient {
  /** The generated grpc-js client, for anything this class does not wrap. */
  readonly stub: RunServiceClient;
  /** The retry policy in force. */
  readonly retry: RetryPolicy;
  private readonly token: string | undefined;
  private readonly tokenProvider: TokenProvider | undefined;
  private readonly callTimeoutMs: number;
  private readonly streamTimeoutMs: number | undefined;

  constructor(address: string, options: RunClientOptions = {}) {
    let creds: ChannelCredentials;
    const channelOptions: Partial<ClientOptions> = { ...DEFAULT_CHANNEL_OPTIONS };
    if (options.tls) {
      const tls: TlsOptions = options.tls === true ? {} : options.tls;
      creds = grpcCredentials.createSsl(tls.rootCerts ?? null, tls.privateKey ?? null, tls.certChain ?? null);
      if (tls.serverName) {
        channelOptions["grpc.ssl_target_name_override"] = tls.serverName;
        channelOptions["grpc.default_authority"] = tls.serverName;
      }
    } else {
      if (!options.insecure && !isLoopbackAddress(address)) {
        throw new Error(
          `refusing a plaintext channel to ${address}, which is not on loopback: pass tls, or insecure: true`,
        );
      }
      creds = grpcCredentials.createInsecure();
    }
    Object.assign(channelOptions, options.channelOptions ?? {});
    this.stub = new RunServiceClient(address, creds, channelOptions);
    this.token = options.token;
    this.tokenProvider = options.tokenProvider;
    this.retry = retryPolicy(options.retry);
    this.callTimeoutMs = options.callTimeoutMs ?? 30_000;
    this.streamTimeoutMs = options.streamTimeoutMs;
  }

  /** Closes the channel; calls in flight are cancelled. */
  close(): void {
    this.stub.close();
  }

  // -- calls ---------------------------------------------------------------------------

  /** Starts a run and returns it; retried on UNAVAILABLE only when `requestId` is set. */
  async startRun(agent: string, input?: Record<string, unknown>, options: StartRunOptions = {}): Promise<Run> {
    const request = StartRunRequest.fromPartial({
      agent,
      input: input ?? {},
      threadId: options.threadId ?? "",
      requestId: options.requestId ?? "",
      labels: options.labels ?? {},
      multitaskStrategy: options.multitaskStrategy ?? MultitaskStrategy.MULTITASK_STRATEGY_UNSPECIFIED,
      timeout:
        options.timeoutSeconds === undefined ? undefined : durationOf(options.timeoutSeconds),
    });
    const response = await this.unary(this.stub.startRun, request, Boolean(options.requestId));
    return mustHaveRun(response.run);
  }

  /** The run (retried on UNAVAILABLE). */
  async getRun(runId: string): Promise<Run> {
    const response = await this.unary(this.stub.getRun, GetRunRequest.fromPartial({ runId }), true);
    return mustHaveRun(response.run);
  }

  /** One page of the caller's runs, newest first (retried on UNAVAILABLE). */
  async listRuns(options: ListRunsOptions = {}): Promise<ListRunsResponse> {
    const request = ListRunsRequest.fromPartial({
      pageSize: options.pageSize ?? 0,
      pageToken: options.pageToken ?? "",
      ...filterFields(options),
    });
    return this.unary(this.stub.listRuns, request, true);
  }

  /** Every matching run, newest first, fetching pages as needed. */
  async *listAllRuns(options: ListAllRunsOptions = {}): AsyncGenerator<Run, void, undefined> {
    let pageToken = "";
    let seen = 0;
    const { limit, pageSize = 100, ...filter } = options;
    if (limit !== undefined && limit <= 0) return;
    for (;;) {
      const page = await this.listRuns({ ...filter, pageSize, pageToken });
      for (const run of page.runs) {
        yield run;
        seen += 1;
        if (limit !== undefined && seen >= limit) return;
      }
      pageToken = page.nextPageToken;
      if (!pageToken) return;
    }
  }

  /** Stops the run and returns it terminal (idempotent, so retried on UNAVAILABLE). */
  async stopRun(runId: string, reason = ""): Promise<Run> {
    const response = await this.unary(this.stub.stopRun, StopRunRequest.fromPartial({ runId, reason }), true);
    return mustHaveRun(response.run);
  }

  /**
   * Sends input (a JSON object) to the run, for its agent to receive in log order, and
   * returns the `input` event appended to its log. Retried on UNAVAILABLE under one
   * `requestId` (a new UUID unless given), so the agent never receives it twice. A run that
   * has ended rejects with FailedPreconditionError, reason `RUN_ENDED`; an external run
   * with reason `EXTERNAL_RUN`.
   */
  async sendInput(runId: string, input: Record<string, unknown>, options: SendInputOptions = {}): Promise<RunEvent> {
    const requestId = options.requestId || randomUUID();
    const request = SendInputRequest.fromPartial({ runId, input, requestId });
    const response = await this.unary(this.stub.sendInput, request, true);
    if (!response.event) {
      throw makeError("the server's response carries no event", { code: Status.INTERNAL });
    }
    return response.event;
  }

  /**
   * Appends `events` to an external run (agent `external`) as one unit and returns the
   * run's `lastSeq` after it (`duplicate` when a producer's retry was already taken).
   * Retried on UNAVAILABLE only with `producerId`, which makes it idempotent. A closed run
   * rejects with reason `STREAM_CLOSED`; a run with an agent with `NOT_EXTERNAL`.
   */
  async appendEvents(
    runId: string,
    events: Array<Partial<EventInput>>,
    options: AppendEventsOptions = {},
  ): Promise<AppendEventsResponse> {
    const request = AppendEventsRequest.fromPartial({
      runId,
      events,
      producerId: options.producerId ?? "",
      producerEpoch: BigInt(options.producerEpoch ?? 0),
      producerSeq: BigInt(options.producerSeq ?? 0),
      close: options.close ?? false,
    });
    return this.unary(this.stub.appendEvents, request, Boolean(options.producerId));
  }

  /**
   * Ends an external run SUCCEEDED, with `result` if given, and returns it; a run already
   * closed is returned as it is (so it is retried on UNAVAILABLE).
   */
  async closeRun(runId: string, result?: Record<string, unknown>): Promise<Run> {
    const response = await this.unary(this.stub.closeRun, CloseRunRequest.fromPartial({ runId, result }), true);
    return mustHaveRun(response.run);
  }

  /**
   * The webhook deliveries of a run that ended, each with its attempts (retried on
   * UNAVAILABLE); empty while it is active and when no webhook applies to it.
   */
  async listWebhookDeliveries(runId: string): Promise<WebhookDelivery[]> {
    const request = ListWebhookDeliveriesRequest.fromPartial({ runId });
    const response = await this.unary(this.stub.listWebhookDeliveries, request, true);
    return response.deliveries;
  }

  /** Deletes a finished run and its log. */
  async deleteRun(runId: string): Promise<void> {
    await this.unary(this.stub.deleteRun, DeleteRunRequest.fromPartial({ runId }), false);
  }

  /** The agents the server runs, sorted by name (retried on UNAVAILABLE). */
  async listAgents(): Promise<Agent[]> {
    const response = await this.unary(this.stub.listAgents, ListAgentsRequest.fromPartial({}), true);
    return response.agents;
  }

  /** The run once it is terminal (follows its log, resuming as needed). */
  async wait(runId: string, options: { signal?: AbortSignal } = {}): Promise<Run> {
    const run = await this.getRun(runId);
    if (!TERMINAL_STATES.has(run.state)) {
      for await (const _event of this.subscribe(runId, { fromSeq: run.lastSeq + 1n, signal: options.signal })) {
        // follow to the terminal event
      }
    }
    return this.getRun(runId);
  }

  /**
   * The snapshot of the caller's matching runs, the RUN_CHANGE_SNAPSHOT_END marker, then
   * every change (RUN_CHANGE_UPDATED when only `waitingForInput`, `progress` or `usage`
   * changed). Not resumed: after a failure, open a new watch (it starts with a fresh
   * snapshot).
   */
  async *watchRuns(options: WatchRunsOptions = {}): AsyncGenerator<WatchRunsResponse, void, undefined> {
    const { signal, ...filter } = options;
    signal?.throwIfAborted();
    const call = this.stub.watchRuns(WatchRunsRequest.fromPartial(filterFields(filter)), await this.metadata());
    yield* this.readStream<WatchRunsResponse>(call, signal);
  }

  /**
   * The run's events from `fromSeq`, each exactly once and in order, ending after the
   * terminal event (or when the server ends the stream with OK).
   *
   * With `resume` (the default), transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, a
   * connection reset or a stream cut without a runservice status; with a token provider,
   * also UNAUTHENTICATED with reason TOKEN_EXPIRED) reconnect with
   * `fromSeq = lastSeen + 1` after a jittered exponential backoff, and any event with a
   * seq already delivered is dropped. It gives up with UnavailableError after the retry
   * policy's bounds. Other failures throw their typed RunServiceError. Aborting `signal`
   * cancels the stream and rejects the iteration with the signal's reason; breaking out
   * of a `for await` loop cancels it too. With `onSnapshot`, see SubscribeOptions.
   */
  async *subscribe(runId: string, options: SubscribeOptions = {}): AsyncGenerator<RunEvent, void, undefined> {
    const { signal, resume = true } = options;
    const policy = options.retry ? retryPolicy({ ...this.retry, ...options.retry }) : this.retry;
    let cursor = toSeq(options.fromSeq);
    let attempt = 0;
    let lastProgress = Date.now();
    let askSnapshot = options.onSnapshot !== undefined;
    for (;;) {
      signal?.throwIfAborted();
      const request = SubscribeRequest.fromPartial({ runId, fromSeq: cursor, snapshot: askSnapshot });
      const callOptions: Partial<CallOptions> = {};
      if (this.streamTimeoutMs) callOptions.deadline = Date.now() + this.streamTimeoutMs;
      let call: ClientReadableStream<SubscribeResponse>;
      try {
        call = this.stub.subscribe(request, await this.metadata(), callOptions);
      } catch (err) {
        throw toClientError(err);
      }
      try {
        for await (const response of this.readStream<SubscribeResponse>(call, signal)) {
          const asked = askSnapshot;
          askSnapshot = false; // the caller has state now: a resume must only add to it
          if (asked && response.snapshot && options.onSnapshot) {
            cursor = response.snapshot.seq + 1n;
            attempt = 0;
            lastProgress = Date.now();
            await handOver(options.onSnapshot, response.snapshot);
          }
          for (const event of response.events) {
            if (event.seq < cursor) continue; // already delivered before the reconnect
            if (event.seq > cursor) {
              throw makeError(`the stream skipped from seq ${cursor} to seq ${event.seq}`, {
                code: Status.DATA_LOSS,
              });
            }
            cursor = event.seq + 1n;
            attempt = 0;
            lastProgress = Date.now();
            yield event;
            if (isTerminalEvent(event)) return;
          }
        }
        return; // ended OK: the log has nothing after `cursor`
      } catch (err) {
        if (err instanceof HandlerFailure) throw err.error;
        if (signal?.aborted) throw signal.reason;
        const cause = err instanceof RunServiceError ? err.cause : undefined;
        if (!resume || !isServiceError(cause) || !(isTransient(cause) || this.refreshable(cause))) throw err;
        const error = err as RunServiceError;
        attempt += 1;
        if (shouldGiveUp(policy, attempt, Date.now() - lastProgress)) {
          throw giveUp(error, attempt, Date.now() - lastProgress);
        }
        const delayMs = backoffMs(policy, attempt);
        options.onRetry?.({ attempt, delayMs, fromSeq: cursor, error });
        await sleep(delayMs, signal);
        await this.waitForChannel(policy, lastProgress + policy.giveUpAfterMs, signal);
      }
    }
  }

  // -- plumbing ------------------------------------------------------------------------

  /** An expired token ends a stream; with a token provider, the next attempt gets a new one. */
  private refreshable(err: ServiceError): boolean {
    if (!this.tokenProvider || err.code !== Status.UNAUTHENTICATED) return false;
    return errorInfo(statusDetails(err.metadata))?.reason === "TOKEN_EXPIRED";
  }

  /** The call metadata: the bearer token, fetched from the provider when there is one. */
  async metadata(): Promise<Metadata> {
    const metadata = new Metadata();
    const token = this.tokenProvider ? await this.tokenProvider() : this.token;
    if (token) metadata.set("authorization", `Bearer ${token}`);
    return metadata;
  }

  /**
   * Before a retry: waits until the channel is connected (asking it to connect), for at
   * most the policy's largest backoff and never past `giveUpAt` (epoch ms). grpc-js fails
   * calls at once while its channel is in TRANSIENT_FAILURE, so this lets the retry go out
   * as soon as the server is back instead of failing against the channel's own reconnect
   * backoff. Resolves false when the channel is still not ready (the retry then fails fast
   * and counts as a failure); rejects with the signal's reason on abort.
   */
  private waitForChannel(policy: RetryPolicy, giveUpAt: number, signal?: AbortSignal): Promise<boolean> {
    const deadline = Math.max(Date.now(), Math.min(giveUpAt, Date.now() + policy.maxBackoffMs));
    return new Promise((resolve, reject) => {
      if (signal?.aborted) {
        reject(signal.reason);
        return;
      }
      const onAbort = (): void => reject(signal?.reason);
      signal?.addEventListener("abort", onAbort, { once: true });
      this.stub.waitForReady(deadline, (error) => {
        signal?.removeEventListener("abort", onAbort);
        resolve(!error);
      });
    });
  }

  /** Reads a server stream, cancelling it on abort or early exit; errors become RunServiceErrors. */
  private async *readStream<T>(call: ClientReadableStream<T>, signal?: AbortSignal): AsyncGenerator<T, void, undefined> {
    const onAbort = (): void => call.cancel();
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      for await (const message of call as AsyncIterable<T>) {
        yield message;
      }
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      throw toClientError(err);
    } finally {
      signal?.removeEventListener("abort", onAbort);
      call.cancel();
    }
  }

  private async unary<Req, Res>(method: UnaryMethod<Req, Res>, request: Req, retry: boolean): Promise<Res> {
    const started = Date.now();
    let attempt = 0;
    for (;;) {
      const metadata = await this.metadata();
      const options: Partial<CallOptions> = {};
      if (this.callTimeoutMs > 0) options.deadline = Date.now() + this.callTimeoutMs;
      try {
        return await new Promise<Res>((resolve, reject) => {
          method.call(this.stub, request, metadata, options, (error, response) => {
            if (error) reject(error);
            else resolve(response);
          });
        });
      } catch (err) {
        if (!isServiceError(err)) throw err;
        attempt += 1;
        if (!retry || err.code !== Status.UNAVAILABLE || shouldGiveUp(this.retry, attempt, Date.now() - started)) {
          throw fromServiceError(err);
        }
        await sleep(backoffMs(this.retry, attempt));
        await this.waitForChannel(this.retry, started + this.retry.giveUpAfterMs);
      }
    }
  }
}

/** Carries an error thrown by a caller's handler through the resume logic untouched. */
class HandlerFailure {
  constructor(readonly error: unknown) {}
}

/** Calls a caller's handler, marking what it throws as the caller's own. */
async function handOver<T>(handler: (value: T) => unknown, value: T): Promise<void> {
  try {
    await handler(value);
  } catch (err) {
    throw new HandlerFailure(err);
  }
}

function giveUp(error: RunServiceError, attempt: number, idleMs: number): RunServiceError {
  return makeError(
    `gave up resuming after ${attempt} attempts and ${(idleMs / 1000).toFixed(1)}s without progress: ${error.details}`,
    {
      code: Status.UNAVAILABLE,
      reason: error.reason,
      domain: error.domain,
      metadata: error.metadata,
      trailers: error.trailers,
      cause: error,
    },
  );
}

function toClientError(err: unknown): unknown {
  return isServiceError(err) ? fromServiceError(err) : err;
}

function mustHaveRun(run: Run | undefined): Run {
  if (!run) {
    throw makeError("the server's response carries no run", { code: Status.INTERNAL });
  }
  return run;
}

function filterFields(filter: RunFilter): {
  states: RunState[];
  agent: string;
  threadId: string;
  labels: Record<string, string>;
  allUsers: boolean;
  waitingForInput: boolean;
} {
  return {
    states: filter.states ?? [],
    agent: filter.agent ?? "",
    threadId: filter.threadId ?? "",
    labels: filter.labels ?? {},
    allUsers: filter.allUsers ?? false,
    waitingForInput: filter.waitingForInput ?? false,
  };
}

function durationOf(seconds: number): { seconds: bigint; nanos: number } {
  const whole = Math.floor(seconds);
  return { seconds: BigInt(whole), nanos: Math.round((seconds - whole) * 1e9) };
}
