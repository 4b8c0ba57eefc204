package runservice

import (
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"math/rand/v2"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	runservicev1 "github.com/runservice/runservice/clients/go/runservice/v1"
)

// StateEventType is the type of lifecycle events in a run's log.
const StateEventType = "run.state"

// Defaults of ResumePolicy.
const (
	DefaultBaseDelay   = 100 * time.Millisecond
	DefaultMaxDelay    = 2 * time.Second
	DefaultGiveUpAfter = 30 * time.Second
)

// ErrGaveUp is returned (wrapping the last failure as well) when a resuming
// Subscribe stops reconnecting because its ResumePolicy bound was reached.
var ErrGaveUp = errors.New("runservice: subscribe gave up resuming")

// ErrSequenceGap is returned when the server delivers an event past the one
// expected next. The server promises this never happens; the client refuses
// to hide it.
var ErrSequenceGap = errors.New("runservice: gap in the event sequence")

// ResumePolicy says how Subscribe rides out transient failures: UNAVAILABLE
// (server down, restarting or draining, connection lost), DEADLINE_EXCEEDED
// set by someone other than the caller, a stream reset without a status.
// After a failure it reconnects with from_seq = last seen seq + 1, waiting
// an exponentially growing, jittered delay.
//
// A failure streak ends when a new event arrives, or when an attempt stayed
// open for at least MaxDelay before failing (it was a working connection).
//
// SendInput retries UNAVAILABLE with the same delays and bounds (its streak
// is the whole call), under one request id.
type ResumePolicy struct {
	// Disabled turns resuming off: the first failure ends the subscription.
	Disabled bool
	// BaseDelay is the delay before the first reconnect; it doubles with
	// every further failure of a streak, up to MaxDelay. Each delay is
	// jittered down by up to half. Zero means DefaultBaseDelay (100ms).
	BaseDelay time.Duration
	// MaxDelay caps the delay. Zero means DefaultMaxDelay (2s).
	MaxDelay time.Duration
	// GiveUpAfter bounds how long a failure streak may last. Zero means
	// DefaultGiveUpAfter (30s); negative means no time bound.
	GiveUpAfter time.Duration
	// MaxRetries bounds the reconnects of a failure streak; zero means no
	// count bound.
	MaxRetries int
	// Retryable, when set, replaces the built-in test of which errors are
	// transient. It receives the *Error of the failed attempt.
	Retryable func(err error) bool
	// OnRetry, when set, is called before each reconnect (for logging).
	OnRetry func(RetryInfo)
}

// RetryInfo describes a reconnect of a resuming Subscribe, or a retry of
// SendInput.
type RetryInfo struct {
	Attempt int           // failures in the current streak, from 1
	FromSeq int64         // the from_seq of the reconnect (0 for SendInput)
	Err     error         // the failure
	Delay   time.Duration // the wait before reconnecting
}

// DefaultResumePolicy is 100ms..2s jittered exponential backoff, giving up
// after 30s without progress.
func DefaultResumePolicy() ResumePolicy {
	return ResumePolicy{BaseDelay: DefaultBaseDelay, MaxDelay: DefaultMaxDelay, GiveUpAfter: DefaultGiveUpAfter}
}

func (p ResumePolicy) withDefaults() ResumePolicy {
	if p.BaseDelay <= 0 {
		p.BaseDelay = DefaultBaseDelay
	}
	if p.MaxDelay <= 0 {
		p.MaxDelay = DefaultMaxDelay
	}
	if p.MaxDelay < p.BaseDelay {
		p.MaxDelay = p.BaseDelay
	}
	if p.GiveUpAfter == 0 {
		p.GiveUpAfter = DefaultGiveUpAfter
	}
	return p
}

// delay is the jittered wait before the n-th reconnect of a streak (n >= 1).
func (p ResumePolicy) delay(n int) time.Duration {
	d := p.BaseDelay
	for i := 1; i < n && d < p.MaxDelay; i++ {
		d *= 2
	}
	d = min(d, p.MaxDelay)
	half := d / 2
	return half + rand.N(d-half+1)
}

// SubscribeOption configures one Subscribe call.
type SubscribeOption func(*subscribeConfig)

type subscribeConfig struct {
	policy     ResumePolicy
	callOpts   []grpc.CallOption
	onSnapshot func(*runservicev1.RunSnapshot) error
}

// WithResume sets the ResumePolicy of this Subscribe (default: the Client's,
// see WithResumePolicy).
func WithResume(p ResumePolicy) SubscribeOption {
	return func(c *subscribeConfig) { c.policy = p }
}

// WithoutResume makes this Subscribe a plain stream: the first failure ends
// it with the error.
func WithoutResume() SubscribeOption {
	return func(c *subscribeConfig) { c.policy.Disabled = true }
}

// WithCallOptions adds gRPC call options to every attempt of this Subscribe.
func WithCallOptions(opts ...grpc.CallOption) SubscribeOption {
	return func(c *subscribeConfig) { c.callOpts = append(c.callOpts, opts...) }
}

// WithSnapshot asks the server to start with the run's latest snapshot (see
// RunSnapshot): when it has one covering fromSeq-1 or later, fn receives it
// before any event, and the events then start at its Seq+1 (apply the
// snapshot's Data in place of every event up to its Seq). Without a
// snapshot that far, fn is not called and the events start at fromSeq, as
// without this option. Once the first response has arrived, reconnects
// resume from the last seq seen + 1 and never ask for a snapshot again, so
// fn is called at most once. An error from fn ends the subscription with
// that error, as the event handler's does.
func WithSnapshot(fn func(*runservicev1.RunSnapshot) error) SubscribeOption {
	return func(c *subscribeConfig) { c.onSnapshot = fn }
}

// IsTerminalEvent reports whether ev is the last event of a run's log: a
// run.state event with a terminal state.
func IsTerminalEvent(ev *runservicev1.RunEvent) bool {
	return ev.GetType() == StateEventType && IsTerminal(ev.GetState())
}

// errStop ends SubscribeFunc when an iterator's consumer stops early.
var errStop = errors.New("stop")

// handlerError marks an error returned by the caller's handler.
type handlerError struct{ err error }

func (h *handlerError) Error() string { return h.err.Error() }

// Subscribe iterates over the run's events with seq >= fromSeq (0 and 1 both
// mean the start of the log), in order, each exactly once, then follows the
// run live and ends after the run's terminal event (or when the server ends
// the stream with OK). Transient failures are ridden out by reconnecting from
// the last seen seq + 1 (see ResumePolicy); events already delivered are
// skipped, so the sequence seen is gap-free and duplicate-free.
//
// On an error it yields (nil, err) once and stops: a non-transient *Error
// (e.g. ErrRunNotFound, ErrSeqOutOfRange), an error that Is ErrGaveUp and the
// last failure, or the context's error when ctx is done. Breaking out of the
// loop closes the stream.
func (c *Client) Subscribe(ctx context.Context, runID string, fromSeq int64, opts ...SubscribeOption) iter.Seq2[*runservicev1.RunEvent, error] {
	return func(yield func(*runservicev1.RunEvent, error) bool) {
		err := c.SubscribeFunc(ctx, runID, fromSeq, func(ev *runservicev1.RunEvent) error {
			if !yield(ev, nil) {
				return errStop
			}
			return nil
		}, opts...)
		if err != nil && !errors.Is(err, errStop) {
			yield(nil, err)
		}
	}
}

// SubscribeFunc is Subscribe with a handler: fn is called for each event, in
// order, exactly once. It returns nil after the terminal event (or an OK end
// of stream), fn's error as is if fn fails, and otherwise the error that
// ended the subscription, as described for Subscribe.
func (c *Client) SubscribeFunc(ctx context.Context, runID string, fromSeq int64, fn func(*runservicev1.RunEvent) error, opts ...SubscribeOption) error {
	cfg := subscribeConfig{policy: c.opts.resume}
	for _, opt := range opts {
		opt(&cfg)
	}
	policy := cfg.policy.withDefaults()
	st := &subscribeState{
		runID:       runID,
		cursor:      max(fromSeq, 1),
		askSnapshot: cfg.onSnapshot != nil,
		onSnapshot:  cfg.onSnapshot,
		onEvent:     fn,
		callOpts:    c.callOptions(cfg.callOpts),
	}
	failures := 0
	var streakStart time.Time
	for {
		started := time.Now()
		before := st.cursor
		err := c.subscribeAttempt(ctx, st)
		if err == nil {
			return nil
		}
		var herr *handlerError
		if errors.As(err, &herr) {
			return herr.err
		}
		if ctxErr := ctx.Err(); ctxErr != nil {
			return ctxErr
		}
		if errors.Is(err, ErrSequenceGap) || policy.Disabled || !c.retryable(policy, err) {
			return err
		}
		if st.cursor > before || time.Since(started) >= policy.MaxDelay {
			failures, streakStart = 0, time.Time{}
		}
		failures++
		if streakStart.IsZero() {
			streakStart = started
		}
		if err := policy.giveUp(failures, streakStart, fmt.Sprintf("at seq %d", st.cursor), err); err != nil {
			return err
		}
		wait := policy.delay(failures)
		if policy.OnRetry != nil {
			policy.OnRetry(RetryInfo{Attempt: failures, FromSeq: st.cursor, Err: err, Delay: wait})
		}
		if err := sleep(ctx, wait); err != nil {
			return err
		}
	}
}

// giveUp returns the error that ends a streak of n failures which began at
// start (it wraps ErrGaveUp and err; where says what was being retried), or
// nil while the policy allows another attempt.
func (p ResumePolicy) giveUp(n int, start time.Time, where string, err error) error {
	if p.MaxRetries > 0 && n > p.MaxRetries {
		return fmt.Errorf("%w after %d retries %s: %w", ErrGaveUp, n-1, where, err)
	}
	if p.GiveUpAfter > 0 && time.Since(start) >= p.GiveUpAfter {
		return fmt.Errorf("%w after %s without progress %s: %w",
			ErrGaveUp, time.Since(start).Round(time.Millisecond), where, err)
	}
	return nil
}

// sleep waits for d, or returns ctx's error as soon as ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return nil
	}
}

// subscribeState is what a resuming Subscribe carries from one attempt to
// the next: the cursor (the seq to deliver next) and whether a snapshot is
// still wanted.
type subscribeState struct {
	runID       string
	cursor      int64
	askSnapshot bool // until the first response: a resume must not replace delivered state
	onSnapshot  func(*runservicev1.RunSnapshot) error
	onEvent     func(*runservicev1.RunEvent) error
	callOpts    []grpc.CallOption
}

// subscribeAttempt runs one Subscribe stream from st.cursor, advancing it
// past the snapshot and every delivered event. It returns nil when the
// subscription is complete.
func (c *Client) subscribeAttempt(ctx context.Context, st *subscribeState) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req := &runservicev1.SubscribeRequest{RunId: st.runID, FromSeq: st.cursor, Snapshot: st.askSnapshot}
	stream, err := c.rpc.Subscribe(ctx, req, st.callOpts...)
	if err != nil {
		return toError(ctx, err)
	}
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return toError(ctx, err)
		}
		asked := st.askSnapshot
		st.askSnapshot = false
		if snap := resp.GetSnapshot(); snap != nil && asked {
			st.cursor = snap.GetSeq() + 1
			if err := st.onSnapshot(snap); err != nil {
				return &handlerError{err}
			}
		}
		done, err := st.deliver(resp.GetEvents())
		if done || err != nil {
			return err
		}
	}
}

// deliver hands the events at or past the cursor to the handler, in order.
// done is true after the terminal event.
func (st *subscribeState) deliver(events []*runservicev1.RunEvent) (done bool, err error) {
	for _, ev := range events {
		switch seq := ev.GetSeq(); {
		case seq < st.cursor:
			continue // already delivered before a reconnect
		case seq > st.cursor:
			return false, fmt.Errorf("%w: run %s: expected seq %d, got %d", ErrSequenceGap, st.runID, st.cursor, seq)
		}
		st.cursor = ev.GetSeq() + 1
		if err := st.onEvent(ev); err != nil {
			return false, &handlerError{err}
		}
		if IsTerminalEvent(ev) {
			return true, nil
		}
	}
	return false, nil
}

func (c *Client) retryable(p ResumePolicy, err error) bool {
	if p.Retryable != nil {
		return p.Retryable(err)
	}
	return IsTransient(err) || (c.opts.dynamicToken && errors.Is(err, ErrTokenExpired))
}

// IsTransient reports whether err is a failure that a retry may cure: the
// server is unreachable, restarting or draining (UNAVAILABLE), a deadline or
// cancellation the caller did not ask for, or a stream cut without a status.
// It is the test a resuming Subscribe uses (plus TOKEN_EXPIRED when the
// Client has a TokenSource, which can supply a fresh token).
func IsTransient(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false // the caller's own context ended
	}
	st, ok := status.FromError(err)
	if !ok {
		return false
	}
	switch st.Code() {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled:
		return true
	case codes.Internal, codes.Unknown:
		var e *Error
		if errors.As(err, &e) && e.Reason != "" {
			return false // a real server-side error, not a broken stream
		}
		msg := strings.ToLower(st.Message())
		for _, s := range []string{"rst_stream", "without sending trailers", "unexpected eof", "connection reset", "broken pipe", "transport is closing"} {
			if strings.Contains(msg, s) {
				return true
			}
		}
	}
	return false
}
