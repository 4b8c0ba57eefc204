package runservice

import (
	"context"
	"errors"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	runservicev1 "github.com/runservice/runservice/clients/go/runservice/v1"
)

// Domain is the google.rpc.ErrorInfo domain of runservice's errors.
const Domain = "runservice"

// Error is a failed call: the gRPC status code and message and, when the
// status carries a google.rpc.ErrorInfo of domain "runservice", its Reason
// (e.g. "RUN_NOT_FOUND", the ErrorReason name without the ERROR_REASON_
// prefix) and Metadata (e.g. {"run_id": "..."}).
//
// Compare with the sentinels using errors.Is (errors.Is(err, ErrRunNotFound)),
// or read the fields with errors.As. status.Code(err) and status.FromError(err)
// work too. When the call failed because its context was cancelled or timed
// out, errors.Is(err, context.Canceled / context.DeadlineExceeded) is true.
type Error struct {
	Code     codes.Code
	Message  string
	Reason   string
	Metadata map[string]string

	status *status.Status
	cause  error
}

// Error formats the code, reason and message.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("runservice: ")
	b.WriteString(codeName(e.Code))
	if e.Reason != "" {
		b.WriteString(" (")
		b.WriteString(e.Reason)
		b.WriteString(")")
	}
	if e.Message != "" {
		b.WriteString(": ")
		b.WriteString(e.Message)
	}
	return b.String()
}

// GRPCStatus returns the status the server sent, so that status.Code and
// status.FromError see through an *Error.
func (e *Error) GRPCStatus() *status.Status {
	if e.status != nil {
		return e.status
	}
	return status.New(e.Code, e.Message)
}

// Unwrap returns the context's error when the call ended because its context
// was done, and nil otherwise.
func (e *Error) Unwrap() error { return e.cause }

// Is matches a sentinel: by Reason when the target has one (and by Code too
// when the target sets it), otherwise by Code.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	if !ok {
		return false
	}
	if t.Reason != "" {
		return t.Reason == e.Reason && (t.Code == codes.OK || t.Code == e.Code)
	}
	return t.Code != codes.OK && t.Code == e.Code
}

// ErrorReason is Reason as the proto enum (ERROR_REASON_UNSPECIFIED when the
// error carries no runservice reason, or one this client does not know).
func (e *Error) ErrorReason() runservicev1.ErrorReason {
	if e.Reason == "" {
		return runservicev1.ErrorReason_ERROR_REASON_UNSPECIFIED
	}
	return runservicev1.ErrorReason(runservicev1.ErrorReason_value["ERROR_REASON_"+e.Reason])
}

func codeName(c codes.Code) string {
	// codes.Code.String() gives "NotFound"; use the canonical gRPC names.
	names := map[codes.Code]string{
		codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN",
		codes.InvalidArgument: "INVALID_ARGUMENT", codes.DeadlineExceeded: "DEADLINE_EXCEEDED",
		codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
		codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
		codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED",
		codes.OutOfRange: "OUT_OF_RANGE", codes.Unimplemented: "UNIMPLEMENTED",
		codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE", codes.DataLoss: "DATA_LOSS",
		codes.Unauthenticated: "UNAUTHENTICATED",
	}
	if n, ok := names[c]; ok {
		return n
	}
	return c.String()
}

func reasonSentinel(code codes.Code, r runservicev1.ErrorReason) *Error {
	return &Error{Code: code, Reason: strings.TrimPrefix(r.String(), "ERROR_REASON_")}
}

// Sentinels for errors.Is, one per ErrorReason a call can fail with.
var (
	ErrRunNotFound        = reasonSentinel(codes.NotFound, runservicev1.ErrorReason_ERROR_REASON_RUN_NOT_FOUND)
	ErrUnknownAgent       = reasonSentinel(codes.InvalidArgument, runservicev1.ErrorReason_ERROR_REASON_UNKNOWN_AGENT)
	ErrInvalidInput       = reasonSentinel(codes.InvalidArgument, runservicev1.ErrorReason_ERROR_REASON_INVALID_INPUT)
	ErrInvalidPageToken   = reasonSentinel(codes.InvalidArgument, runservicev1.ErrorReason_ERROR_REASON_INVALID_PAGE_TOKEN)
	ErrInvalidArgument    = reasonSentinel(codes.InvalidArgument, runservicev1.ErrorReason_ERROR_REASON_INVALID_ARGUMENT)
	ErrSeqOutOfRange      = reasonSentinel(codes.OutOfRange, runservicev1.ErrorReason_ERROR_REASON_SEQ_OUT_OF_RANGE)
	ErrThreadBusy         = reasonSentinel(codes.FailedPrecondition, runservicev1.ErrorReason_ERROR_REASON_THREAD_BUSY)
	ErrRunActive          = reasonSentinel(codes.FailedPrecondition, runservicev1.ErrorReason_ERROR_REASON_RUN_ACTIVE)
	ErrRequestIDReused    = reasonSentinel(codes.AlreadyExists, runservicev1.ErrorReason_ERROR_REASON_REQUEST_ID_REUSED)
	ErrTooManyActiveRuns  = reasonSentinel(codes.ResourceExhausted, runservicev1.ErrorReason_ERROR_REASON_TOO_MANY_ACTIVE_RUNS)
	ErrTooManyStreams     = reasonSentinel(codes.ResourceExhausted, runservicev1.ErrorReason_ERROR_REASON_TOO_MANY_STREAMS)
	ErrServerDraining     = reasonSentinel(codes.Unavailable, runservicev1.ErrorReason_ERROR_REASON_SERVER_DRAINING)
	ErrAdminOnly          = reasonSentinel(codes.PermissionDenied, runservicev1.ErrorReason_ERROR_REASON_ADMIN_ONLY)
	ErrTokenExpired       = reasonSentinel(codes.Unauthenticated, runservicev1.ErrorReason_ERROR_REASON_TOKEN_EXPIRED)
	ErrCredentialsMissing = reasonSentinel(codes.Unauthenticated, runservicev1.ErrorReason_ERROR_REASON_CREDENTIALS_MISSING)
	ErrCredentialsInvalid = reasonSentinel(codes.Unauthenticated, runservicev1.ErrorReason_ERROR_REASON_CREDENTIALS_INVALID)
	ErrInternal           = reasonSentinel(codes.Internal, runservicev1.ErrorReason_ERROR_REASON_INTERNAL_ERROR)
	ErrWatchLagged        = reasonSentinel(codes.Aborted, runservicev1.ErrorReason_ERROR_REASON_WATCH_LAGGED)
	// ErrRunEnded: SendInput to a run that has ended (it takes no more input).
	ErrRunEnded = reasonSentinel(codes.FailedPrecondition, runservicev1.ErrorReason_ERROR_REASON_RUN_ENDED)
	// ErrExternalRun: SendInput to an external run, which has no agent to take it.
	ErrExternalRun = reasonSentinel(codes.FailedPrecondition, runservicev1.ErrorReason_ERROR_REASON_EXTERNAL_RUN)
	// ErrNotExternal: AppendEvents or CloseRun on a run that has an agent.
	ErrNotExternal = reasonSentinel(codes.FailedPrecondition, runservicev1.ErrorReason_ERROR_REASON_NOT_EXTERNAL)
	// ErrStreamClosed: AppendEvents to an external run that is closed
	// (Metadata "last_seq" is its final position).
	ErrStreamClosed = reasonSentinel(codes.FailedPrecondition, runservicev1.ErrorReason_ERROR_REASON_STREAM_CLOSED)
	// ErrProducerEpochStale: a newer instance of the producer took over
	// (Metadata "epoch" is the current epoch).
	ErrProducerEpochStale = reasonSentinel(codes.FailedPrecondition, runservicev1.ErrorReason_ERROR_REASON_PRODUCER_EPOCH_STALE)
	// ErrProducerSeqGap: the producer's seq is not the next one (Metadata
	// "expected_seq" and "received_seq").
	ErrProducerSeqGap = reasonSentinel(codes.FailedPrecondition, runservicev1.ErrorReason_ERROR_REASON_PRODUCER_SEQ_GAP)
	// ErrRunFailed matches the error of a run whose agent failed unexpectedly
	// (not a call status; see RunError).
	ErrRunFailed = &Error{Reason: "RUN_FAILED"}
)

// Code-only sentinels, for failures without a runservice reason.
var (
	// ErrUnavailable matches any UNAVAILABLE status (server down, restarting
	// or draining).
	ErrUnavailable = &Error{Code: codes.Unavailable}
	// ErrUnauthenticated matches any UNAUTHENTICATED status.
	ErrUnauthenticated = &Error{Code: codes.Unauthenticated}
)

// toError turns a gRPC error into an *Error. ctx is the call's context: when
// it is done and the code says so, the *Error wraps ctx.Err().
func toError(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return err
	}
	st, ok := status.FromError(err)
	if !ok {
		st = status.New(codes.Unknown, err.Error())
	}
	e = FromStatus(st)
	if ctx != nil && (e.Code == codes.Canceled || e.Code == codes.DeadlineExceeded) {
		if ctxErr := ctx.Err(); ctxErr != nil {
			e.cause = ctxErr
		} else if dl, ok := ctx.Deadline(); ok && e.Code == codes.DeadlineExceeded && !time.Now().Before(dl) {
			// gRPC noticed the deadline a moment before the context did.
			e.cause = context.DeadlineExceeded
		}
	}
	return e
}

// FromStatus builds an *Error from a gRPC status, reading the first
// google.rpc.ErrorInfo of domain "runservice" among its details.
func FromStatus(st *status.Status) *Error {
	e := &Error{Code: st.Code(), Message: st.Message(), status: st}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetDomain() == Domain {
			e.Reason = info.GetReason()
			e.Metadata = info.GetMetadata()
			break
		}
	}
	return e
}

// RunError returns the error of a finished run (Run.Error) or of a terminal
// event (RunEvent.Error) as an *Error, or nil when there is none (the run
// succeeded or is still active). The reason of an unexpected agent failure is
// "RUN_FAILED" (ErrRunFailed), with the server log's "error_id" in Metadata.
func RunError(st *rpcstatus.Status) *Error {
	if st == nil || (st.GetCode() == 0 && st.GetMessage() == "" && len(st.GetDetails()) == 0) {
		return nil
	}
	return FromStatus(status.FromProto(st))
}
