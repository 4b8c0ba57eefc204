package runservice

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"

	runservicev1 "github.com/runservice/runservice/clients/go/runservice/v1"
)

func TestErrorMapping(t *testing.T) {
	f := &fakeService{getRun: func(req *runservicev1.GetRunRequest) (*runservicev1.GetRunResponse, error) {
		return nil, richError(codes.NotFound, "run '"+req.GetRunId()+"' not found", "RUN_NOT_FOUND", map[string]string{"run_id": req.GetRunId()})
	}}
	c := serveBufconn(t, f)
	_, err := c.GetRun(context.Background(), runID)

	if !errors.Is(err, ErrRunNotFound) {
		t.Fatalf("errors.Is(%v, ErrRunNotFound) = false", err)
	}
	for _, other := range []error{ErrRunActive, ErrUnknownAgent, ErrUnavailable, context.Canceled} {
		if errors.Is(err, other) {
			t.Fatalf("errors.Is(%v, %v) = true", err, other)
		}
	}
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("%T is not an *Error", err)
	}
	if e.Code != codes.NotFound || e.Reason != "RUN_NOT_FOUND" || e.Metadata["run_id"] != runID {
		t.Fatalf("got %+v", e)
	}
	if e.ErrorReason() != runservicev1.ErrorReason_ERROR_REASON_RUN_NOT_FOUND {
		t.Fatalf("ErrorReason() = %v", e.ErrorReason())
	}
	if status.Code(err) != codes.NotFound {
		t.Fatalf("status.Code = %v", status.Code(err))
	}
	if want := "runservice: NOT_FOUND (RUN_NOT_FOUND): run '" + runID + "' not found"; err.Error() != want {
		t.Fatalf("Error() = %q, want %q", err.Error(), want)
	}
	// Wrapped, it still matches.
	if wrapped := fmt.Errorf("loading: %w", err); !errors.Is(wrapped, ErrRunNotFound) {
		t.Fatal("wrapped error does not match")
	}
}

func TestErrorMappingTable(t *testing.T) {
	for _, tc := range []struct {
		code     codes.Code
		reason   string
		sentinel error
	}{
		{codes.InvalidArgument, "UNKNOWN_AGENT", ErrUnknownAgent},
		{codes.InvalidArgument, "INVALID_INPUT", ErrInvalidInput},
		{codes.InvalidArgument, "INVALID_PAGE_TOKEN", ErrInvalidPageToken},
		{codes.InvalidArgument, "INVALID_ARGUMENT", ErrInvalidArgument},
		{codes.OutOfRange, "SEQ_OUT_OF_RANGE", ErrSeqOutOfRange},
		{codes.FailedPrecondition, "THREAD_BUSY", ErrThreadBusy},
		{codes.FailedPrecondition, "RUN_ACTIVE", ErrRunActive},
		{codes.AlreadyExists, "REQUEST_ID_REUSED", ErrRequestIDReused},
		{codes.ResourceExhausted, "TOO_MANY_ACTIVE_RUNS", ErrTooManyActiveRuns},
		{codes.ResourceExhausted, "TOO_MANY_STREAMS", ErrTooManyStreams},
		{codes.Unavailable, "SERVER_DRAINING", ErrServerDraining},
		{codes.PermissionDenied, "ADMIN_ONLY", ErrAdminOnly},
		{codes.Unauthenticated, "TOKEN_EXPIRED", ErrTokenExpired},
		{codes.Unauthenticated, "CREDENTIALS_MISSING", ErrCredentialsMissing},
		{codes.Unauthenticated, "CREDENTIALS_INVALID", ErrCredentialsInvalid},
		{codes.Internal, "INTERNAL_ERROR", ErrInternal},
		{codes.Aborted, "WATCH_LAGGED", ErrWatchLagged},
		{codes.FailedPrecondition, "RUN_ENDED", ErrRunEnded},
		{codes.FailedPrecondition, "EXTERNAL_RUN", ErrExternalRun},
		{codes.FailedPrecondition, "NOT_EXTERNAL", ErrNotExternal},
		{codes.FailedPrecondition, "STREAM_CLOSED", ErrStreamClosed},
		{codes.FailedPrecondition, "PRODUCER_EPOCH_STALE", ErrProducerEpochStale},
		{codes.FailedPrecondition, "PRODUCER_SEQ_GAP", ErrProducerSeqGap},
	} {
		err := toError(context.Background(), richError(tc.code, "m", tc.reason, nil))
		if !errors.Is(err, tc.sentinel) {
			t.Errorf("%s/%s does not match its sentinel", tc.code, tc.reason)
		}
		if errors.Is(err, ErrRunNotFound) {
			t.Errorf("%s/%s matches ErrRunNotFound", tc.code, tc.reason)
		}
		var e *Error
		errors.As(err, &e)
		if e.ErrorReason() == runservicev1.ErrorReason_ERROR_REASON_UNSPECIFIED {
			t.Errorf("%s has no ErrorReason enum value", tc.reason)
		}
	}
	if !errors.Is(toError(context.Background(), richError(codes.Unavailable, "draining", "SERVER_DRAINING", nil)), ErrUnavailable) {
		t.Error("SERVER_DRAINING does not match ErrUnavailable")
	}
}

func TestErrorWithoutRunserviceErrorInfo(t *testing.T) {
	st, _ := status.New(codes.NotFound, "elsewhere").WithDetails(&errdetails.ErrorInfo{Reason: "RUN_NOT_FOUND", Domain: "example.com"})
	err := toError(context.Background(), st.Err())
	var e *Error
	if !errors.As(err, &e) || e.Reason != "" || e.Code != codes.NotFound {
		t.Fatalf("got %+v: a foreign domain's reason must not be taken", e)
	}
	if errors.Is(err, ErrRunNotFound) {
		t.Fatal("a foreign RUN_NOT_FOUND matched ErrRunNotFound")
	}
	plain := toError(context.Background(), status.Error(codes.Unimplemented, "no"))
	if plain.Error() != "runservice: UNIMPLEMENTED: no" {
		t.Fatalf("Error() = %q", plain.Error())
	}
}

func TestErrorFromTheCallersContext(t *testing.T) {
	f := &fakeService{getRun: func(*runservicev1.GetRunRequest) (*runservicev1.GetRunResponse, error) {
		time.Sleep(time.Second)
		return &runservicev1.GetRunResponse{}, nil
	}}
	c := serveBufconn(t, f)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err := c.GetRun(ctx, runID)
	if !errors.Is(err, context.DeadlineExceeded) || status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("err = %v, want DEADLINE_EXCEEDED matching context.DeadlineExceeded", err)
	}
}

func TestRunError(t *testing.T) {
	if RunError(nil) != nil || RunError(&rpcstatus.Status{}) != nil {
		t.Fatal("an empty status is not an error")
	}
	detail, _ := anypb.New(&errdetails.ErrorInfo{Reason: "RUN_FAILED", Domain: Domain, Metadata: map[string]string{"error_id": "abc"}})
	e := RunError(&rpcstatus.Status{Code: int32(codes.Internal), Message: "agent failed (error id abc)", Details: []*anypb.Any{detail}})
	if e == nil || e.Code != codes.Internal || !errors.Is(e, ErrRunFailed) || e.Metadata["error_id"] != "abc" {
		t.Fatalf("RunError = %+v", e)
	}
}

func TestTokenIsSentOnEveryCall(t *testing.T) {
	f := &fakeService{getRun: func(req *runservicev1.GetRunRequest) (*runservicev1.GetRunResponse, error) {
		return &runservicev1.GetRunResponse{Run: &runservicev1.Run{RunId: req.GetRunId()}}, nil
	}}
	c := serveBufconn(t, f, WithToken("s3cret"))
	for range 3 {
		if _, err := c.GetRun(context.Background(), runID); err != nil {
			t.Fatal(err)
		}
	}
	if a := f.authSeen(); !slices.Equal(a, []string{"Bearer s3cret", "Bearer s3cret", "Bearer s3cret"}) {
		t.Fatalf("authorization seen %v", a)
	}
}

func TestTokenSourceIsCalledPerCall(t *testing.T) {
	f := &fakeService{getRun: func(req *runservicev1.GetRunRequest) (*runservicev1.GetRunResponse, error) {
		return &runservicev1.GetRunResponse{Run: &runservicev1.Run{RunId: req.GetRunId()}}, nil
	}}
	var n atomic.Int32
	c := serveBufconn(t, f, WithTokenSource(func(context.Context) (string, error) {
		return fmt.Sprintf("t%d", n.Add(1)), nil
	}))
	for range 3 {
		if _, err := c.GetRun(context.Background(), runID); err != nil {
			t.Fatal(err)
		}
	}
	if a := f.authSeen(); !slices.Equal(a, []string{"Bearer t1", "Bearer t2", "Bearer t3"}) {
		t.Fatalf("authorization seen %v", a)
	}

	failing := serveBufconn(t, f, WithTokenSource(func(context.Context) (string, error) {
		return "", errors.New("vault sealed")
	}))
	if _, err := failing.GetRun(context.Background(), runID); err == nil || !strings.Contains(err.Error(), "vault sealed") {
		t.Fatalf("err = %v, want the token source's error", err)
	}
}

func TestNewOnACallersConnection(t *testing.T) {
	f := &fakeService{getRun: func(req *runservicev1.GetRunRequest) (*runservicev1.GetRunResponse, error) {
		return &runservicev1.GetRunResponse{Run: &runservicev1.Run{RunId: req.GetRunId(), State: runservicev1.RunState_RUN_STATE_SUCCEEDED}}, nil
	}}
	s := startTCP(t, f)
	conn, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := New(conn, WithToken("mine"))
	run, err := c.GetRun(context.Background(), runID)
	if err != nil || run.GetRunId() != runID {
		t.Fatalf("GetRun = %v, %v", run, err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetRun(context.Background(), runID); err != nil {
		t.Fatalf("Close closed a connection the Client does not own: %v", err)
	}
	if a := f.authSeen(); !slices.Equal(a, []string{"Bearer mine", "Bearer mine"}) {
		t.Fatalf("authorization seen %v", a)
	}
}

func TestAllRunsPages(t *testing.T) {
	var runs []*runservicev1.Run
	for i := range 5 {
		runs = append(runs, &runservicev1.Run{RunId: fmt.Sprintf("run-%d", i)})
	}
	var requests []*runservicev1.ListRunsRequest
	f := &fakeService{listRuns: func(req *runservicev1.ListRunsRequest) (*runservicev1.ListRunsResponse, error) {
		requests = append(requests, req)
		start := 0
		if req.GetPageToken() != "" {
			fmt.Sscanf(req.GetPageToken(), "p%d", &start)
		}
		end := min(start+int(req.GetPageSize()), len(runs))
		resp := &runservicev1.ListRunsResponse{Runs: runs[start:end]}
		if end < len(runs) {
			resp.NextPageToken = fmt.Sprintf("p%d", end)
		}
		return resp, nil
	}}
	c := serveBufconn(t, f)
	var ids []string
	for run, err := range c.AllRuns(context.Background(), &runservicev1.ListRunsRequest{PageSize: 2, Agent: "ticker", WaitingForInput: true}) {
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, run.GetRunId())
	}
	if !slices.Equal(ids, []string{"run-0", "run-1", "run-2", "run-3", "run-4"}) {
		t.Fatalf("ids %v", ids)
	}
	if len(requests) != 3 || requests[2].GetPageToken() != "p4" || requests[2].GetAgent() != "ticker" || !requests[2].GetWaitingForInput() {
		t.Fatalf("requests %v", requests)
	}

	// Stopping early fetches no further page.
	requests = nil
	for range c.AllRuns(context.Background(), &runservicev1.ListRunsRequest{PageSize: 2}) {
		break
	}
	if len(requests) != 1 {
		t.Fatalf("%d pages fetched for one run", len(requests))
	}

	// Errors end the iteration.
	f.listRuns = func(*runservicev1.ListRunsRequest) (*runservicev1.ListRunsResponse, error) {
		return nil, richError(codes.InvalidArgument, "bad token", "INVALID_PAGE_TOKEN", nil)
	}
	for _, err := range c.AllRuns(context.Background(), nil) {
		if !errors.Is(err, ErrInvalidPageToken) {
			t.Fatalf("err = %v", err)
		}
	}
}

func TestStateHelpers(t *testing.T) {
	if StateName(runservicev1.RunState_RUN_STATE_TIMED_OUT) != "TIMED_OUT" {
		t.Fatal(StateName(runservicev1.RunState_RUN_STATE_TIMED_OUT))
	}
	terminal := 0
	for v := range runservicev1.RunState_name {
		if IsTerminal(runservicev1.RunState(v)) {
			terminal++
		}
	}
	if terminal != 5 {
		t.Fatalf("%d terminal states, want 5", terminal)
	}
	if IsTerminalEvent(&runservicev1.RunEvent{Type: "tick", State: runservicev1.RunState_RUN_STATE_SUCCEEDED}) {
		t.Fatal("only run.state events end a log")
	}
}

var uuidPattern = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// SendInput retries UNAVAILABLE under one request id: a new UUID per call,
// or the caller's.
func TestSendInputRetriesUnderOneRequestID(t *testing.T) {
	var requests []*runservicev1.SendInputRequest
	f := &fakeService{sendInput: func(req *runservicev1.SendInputRequest) (*runservicev1.SendInputResponse, error) {
		requests = append(requests, req)
		if len(requests)%3 != 0 {
			return nil, status.Error(codes.Unavailable, "restarting")
		}
		return &runservicev1.SendInputResponse{Event: &runservicev1.RunEvent{RunId: req.GetRunId(), Seq: 3, Type: InputEventType}}, nil
	}}
	c := serveBufconn(t, f)
	ev, err := c.SendInput(context.Background(), runID, map[string]any{"approve": true})
	if err != nil || ev.GetSeq() != 3 || ev.GetType() != InputEventType {
		t.Fatalf("SendInput = %v, %v", ev, err)
	}
	if _, err := c.SendInput(context.Background(), runID, map[string]any{"approve": false}, WithRequestID("mine")); err != nil {
		t.Fatal(err)
	}
	if len(requests) != 6 {
		t.Fatalf("%d attempts, want 3 per call", len(requests))
	}
	first := requests[0].GetRequestId()
	if !uuidPattern.MatchString(first) {
		t.Fatalf("request id %q is not a UUID", first)
	}
	for i, req := range requests {
		want := first
		if i >= 3 {
			want = "mine"
		}
		if req.GetRequestId() != want || req.GetRunId() != runID {
			t.Fatalf("attempt %d: run %q request id %q, want %q", i, req.GetRunId(), req.GetRequestId(), want)
		}
	}
	if !requests[0].GetInput().GetFields()["approve"].GetBoolValue() {
		t.Fatalf("input %v", requests[0].GetInput())
	}
	again, _ := c.SendInput(context.Background(), runID, map[string]any{"approve": true})
	if again == nil || requests[6].GetRequestId() == first {
		t.Fatal("a new call reused the previous call's request id")
	}
}

// SendInput returns other failures at once, and sends once when retries are
// disabled.
func TestSendInputDoesNotRetryOtherFailures(t *testing.T) {
	calls := 0
	f := &fakeService{sendInput: func(*runservicev1.SendInputRequest) (*runservicev1.SendInputResponse, error) {
		calls++
		return nil, richError(codes.FailedPrecondition, "the run has ended", "RUN_ENDED", nil)
	}}
	c := serveBufconn(t, f)
	_, err := c.SendInput(context.Background(), runID, nil)
	if !errors.Is(err, ErrRunEnded) || calls != 1 {
		t.Fatalf("err = %v after %d calls, want ErrRunEnded after 1", err, calls)
	}

	calls = 0
	f.sendInput = func(*runservicev1.SendInputRequest) (*runservicev1.SendInputResponse, error) {
		calls++
		return nil, status.Error(codes.Unavailable, "down")
	}
	_, err = c.SendInput(context.Background(), runID, nil, WithInputRetry(ResumePolicy{Disabled: true}))
	if !errors.Is(err, ErrUnavailable) || calls != 1 {
		t.Fatalf("err = %v after %d calls, want UNAVAILABLE after 1", err, calls)
	}
	policy := fastPolicy()
	policy.MaxRetries = 2
	_, err = c.SendInput(context.Background(), runID, nil, WithInputRetry(policy))
	if !errors.Is(err, ErrGaveUp) || !errors.Is(err, ErrUnavailable) || calls != 4 {
		t.Fatalf("err = %v after %d calls, want ErrGaveUp after 1 + 3", err, calls)
	}
}

// An input that is no JSON object fails before anything is sent.
func TestSendInputRefusesAValueStructpbCannotHold(t *testing.T) {
	c := serveBufconn(t, &fakeService{})
	if _, err := c.SendInput(context.Background(), runID, map[string]any{"ch": make(chan int)}); err == nil {
		t.Fatal("a channel was accepted as input")
	}
}
