/**
 * Typed errors: one class per gRPC status code a caller may branch on, with the
 * `google.rpc.ErrorInfo` reason and metadata (domain `runservice`) read from the
 * `grpc-status-details-bin` trailer.
 */
import { Metadata, status as Status, type ServiceError } from "@grpc/grpc-js";

import { ErrorInfo } from "./gen/google/rpc/error_details";
import { Status as RpcStatus } from "./gen/google/rpc/status";

/** The ErrorInfo domain of runservice's errors. */
export const DOMAIN = "runservice";

const ERROR_INFO_TYPE_URL = "type.googleapis.com/google.rpc.ErrorInfo";
const STATUS_DETAILS_KEY = "grpc-status-details-bin";

/** What a RunServiceError is built from. */
export interface RunServiceErrorInit {
  /** The gRPC status code. */
  code: Status;
  /** The ErrorInfo reason, e.g. `RUN_NOT_FOUND`; "" when the status carries none. */
  reason?: string;
  /** The ErrorInfo metadata, e.g. `{ run_id: "…" }`, `{ last_seq: "12" }`, `{ error_id: "…" }`. */
  metadata?: Record<string, string>;
  /** The ErrorInfo domain ("runservice" when reason is set). */
  domain?: string;
  /** The call's trailing metadata, when the error came from a call. */
  trailers?: Metadata;
  /** The underlying error (the grpc-js ServiceError). */
  cause?: unknown;
}

/**
 * A RunService call failed. `code` is the gRPC status code (`codeName` its name),
 * `reason` the ErrorInfo reason or "", `metadata` the ErrorInfo metadata.
 */
export class RunServiceError extends Error {
  readonly code: Status;
  readonly reason: string;
  readonly domain: string;
  readonly metadata: Record<string, string>;
  /** The status message as the server sent it (without the code prefix). */
  readonly details: string;
  readonly trailers: Metadata | undefined;

  constructor(details: string, init: RunServiceErrorInit) {
    const codeName = Status[init.code] ?? String(init.code);
    const reason = init.reason ?? "";
    super(`${codeName}${reason ? ` (${reason})` : ""}: ${details}`, { cause: init.cause });
    this.name = new.target.name;
    this.code = init.code;
    this.reason = reason;
    this.domain = init.domain ?? "";
    this.metadata = init.metadata ?? {};
    this.details = details;
    this.trailers = init.trailers;
  }

  /** The status code's name, e.g. "NOT_FOUND". */
  get codeName(): string {
    return Status[this.code] ?? String(this.code);
  }
}

/** INVALID_ARGUMENT: a request field was refused (the reason says which kind). */
export class InvalidArgumentError extends RunServiceError {}
/** NOT_FOUND: the run does not exist or is not yours. */
export class NotFoundError extends RunServiceError {}
/** ALREADY_EXISTS: the request_id was used for a different request. */
export class AlreadyExistsError extends RunServiceError {}
/** FAILED_PRECONDITION: the thread is busy, or the run is still active. */
export class FailedPreconditionError extends RunServiceError {}
/** OUT_OF_RANGE: a cursor past the end of a run's log (metadata `last_seq`). */
export class OutOfRangeError extends RunServiceError {}
/** RESOURCE_EXHAUSTED: a cap on runs or streams, or a message too large. */
export class ResourceExhaustedError extends RunServiceError {}
/** UNAUTHENTICATED: missing, invalid or expired credentials. */
export class UnauthenticatedError extends RunServiceError {}
/** PERMISSION_DENIED: the request needs the admin role. */
export class PermissionDeniedError extends RunServiceError {}
/** UNAVAILABLE: the server is draining or unreachable (also: a resume that gave up). */
export class UnavailableError extends RunServiceError {}
/** DEADLINE_EXCEEDED: the call's deadline passed. */
export class DeadlineExceededError extends RunServiceError {}
/** ABORTED: e.g. a WatchRuns stream that fell behind; reopen it. */
export class AbortedError extends RunServiceError {}
/** INTERNAL: a server error; `metadata.error_id` finds it in the server log. */
export class InternalError extends RunServiceError {}
/** CANCELLED: the call was cancelled. */
export class CancelledError extends RunServiceError {}

const BY_CODE: Partial<Record<Status, new (details: string, init: RunServiceErrorInit) => RunServiceError>> = {
  [Status.INVALID_ARGUMENT]: InvalidArgumentError,
  [Status.NOT_FOUND]: NotFoundError,
  [Status.ALREADY_EXISTS]: AlreadyExistsError,
  [Status.FAILED_PRECONDITION]: FailedPreconditionError,
  [Status.OUT_OF_RANGE]: OutOfRangeError,
  [Status.RESOURCE_EXHAUSTED]: ResourceExhaustedError,
  [Status.UNAUTHENTICATED]: UnauthenticatedError,
  [Status.PERMISSION_DENIED]: PermissionDeniedError,
  [Status.UNAVAILABLE]: UnavailableError,
  [Status.DEADLINE_EXCEEDED]: DeadlineExceededError,
  [Status.ABORTED]: AbortedError,
  [Status.INTERNAL]: InternalError,
  [Status.CANCELLED]: CancelledError,
};

/** Builds the error class that matches `code`. */
export function makeError(details: string, init: RunServiceErrorInit): RunServiceError {
  const cls = BY_CODE[init.code] ?? RunServiceError;
  return new cls(details, init);
}

/** True when `err` looks like a grpc-js call error (it has a numeric status code). */
export function isServiceError(err: unknown): err is ServiceError {
  return (
    err instanceof Error &&
    typeof (err as Partial<ServiceError>).code === "number" &&
    "details" in err
  );
}

/** The google.rpc.Status in a call's `grpc-status-details-bin` trailer, if any. */
export function statusDetails(trailers: Metadata | undefined): RpcStatus | undefined {
  const values = trailers?.get(STATUS_DETAILS_KEY) ?? [];
  for (const value of values) {
    if (typeof value === "string") continue;
    try {
      return RpcStatus.decode(value);
    } catch {
      return undefined; // a malformed trailer is as good as none
    }
  }
  return undefined;
}

/** The runservice ErrorInfo of a status (the first ErrorInfo whose domain is "runservice"). */
export function errorInfo(status: RpcStatus | undefined): ErrorInfo | undefined {
  for (const detail of status?.details ?? []) {
    if (detail.typeUrl !== ERROR_INFO_TYPE_URL) continue;
    try {
      const info = ErrorInfo.decode(detail.value);
      if (info.domain === DOMAIN) return info;
    } catch {
      // not decodable: skip it
    }
  }
  return undefined;
}

/** The typed error for a failed grpc-js call. */
export function fromServiceError(err: ServiceError): RunServiceError {
  const info = errorInfo(statusDetails(err.metadata));
  return makeError(err.details || Status[err.code] || "call failed", {
    code: err.code,
    reason: info?.reason ?? "",
    domain: info?.domain ?? "",
    metadata: info ? { ...info.metadata } : {},
    trailers: err.metadata,
    cause: err,
  });
}

/**
 * True for failures a resumed stream (or a retried idempotent call) can ride through:
 * UNAVAILABLE and DEADLINE_EXCEEDED always; INTERNAL, UNKNOWN and CANCELLED only when they
 * come from the transport (a reset connection, a stream that ended without a status),
 * i.e. when the server attached no runservice ErrorInfo.
 */
export function isTransient(err: ServiceError): boolean {
  if (err.code === Status.UNAVAILABLE || err.code === Status.DEADLINE_EXCEEDED) return true;
  const transport = [Status.INTERNAL, Status.UNKNOWN, Status.CANCELLED];
  return transport.includes(err.code) && errorInfo(statusDetails(err.metadata)) === undefined;
}
