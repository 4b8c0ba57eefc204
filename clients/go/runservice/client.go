// Package runservice is the Go client of runservice, a gRPC service that runs
// long jobs ("runs") on the server, detached from the connection that started
// them.
//
// A Client wraps the generated RunService stub (package runservicev1) with
// bearer-token credentials, typed errors (*Error, and sentinels such as
// ErrRunNotFound for errors.Is), a Subscribe that resumes by itself across
// dropped connections and server restarts without gaps or duplicates (and
// can start from the run's snapshot, WithSnapshot), and a SendInput that
// retries under one request id, so an input is never delivered twice.
//
//	c, err := runservice.Dial(ctx, "127.0.0.1:50051", runservice.WithToken(token))
//	if err != nil { ... }
//	defer c.Close()
//	run, err := c.StartRun(ctx, &runservicev1.StartRunRequest{Agent: "ticker", Input: input})
//	for ev, err := range c.Subscribe(ctx, run.GetRunId(), 1) {
//		if err != nil { ... }
//		fmt.Println(ev.GetSeq(), ev.GetType())
//	}
package runservice

import (
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	runservicev1 "github.com/runservice/runservice/clients/go/runservice/v1"
)

// TokenSource returns the bearer token to send. It is called before every
// call, including every reconnect of a resuming Subscribe, so it can hand out
// a refreshed token.
type TokenSource func(ctx context.Context) (string, error)

// Option configures Dial and New.
type Option func(*options)

type options struct {
	tokenSource  TokenSource
	dynamicToken bool // a TokenSource (not a fixed token): TOKEN_EXPIRED is worth a retry
	transport    credentials.TransportCredentials
	dialOpts     []grpc.DialOption
	resume       ResumePolicy
}

// WithToken sends "authorization: Bearer <token>" with every call.
func WithToken(token string) Option {
	return func(o *options) {
		o.tokenSource = func(context.Context) (string, error) { return token, nil }
		o.dynamicToken = false
	}
}

// WithTokenSource calls src before every call (and every reconnect of a
// resuming Subscribe) and sends the token it returns. An error from src fails
// the call.
func WithTokenSource(src TokenSource) Option {
	return func(o *options) { o.tokenSource, o.dynamicToken = src, true }
}

// WithTransportCredentials sets the transport security used by Dial (TLS or
// mTLS, for example credentials.NewTLS(cfg)). The default is plaintext, meant
// for loopback and trusted networks.
func WithTransportCredentials(creds credentials.TransportCredentials) Option {
	return func(o *options) { o.transport = creds }
}

// WithDialOptions passes extra options to grpc.NewClient in Dial; they are
// applied after the client's own, so they win.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dialOpts = append(o.dialOpts, opts...) }
}

// WithResumePolicy sets the default ResumePolicy of Subscribe, and the
// bounds within which SendInput retries UNAVAILABLE.
func WithResumePolicy(p ResumePolicy) Option {
	return func(o *options) { o.resume = p }
}

// Client calls a runservice server. It is safe for concurrent use.
type Client struct {
	rpc      runservicev1.RunServiceClient
	conn     *grpc.ClientConn // set when Dial created it; closed by Close
	callOpts []grpc.CallOption
	opts     options
}

// Dial creates a Client for addr (HOST:PORT). The connection is made lazily
// on the first call and re-made after failures, with a reconnect backoff
// tuned for quick recovery after a server restart (100ms up to 2s). ctx is
// only checked for cancellation: Dial does not wait for the server.
func Dial(ctx context.Context, addr string, opts ...Option) (*Client, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	o := buildOptions(opts)
	transport := o.transport
	if transport == nil {
		transport = insecure.NewCredentials()
	}
	dialOpts := []grpc.DialOption{
		grpc.WithTransportCredentials(transport),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay:  100 * time.Millisecond,
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   2 * time.Second,
			},
			MinConnectTimeout: 5 * time.Second,
		}),
	}
	if o.tokenSource != nil {
		dialOpts = append(dialOpts, grpc.WithPerRPCCredentials(&tokenCredentials{
			src:        o.tokenSource,
			requireTLS: o.transport != nil,
		}))
	}
	dialOpts = append(dialOpts, o.dialOpts...)
	conn, err := grpc.NewClient(addr, dialOpts...)
	if err != nil {
		return nil, err
	}
	return &Client{rpc: runservicev1.NewRunServiceClient(conn), conn: conn, opts: o}, nil
}

// New creates a Client on a connection the caller owns (Close leaves it
// open). The token options attach per-call credentials; WithTransportCredentials
// and WithDialOptions do not apply.
func New(conn grpc.ClientConnInterface, opts ...Option) *Client {
	o := buildOptions(opts)
	c := &Client{rpc: runservicev1.NewRunServiceClient(conn), opts: o}
	if o.tokenSource != nil {
		c.callOpts = append(c.callOpts, grpc.PerRPCCredentials(&tokenCredentials{src: o.tokenSource}))
	}
	return c
}

func buildOptions(opts []Option) options {
	o := options{resume: DefaultResumePolicy()}
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

// Close closes the connection that Dial created. It does not close a
// connection passed to New.
func (c *Client) Close() error {
	if c.conn == nil {
		return nil
	}
	return c.conn.Close()
}

// Raw returns the generated stub, for anything the Client does not wrap. Its
// calls carry the token only when the Client came from Dial.
func (c *Client) Raw() runservicev1.RunServiceClient { return c.rpc }

func (c *Client) callOptions(extra []grpc.CallOption) []grpc.CallOption {
	if len(c.callOpts) == 0 {
		return extra
	}
	return append(append([]grpc.CallOption(nil), c.callOpts...), extra...)
}

// StartRun starts a run and returns it (RUN_STATE_PENDING or RUN_STATE_RUNNING).
// With a request_id set, a retry returns the run the first call created.
func (c *Client) StartRun(ctx context.Context, req *runservicev1.StartRunRequest, opts ...grpc.CallOption) (*runservicev1.Run, error) {
	resp, err := c.rpc.StartRun(ctx, req, c.callOptions(opts)...)
	if err != nil {
		return nil, toError(ctx, err)
	}
	return resp.GetRun(), nil
}

// GetRun returns one run, live or finished.
func (c *Client) GetRun(ctx context.Context, runID string, opts ...grpc.CallOption) (*runservicev1.Run, error) {
	resp, err := c.rpc.GetRun(ctx, &runservicev1.GetRunRequest{RunId: runID}, c.callOptions(opts)...)
	if err != nil {
		return nil, toError(ctx, err)
	}
	return resp.GetRun(), nil
}

// ListRuns returns one page of the caller's runs, newest first, filtered by
// req (States, Agent, ThreadId, Labels, AllUsers, and WaitingForInput for
// the runs whose agent waits for input now). Pass the response's
// NextPageToken as the next request's PageToken (same filters) to get the
// next page; it is empty on the last page. AllRuns pages for you.
func (c *Client) ListRuns(ctx context.Context, req *runservicev1.ListRunsRequest, opts ...grpc.CallOption) (*runservicev1.ListRunsResponse, error) {
	resp, err := c.rpc.ListRuns(ctx, req, c.callOptions(opts)...)
	if err != nil {
		return nil, toError(ctx, err)
	}
	return resp, nil
}

// AllRuns iterates over every run matching req's filters, newest first,
// fetching pages of req.PageSize as needed (req.PageToken is the starting
// point). On an error it yields (nil, err) once and stops.
func (c *Client) AllRuns(ctx context.Context, req *runservicev1.ListRunsRequest, opts ...grpc.CallOption) iter.Seq2[*runservicev1.Run, error] {
	return func(yield func(*runservicev1.Run, error) bool) {
		page := cloneListRequest(req)
		for {
			resp, err := c.ListRuns(ctx, page, opts...)
			if err != nil {
				yield(nil, err)
				return
			}
			for _, run := range resp.GetRuns() {
				if !yield(run, nil) {
					return
				}
			}
			if resp.GetNextPageToken() == "" {
				return
			}
			page.PageToken = resp.GetNextPageToken()
		}
	}
}

// cloneListRequest copies req whole, so that every filter (WaitingForInput
// and any added later) carries over to the next pages.
func cloneListRequest(req *runservicev1.ListRunsRequest) *runservicev1.ListRunsRequest {
	if req == nil {
		return &runservicev1.ListRunsRequest{}
	}
	return proto.Clone(req).(*runservicev1.ListRunsRequest)
}

// StopRun stops a run and returns it once it is terminal (at most the
// server's stop grace later). Stopping a finished run returns it unchanged.
func (c *Client) StopRun(ctx context.Context, runID, reason string, opts ...grpc.CallOption) (*runservicev1.Run, error) {
	resp, err := c.rpc.StopRun(ctx, &runservicev1.StopRunRequest{RunId: runID, Reason: reason}, c.callOptions(opts)...)
	if err != nil {
		return nil, toError(ctx, err)
	}
	return resp.GetRun(), nil
}

// AppendEvents appends req.Events to an external run (agent "external") as
// one unit, at the next seqs, and returns the run's last seq after it. With
// req.ProducerId the append is idempotent (a retry of an accepted
// ProducerSeq is answered with Duplicate set and writes nothing); a newer
// ProducerEpoch fences older instances (ErrProducerEpochStale), and a
// ProducerSeq that is not the next one is ErrProducerSeqGap. req.Close ends
// the run SUCCEEDED after the events. A closed run is ErrStreamClosed; a run
// with an agent ErrNotExternal.
func (c *Client) AppendEvents(ctx context.Context, req *runservicev1.AppendEventsRequest, opts ...grpc.CallOption) (*runservicev1.AppendEventsResponse, error) {
	resp, err := c.rpc.AppendEvents(ctx, req, c.callOptions(opts)...)
	if err != nil {
		return nil, toError(ctx, err)
	}
	return resp, nil
}

// CloseRun ends an external run SUCCEEDED, with result when it is not nil
// (a JSON object; see structpb.NewValue for the Go types allowed), and
// returns it. A run already closed is returned as it is; a run with an
// agent is ErrNotExternal.
func (c *Client) CloseRun(ctx context.Context, runID string, result map[string]any, opts ...grpc.CallOption) (*runservicev1.Run, error) {
	req := &runservicev1.CloseRunRequest{RunId: runID}
	if result != nil {
		s, err := structpb.NewStruct(result)
		if err != nil {
			return nil, fmt.Errorf("runservice: result of run %s: %w", runID, err)
		}
		req.Result = s
	}
	resp, err := c.rpc.CloseRun(ctx, req, c.callOptions(opts)...)
	if err != nil {
		return nil, toError(ctx, err)
	}
	return resp.GetRun(), nil
}

// ListWebhookDeliveries returns the webhook deliveries of a run that ended,
// the deployment's first, then the run's own, each with its attempts so far.
// It is empty while the run is active and when no webhook applies to it.
func (c *Client) ListWebhookDeliveries(ctx context.Context, runID string, opts ...grpc.CallOption) ([]*runservicev1.WebhookDelivery, error) {
	req := &runservicev1.ListWebhookDeliveriesRequest{RunId: runID}
	resp, err := c.rpc.ListWebhookDeliveries(ctx, req, c.callOptions(opts)...)
	if err != nil {
		return nil, toError(ctx, err)
	}
	return resp.GetDeliveries(), nil
}

// DeleteRun deletes a finished run and its event log (ErrRunActive while it
// is active).
func (c *Client) DeleteRun(ctx context.Context, runID string, opts ...grpc.CallOption) error {
	if _, err := c.rpc.DeleteRun(ctx, &runservicev1.DeleteRunRequest{RunId: runID}, c.callOptions(opts)...); err != nil {
		return toError(ctx, err)
	}
	return nil
}

// ListAgents returns the agents the server can run, sorted by name.
func (c *Client) ListAgents(ctx context.Context, opts ...grpc.CallOption) ([]*runservicev1.Agent, error) {
	resp, err := c.rpc.ListAgents(ctx, &runservicev1.ListAgentsRequest{}, c.callOptions(opts)...)
	if err != nil {
		return nil, toError(ctx, err)
	}
	return resp.GetAgents(), nil
}

// WatchRuns iterates over the caller's runs matching req: first a snapshot
// (RUN_CHANGE_EXISTING), then RUN_CHANGE_SNAPSHOT_END, then every change
// (RUN_CHANGE_UPDATED when only WaitingForInput, Progress or Usage changed).
// With req.WaitingForInput, a run that stops waiting is reported once more,
// with WaitingForInput false. It does not resume: on an error (including
// ErrWatchLagged) it yields (nil, err) once and stops; open a new watch,
// which starts with a fresh snapshot. Breaking out of the loop closes the
// stream.
func (c *Client) WatchRuns(ctx context.Context, req *runservicev1.WatchRunsRequest, opts ...grpc.CallOption) iter.Seq2[*runservicev1.WatchRunsResponse, error] {
	return func(yield func(*runservicev1.WatchRunsResponse, error) bool) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stream, err := c.rpc.WatchRuns(ctx, req, c.callOptions(opts)...)
		if err != nil {
			yield(nil, toError(ctx, err))
			return
		}
		for {
			msg, err := stream.Recv()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					yield(nil, toError(ctx, err))
				}
				return
			}
			if !yield(msg, nil) {
				return
			}
		}
	}
}

// Wait returns the run once it is terminal, following its log (with the
// resuming Subscribe) from the current end rather than polling.
func (c *Client) Wait(ctx context.Context, runID string, opts ...SubscribeOption) (*runservicev1.Run, error) {
	run, err := c.GetRun(ctx, runID)
	if err != nil {
		return nil, err
	}
	if IsTerminal(run.GetState()) {
		return run, nil
	}
	err = c.SubscribeFunc(ctx, runID, run.GetLastSeq()+1, func(*runservicev1.RunEvent) error { return nil }, opts...)
	if err != nil {
		return nil, err
	}
	return c.GetRun(ctx, runID)
}

// IsTerminal reports whether a run in state s has finished.
func IsTerminal(s runservicev1.RunState) bool {
	switch s {
	case runservicev1.RunState_RUN_STATE_SUCCEEDED,
		runservicev1.RunState_RUN_STATE_FAILED,
		runservicev1.RunState_RUN_STATE_STOPPED,
		runservicev1.RunState_RUN_STATE_INTERRUPTED,
		runservicev1.RunState_RUN_STATE_TIMED_OUT:
		return true
	}
	return false
}

// StateName is s's name without the RUN_STATE_ prefix, e.g. "SUCCEEDED".
func StateName(s runservicev1.RunState) string {
	name := s.String()
	const prefix = "RUN_STATE_"
	if len(name) > len(prefix) && name[:len(prefix)] == prefix {
		return name[len(prefix):]
	}
	return name
}

// tokenCredentials sends "authorization: Bearer <token>" on every call.
type tokenCredentials struct {
	src        TokenSource
	requireTLS bool
}

func (t *tokenCredentials) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	token, err := t.src(ctx)
	if err != nil {
		return nil, err
	}
	if token == "" {
		return nil, nil
	}
	return map[string]string{"authorization": "Bearer " + token}, nil
}

// RequireTransportSecurity is false for plaintext connections (loopback,
// development) and true when Dial was given transport credentials.
func (t *tokenCredentials) RequireTransportSecurity() bool { return t.requireTLS }
