package runservice

import (
	"context"
	"crypto/rand"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	runservicev1 "github.com/runservice/runservice/clients/go/runservice/v1"
)

// InputEventType is the type of the event SendInput appends to a run's log.
const InputEventType = "input"

// InputRequestedEventType is the type of the event an agent emits when it
// asks for input (its data says for what); Run.WaitingForInput is true from
// then until the input arrives.
const InputRequestedEventType = "input.requested"

// SendInputOption configures one SendInput call.
type SendInputOption func(*sendInputConfig)

type sendInputConfig struct {
	requestID string
	policy    ResumePolicy
	callOpts  []grpc.CallOption
}

// WithRequestID sets the idempotency key of SendInput. Calls with the same
// key and the same input append one event (each returns it); the same key
// with another input fails with ErrRequestIDReused. Without this option
// every SendInput call uses a new random UUID.
func WithRequestID(id string) SendInputOption {
	return func(c *sendInputConfig) { c.requestID = id }
}

// WithInputRetry sets how this SendInput retries UNAVAILABLE (default: the
// Client's ResumePolicy, see WithResumePolicy). Disabled sends once.
func WithInputRetry(p ResumePolicy) SendInputOption {
	return func(c *sendInputConfig) { c.policy = p }
}

// WithInputCallOptions adds gRPC call options to every attempt of this
// SendInput.
func WithInputCallOptions(opts ...grpc.CallOption) SendInputOption {
	return func(c *sendInputConfig) { c.callOpts = append(c.callOpts, opts...) }
}

// SendInput sends input (a JSON object; see structpb.NewValue for the Go
// types allowed) to a run, for its agent to receive in log order, and
// returns the `input` event appended to the run's log. Input to a PENDING
// run waits for it.
//
// Every attempt carries one request id (WithRequestID, else a new UUID), so
// SendInput retries UNAVAILABLE within the ResumePolicy's bounds without
// ever delivering the input twice; when the bounds are reached the error
// matches both ErrGaveUp and the last failure. Other failures are returned
// at once: ErrRunEnded when the run has ended, ErrExternalRun for an
// external run, ErrRequestIDReused, ErrRunNotFound, ErrInvalidInput.
func (c *Client) SendInput(ctx context.Context, runID string, input map[string]any, opts ...SendInputOption) (*runservicev1.RunEvent, error) {
	data, err := structpb.NewStruct(input)
	if err != nil {
		return nil, fmt.Errorf("runservice: input of run %s: %w", runID, err)
	}
	cfg := sendInputConfig{policy: c.opts.resume}
	for _, opt := range opts {
		opt(&cfg)
	}
	if cfg.requestID == "" {
		cfg.requestID = newRequestID()
	}
	req := &runservicev1.SendInputRequest{RunId: runID, Input: data, RequestId: cfg.requestID}
	var resp *runservicev1.SendInputResponse
	err = c.retryUnavailable(ctx, cfg.policy, "sending input to run "+runID, func() (err error) {
		resp, err = c.rpc.SendInput(ctx, req, c.callOptions(cfg.callOpts)...)
		return toError(ctx, err)
	})
	if err != nil {
		return nil, err
	}
	return resp.GetEvent(), nil
}

// retryUnavailable calls attempt until it succeeds or fails with something
// other than UNAVAILABLE (policy.Retryable, when set, decides instead),
// waiting between attempts as a resuming Subscribe does. Only idempotent
// calls may be retried this way.
func (c *Client) retryUnavailable(ctx context.Context, policy ResumePolicy, what string, attempt func() error) error {
	policy = policy.withDefaults()
	start := time.Now()
	for failures := 1; ; failures++ {
		err := attempt()
		if err == nil || policy.Disabled || ctx.Err() != nil {
			return err
		}
		retryable := status.Code(err) == codes.Unavailable
		if policy.Retryable != nil {
			retryable = policy.Retryable(err)
		}
		if !retryable {
			return err
		}
		if err := policy.giveUp(failures, start, what, err); err != nil {
			return err
		}
		wait := policy.delay(failures)
		if policy.OnRetry != nil {
			policy.OnRetry(RetryInfo{Attempt: failures, Err: err, Delay: wait})
		}
		if err := sleep(ctx, wait); err != nil {
			return err
		}
	}
}

// newRequestID returns a random (version 4) UUID.
func newRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (it panics instead)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
