package runservice

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/types/known/structpb"

	runservicev1 "github.com/runservice/runservice/clients/go/runservice/v1"
)

// fakeService is an in-process RunService whose Subscribe serves a fixed log
// and fails on cue: attempt i sends cuts[i] events, then fails with
// UNAVAILABLE (a negative count, or no entry, means no cut).
type fakeService struct {
	runservicev1.UnimplementedRunServiceServer

	mu       sync.Mutex
	events   []*runservicev1.RunEvent
	batch    int           // events per SubscribeResponse (default 1)
	overlap  int64         // resend this many events before from_seq (the client must drop them)
	cuts     []int         // per attempt: events to send before UNAVAILABLE
	failWith []error       // per attempt: fail at once with this error (nil: don't)
	pace     time.Duration // pause between responses
	hold     bool          // after the log, keep the stream open until cancelled
	fromSeqs []int64       // from_seq of every Subscribe, in order
	open     atomic.Int32  // Subscribe handlers running
	auth     []string      // authorization metadata of every call
	getRun   func(*runservicev1.GetRunRequest) (*runservicev1.GetRunResponse, error)
	listRuns func(*runservicev1.ListRunsRequest) (*runservicev1.ListRunsResponse, error)

	snapshot  *runservicev1.RunSnapshot // sent first to a Subscribe that asks for it (and covers its from_seq-1)
	asked     []bool                    // the snapshot flag of every Subscribe, in order
	sendInput func(*runservicev1.SendInputRequest) (*runservicev1.SendInputResponse, error)
}

// tickLog is a ticker run's log: RUNNING, n ticks, then the terminal state.
func tickLog(runID string, n int, final runservicev1.RunState) []*runservicev1.RunEvent {
	evs := []*runservicev1.RunEvent{{RunId: runID, Seq: 1, Type: StateEventType, State: runservicev1.RunState_RUN_STATE_RUNNING}}
	for i := 1; i <= n; i++ {
		data, _ := structpb.NewStruct(map[string]any{"i": i})
		evs = append(evs, &runservicev1.RunEvent{RunId: runID, Seq: int64(i + 1), Type: "tick", Payload: &runservicev1.RunEvent_Data{Data: data}})
	}
	return append(evs, &runservicev1.RunEvent{RunId: runID, Seq: int64(n + 2), Type: StateEventType, State: final})
}

func (f *fakeService) recordAuth(ctx context.Context) {
	md, _ := metadata.FromIncomingContext(ctx)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.auth = append(f.auth, md.Get("authorization")...)
}

func (f *fakeService) Subscribe(req *runservicev1.SubscribeRequest, stream grpc.ServerStreamingServer[runservicev1.SubscribeResponse]) error {
	f.recordAuth(stream.Context())
	f.open.Add(1)
	defer f.open.Add(-1)
	f.mu.Lock()
	attempt := len(f.fromSeqs)
	f.fromSeqs = append(f.fromSeqs, req.GetFromSeq())
	f.asked = append(f.asked, req.GetSnapshot())
	cut := -1
	if attempt < len(f.cuts) {
		cut = f.cuts[attempt]
	}
	var fail error
	if attempt < len(f.failWith) {
		fail = f.failWith[attempt]
	}
	events, batch, pace, hold, snap := f.events, max(f.batch, 1), f.pace, f.hold, f.snapshot
	start := max(req.GetFromSeq(), 1) - f.overlap
	f.mu.Unlock()

	if fail != nil {
		return fail
	}
	if req.GetFromSeq() > int64(len(events))+1 {
		return richError(codes.OutOfRange, "from_seq is past the end", "SEQ_OUT_OF_RANGE", nil)
	}
	if req.GetSnapshot() && snap != nil && snap.GetSeq() >= max(req.GetFromSeq(), 1)-1 {
		if err := stream.Send(&runservicev1.SubscribeResponse{Snapshot: snap}); err != nil {
			return err
		}
		start = snap.GetSeq() + 1
	}
	sent := 0
	var buf []*runservicev1.RunEvent
	flush := func() error {
		if len(buf) == 0 {
			return nil
		}
		err := stream.Send(&runservicev1.SubscribeResponse{Events: buf})
		buf = nil
		if pace > 0 {
			select {
			case <-time.After(pace):
			case <-stream.Context().Done():
				return stream.Context().Err()
			}
		}
		return err
	}
	for _, ev := range events {
		if ev.GetSeq() < start {
			continue
		}
		if cut >= 0 && sent == cut {
			if err := flush(); err != nil {
				return err
			}
			return status.Error(codes.Unavailable, "stream cut by the fake")
		}
		buf = append(buf, ev)
		sent++
		if len(buf) == batch {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if err := flush(); err != nil {
		return err
	}
	if hold {
		<-stream.Context().Done()
		return stream.Context().Err()
	}
	return nil
}

func (f *fakeService) GetRun(ctx context.Context, req *runservicev1.GetRunRequest) (*runservicev1.GetRunResponse, error) {
	f.recordAuth(ctx)
	if f.getRun != nil {
		return f.getRun(req)
	}
	return nil, status.Error(codes.Unimplemented, "no GetRun")
}

func (f *fakeService) ListRuns(ctx context.Context, req *runservicev1.ListRunsRequest) (*runservicev1.ListRunsResponse, error) {
	f.recordAuth(ctx)
	if f.listRuns != nil {
		return f.listRuns(req)
	}
	return nil, status.Error(codes.Unimplemented, "no ListRuns")
}

func (f *fakeService) SendInput(ctx context.Context, req *runservicev1.SendInputRequest) (*runservicev1.SendInputResponse, error) {
	f.recordAuth(ctx)
	if f.sendInput != nil {
		return f.sendInput(req)
	}
	return nil, status.Error(codes.Unimplemented, "no SendInput")
}

// snapshotsAsked returns the snapshot flag of every Subscribe, in order.
func (f *fakeService) snapshotsAsked() []bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]bool(nil), f.asked...)
}

func (f *fakeService) attempts() []int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]int64(nil), f.fromSeqs...)
}

func (f *fakeService) authSeen() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.auth...)
}

// richError is a status with a runservice ErrorInfo, as the server sends.
func richError(code codes.Code, msg, reason string, md map[string]string) error {
	st, err := status.New(code, msg).WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: Domain, Metadata: md})
	if err != nil {
		panic(err)
	}
	return st.Err()
}

// fastPolicy resumes quickly, for tests.
func fastPolicy() ResumePolicy {
	return ResumePolicy{BaseDelay: time.Millisecond, MaxDelay: 5 * time.Millisecond, GiveUpAfter: 2 * time.Second}
}

// serveBufconn serves f in process and returns a Client dialled to it.
func serveBufconn(t *testing.T, f *fakeService, opts ...Option) *Client {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer()
	runservicev1.RegisterRunServiceServer(srv, f)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	opts = append([]Option{
		WithResumePolicy(fastPolicy()),
		WithDialOptions(grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return lis.DialContext(ctx)
		})),
	}, opts...)
	c, err := Dial(context.Background(), "passthrough:///bufnet", opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// tcpServer is a fake served on a loopback port that can be killed and
// restarted on the same port.
type tcpServer struct {
	t    *testing.T
	f    *fakeService
	addr string
	mu   sync.Mutex
	srv  *grpc.Server
}

func startTCP(t *testing.T, f *fakeService) *tcpServer {
	t.Helper()
	s := &tcpServer{t: t, f: f, addr: "127.0.0.1:0"}
	s.start()
	t.Cleanup(s.stop)
	return s
}

func (s *tcpServer) start() {
	lis, err := net.Listen("tcp", s.addr)
	if err != nil {
		s.t.Errorf("listen %s: %v", s.addr, err)
		return
	}
	s.addr = lis.Addr().String()
	srv := grpc.NewServer()
	runservicev1.RegisterRunServiceServer(srv, s.f)
	s.mu.Lock()
	s.srv = srv
	s.mu.Unlock()
	go func() { _ = srv.Serve(lis) }()
}

// stop closes the listener and every connection at once, like a crash.
func (s *tcpServer) stop() {
	s.mu.Lock()
	srv := s.srv
	s.srv = nil
	s.mu.Unlock()
	if srv != nil {
		srv.Stop()
	}
}

func seqs(evs []*runservicev1.RunEvent) []int64 {
	out := make([]int64, len(evs))
	for i, ev := range evs {
		out[i] = ev.GetSeq()
	}
	return out
}

// checkRange fails unless got is exactly from..to.
func checkRange(t *testing.T, got []int64, from, to int64) {
	t.Helper()
	if int64(len(got)) != to-from+1 {
		t.Fatalf("got %d events %s, want seqs %d..%d", len(got), brief(got), from, to)
	}
	for i, s := range got {
		if s != from+int64(i) {
			t.Fatalf("event %d has seq %d, want %d (got %s)", i, s, from+int64(i), brief(got))
		}
	}
}

func brief(s []int64) string {
	if len(s) <= 12 {
		return fmt.Sprint(s)
	}
	return fmt.Sprintf("%v ... %v", s[:6], s[len(s)-6:])
}
