/**
 * @runservice/client: the TypeScript (Node.js) client of runservice.
 *
 * `RunClient` wraps every RunService call, pages through ListRuns, follows a run with a
 * Subscribe that resumes itself (optionally from the run's snapshot), sends input to a
 * run's agent with safe retries, and turns failures into typed `RunServiceError`s. The
 * generated messages are re-exported; int64 fields (`seq`, `lastSeq`, `fromSeq`) are
 * `bigint`s.
 */
export {
  RunClient,
  TERMINAL_STATES,
  RUN_STATE_EVENT,
  isTerminalEvent,
  isLoopbackAddress,
  stateName,
  type AppendEventsOptions,
  type ListAllRunsOptions,
  type ListRunsOptions,
  type RunClientOptions,
  type RetryInfo,
  type RunFilter,
  type SendInputOptions,
  type StartRunOptions,
  type SubscribeOptions,
  type TlsOptions,
  type TokenProvider,
  type WatchRunsOptions,
} from "./client";
export {
  AbortedError,
  AlreadyExistsError,
  CancelledError,
  DeadlineExceededError,
  DOMAIN,
  FailedPreconditionError,
  InternalError,
  InvalidArgumentError,
  NotFoundError,
  OutOfRangeError,
  PermissionDeniedError,
  ResourceExhaustedError,
  RunServiceError,
  UnauthenticatedError,
  UnavailableError,
  errorInfo,
  fromServiceError,
  isTransient,
  statusDetails,
  type RunServiceErrorInit,
} from "./errors";
export { DEFAULT_RETRY_POLICY, backoffMs, type RetryPolicy } from "./retry";
export {
  Agent,
  MultitaskStrategy,
  Run,
  RunEvent,
  RunProgress,
  RunSnapshot,
  RunState,
  multitaskStrategyToJSON,
  runStateToJSON,
} from "./gen/runservice/v1/run";
export { ErrorReason, errorReasonToJSON } from "./gen/runservice/v1/error_reason";
export {
  AppendEventsResponse,
  EventInput,
  ListRunsResponse,
  RunChange,
  RunServiceClient,
  RunServiceService,
  SendInputResponse,
  SubscribeRequest,
  SubscribeResponse,
  WatchRunsResponse,
  runChangeToJSON,
  type RunServiceServer,
} from "./gen/runservice/v1/run_service";
export {
  WebhookAttempt,
  WebhookDelivery,
  WebhookDeliveryState,
  WebhookTarget,
  webhookDeliveryStateToJSON,
  webhookTargetToJSON,
} from "./gen/runservice/v1/webhook";
export { status } from "@grpc/grpc-js";
