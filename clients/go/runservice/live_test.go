package runservice

// Tests against a real server: one `runservice serve` process from the
// repository's .venv (make venv), started by the first test that needs it and
// stopped by TestMain. Without the .venv they are skipped, unless CI is set.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/structpb"

	runservicev1 "github.com/runservice/runservice/clients/go/runservice/v1"
)

// liveTimeout bounds each live test, and the server's start.
const liveTimeout = 30 * time.Second

// liveServer is a `runservice serve` subprocess on a loopback port, with a
// data directory of its own and its development (admin) token.
type liveServer struct {
	addr   string
	token  string
	dir    string
	cmd    *exec.Cmd
	exited chan struct{} // closed when the process has exited
}

var live struct {
	once sync.Once
	srv  *liveServer
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if live.srv != nil {
		live.srv.stop()
	}
	os.Exit(code)
}

// liveClient returns a Client of the shared real server, starting it on first
// use; it skips the test when the server cannot be found (fails under CI).
func liveClient(t *testing.T) (*Client, context.Context) {
	t.Helper()
	bin, err := filepath.Abs(filepath.Join("..", "..", "..", ".venv", "bin", "runservice"))
	if err == nil {
		_, err = os.Stat(bin)
	}
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("the server is missing (%v); `make venv` installs it", err)
		}
		t.Skipf("the server is missing (%v); `make venv` installs it", err)
	}
	live.once.Do(func() { live.srv, live.err = startLiveServer(bin) })
	if live.err != nil {
		t.Fatal(live.err)
	}
	c, err := Dial(context.Background(), live.srv.addr, WithToken(live.srv.token))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), liveTimeout)
	t.Cleanup(cancel)
	return c, ctx
}

// startLiveServer starts the server and returns once it answers a call.
func startLiveServer(bin string) (*liveServer, error) {
	dir, err := os.MkdirTemp("", "runservice-go-live-")
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	s := &liveServer{addr: fmt.Sprintf("127.0.0.1:%d", port), dir: dir, exited: make(chan struct{})}
	logFile, err := os.Create(filepath.Join(dir, "server.log"))
	if err != nil {
		return nil, err
	}
	defer logFile.Close() // the child holds its own descriptor
	s.cmd = exec.Command(bin, "serve", "--listen", s.addr, "--data-dir", filepath.Join(dir, "data"),
		"--dev-token", "--drain-timeout", "2s")
	s.cmd.Env = serverEnv()
	s.cmd.Stdout, s.cmd.Stderr = logFile, logFile
	if err := s.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = s.cmd.Wait(); close(s.exited) }()
	if err := s.waitReady(); err != nil {
		s.stop()
		return nil, err
	}
	return s, nil
}

// serverEnv is this process's environment without RUNSERVICE_* variables, so a
// developer's settings do not reach the test server.
func serverEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "RUNSERVICE_") {
			env = append(env, kv)
		}
	}
	return append(env, "PYTHONUNBUFFERED=1")
}

func freePort() (int, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer lis.Close()
	return lis.Addr().(*net.TCPAddr).Port, nil
}

// waitReady waits until the dev token is written and ListAgents answers,
// failing early if the process exits.
func (s *liveServer) waitReady() error {
	ctx, cancel := context.WithTimeout(context.Background(), liveTimeout)
	defer cancel()
	tokenFile := filepath.Join(s.dir, "data", "dev-token")
	for {
		if b, err := os.ReadFile(tokenFile); err == nil && len(b) > 0 {
			s.token = strings.TrimSpace(string(b))
			break
		}
		if err := s.pause(ctx); err != nil {
			return err
		}
	}
	c, err := Dial(ctx, s.addr, WithToken(s.token))
	if err != nil {
		return err
	}
	defer c.Close()
	for {
		attempt, cancelAttempt := context.WithTimeout(ctx, time.Second)
		_, callErr := c.ListAgents(attempt, grpc.WaitForReady(true))
		cancelAttempt()
		if callErr == nil {
			return nil
		}
		if err := s.pause(ctx); err != nil {
			return fmt.Errorf("%w (last call: %v)", err, callErr)
		}
	}
}

// pause waits a poll interval; it fails when ctx ends or the server exits.
func (s *liveServer) pause(ctx context.Context) error {
	select {
	case <-s.exited:
		return fmt.Errorf("the server exited while starting:\n%s", s.logTail())
	case <-ctx.Done():
		return fmt.Errorf("the server at %s did not answer within %s:\n%s", s.addr, liveTimeout, s.logTail())
	case <-time.After(20 * time.Millisecond):
		return nil
	}
}

func (s *liveServer) logTail() string {
	b, _ := os.ReadFile(filepath.Join(s.dir, "server.log"))
	return string(b[max(0, len(b)-4000):])
}

// stop sends SIGTERM, kills the process if it outlives a bound, and removes
// its data.
func (s *liveServer) stop() {
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(15 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
	_ = os.RemoveAll(s.dir)
}

// waitUntil polls cond until it returns true, failing the test on an error
// or when ctx ends.
func waitUntil(t *testing.T, ctx context.Context, what string, cond func() (bool, error)) {
	t.Helper()
	for {
		ok, err := cond()
		if err != nil {
			t.Fatalf("waiting until %s: %v", what, err)
		}
		if ok {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting until %s: %v", what, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// startWaiting starts an approval run and returns it once GetRun shows that
// it waits for input.
func startWaiting(t *testing.T, ctx context.Context, c *Client) *runservicev1.Run {
	t.Helper()
	input, _ := structpb.NewStruct(map[string]any{"question": "ship it?"})
	run, err := c.StartRun(ctx, &runservicev1.StartRunRequest{Agent: "approval", Input: input})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, ctx, "the run waits for input", func() (bool, error) {
		run, err = c.GetRun(ctx, run.GetRunId())
		return run.GetWaitingForInput(), err
	})
	return run
}

// logOf returns a finished run's whole log.
func logOf(t *testing.T, ctx context.Context, c *Client, runID string) []*runservicev1.RunEvent {
	t.Helper()
	var events []*runservicev1.RunEvent
	for ev, err := range c.Subscribe(ctx, runID, 1) {
		if err != nil {
			t.Fatal(err)
		}
		events = append(events, ev)
	}
	return events
}

// The approval agent waits for input, takes it from SendInput and ends
// SUCCEEDED with the answer; ListRuns finds it by waiting_for_input meanwhile.
func TestLiveApprovalFlow(t *testing.T) {
	c, ctx := liveClient(t)
	run := startWaiting(t, ctx, c)

	listed := false
	for r, err := range c.AllRuns(ctx, &runservicev1.ListRunsRequest{Agent: "approval", WaitingForInput: true, PageSize: 1}) {
		if err != nil {
			t.Fatal(err)
		}
		if !r.GetWaitingForInput() {
			t.Fatalf("ListRuns(waiting_for_input) listed %s, which does not wait", r.GetRunId())
		}
		listed = listed || r.GetRunId() == run.GetRunId()
	}
	if !listed {
		t.Fatal("ListRuns(waiting_for_input) does not list the waiting run")
	}

	ev, err := c.SendInput(ctx, run.GetRunId(), map[string]any{"approve": true, "note": "lgtm"})
	if err != nil {
		t.Fatal(err)
	}
	if ev.GetType() != InputEventType || ev.GetRunId() != run.GetRunId() || ev.GetData().AsMap()["note"] != "lgtm" {
		t.Fatalf("SendInput returned %v, want the input event", ev)
	}
	done, err := c.Wait(ctx, run.GetRunId())
	if err != nil {
		t.Fatal(err)
	}
	result := done.GetResult().AsMap()
	if done.GetState() != runservicev1.RunState_RUN_STATE_SUCCEEDED || result["approved"] != true || result["note"] != "lgtm" {
		t.Fatalf("run ended %s with result %v", StateName(done.GetState()), result)
	}
	if done.GetWaitingForInput() {
		t.Fatal("a finished run still waits for input")
	}
	types := []string{}
	for _, ev := range logOf(t, ctx, c, run.GetRunId()) {
		types = append(types, ev.GetType())
	}
	if want := []string{StateEventType, InputRequestedEventType, InputEventType, StateEventType}; fmt.Sprint(types) != fmt.Sprint(want) {
		t.Fatalf("log %v, want %v", types, want)
	}
}

// SendInput with a repeated request id delivers the input once, answers the
// same event each time, and refuses the id with another input.
func TestLiveRepeatedRequestIDDeliversOnce(t *testing.T) {
	c, ctx := liveClient(t)
	run := startWaiting(t, ctx, c)
	id := newRequestID()
	answer := map[string]any{"approve": false, "note": "not yet"}
	first, err := c.SendInput(ctx, run.GetRunId(), answer, WithRequestID(id))
	if err != nil {
		t.Fatal(err)
	}
	again, err := c.SendInput(ctx, run.GetRunId(), answer, WithRequestID(id))
	if err != nil || again.GetSeq() != first.GetSeq() {
		t.Fatalf("the retry answered %v, %v; want the event at seq %d", again, err, first.GetSeq())
	}
	_, err = c.SendInput(ctx, run.GetRunId(), map[string]any{"approve": true}, WithRequestID(id))
	if !errors.Is(err, ErrRequestIDReused) {
		t.Fatalf("the id with another input: err = %v, want ErrRequestIDReused", err)
	}
	done, err := c.Wait(ctx, run.GetRunId())
	if err != nil || done.GetResult().AsMap()["approved"] != false {
		t.Fatalf("Wait = %v, %v", done, err)
	}
	inputs := 0
	for _, ev := range logOf(t, ctx, c, run.GetRunId()) {
		if ev.GetType() == InputEventType {
			inputs++
		}
	}
	if inputs != 1 {
		t.Fatalf("%d input events in the log, want 1", inputs)
	}
}

// SendInput to a run that has ended fails with reason RUN_ENDED.
func TestLiveSendInputToAnEndedRun(t *testing.T) {
	c, ctx := liveClient(t)
	input, _ := structpb.NewStruct(map[string]any{"text": "done already", "delay": 0})
	run, err := c.StartRun(ctx, &runservicev1.StartRunRequest{Agent: "echo", Input: input})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(ctx, run.GetRunId()); err != nil {
		t.Fatal(err)
	}
	_, err = c.SendInput(ctx, run.GetRunId(), map[string]any{"more": true})
	var e *Error
	if !errors.Is(err, ErrRunEnded) || !errors.As(err, &e) {
		t.Fatalf("err = %v, want ErrRunEnded", err)
	}
	if e.Code != codes.FailedPrecondition || e.Reason != "RUN_ENDED" || e.ErrorReason() != runservicev1.ErrorReason_ERROR_REASON_RUN_ENDED {
		t.Fatalf("got %+v", e)
	}
}

// A snapshot subscription of a finished echo run yields the snapshot (the
// words concatenated) and then the terminal event alone.
func TestLiveSnapshotOfAFinishedEchoRun(t *testing.T) {
	c, ctx := liveClient(t)
	words := make([]string, 300)
	for i := range words {
		words[i] = fmt.Sprintf("w%d", i)
	}
	input, _ := structpb.NewStruct(map[string]any{"text": strings.Join(words, " "), "delay": 0})
	run, err := c.StartRun(ctx, &runservicev1.StartRunRequest{Agent: "echo", Input: input})
	if err != nil {
		t.Fatal(err)
	}
	done, err := c.Wait(ctx, run.GetRunId())
	if err != nil {
		t.Fatal(err)
	}
	var snaps []*runservicev1.RunSnapshot
	var events []*runservicev1.RunEvent
	err = c.SubscribeFunc(ctx, run.GetRunId(), 1, func(ev *runservicev1.RunEvent) error {
		events = append(events, ev)
		return nil
	}, WithSnapshot(func(s *runservicev1.RunSnapshot) error {
		snaps = append(snaps, s)
		return nil
	}))
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 1 || snaps[0].GetSeq() != done.GetLastSeq()-1 {
		t.Fatalf("snapshots %v, want one at seq %d", snaps, done.GetLastSeq()-1)
	}
	if got := snaps[0].GetData().GetStructValue().AsMap()["text"]; got != strings.Join(words, "") {
		t.Fatalf("snapshot text %q, want the words concatenated", got)
	}
	if len(events) != 1 || !IsTerminalEvent(events[0]) || events[0].GetSeq() != done.GetLastSeq() {
		t.Fatalf("events %v after the snapshot, want the terminal event only", seqs(events))
	}
}

// An external run takes AppendEvents (idempotent per producer seq) and
// CloseRun, refuses input, and has no webhook deliveries without webhooks.
func TestLiveExternalRun(t *testing.T) {
	c, ctx := liveClient(t)
	run, err := c.StartRun(ctx, &runservicev1.StartRunRequest{Agent: "external"})
	if err != nil {
		t.Fatal(err)
	}
	req := &runservicev1.AppendEventsRequest{
		RunId:      run.GetRunId(),
		Events:     []*runservicev1.EventInput{{Type: "token", Payload: &runservicev1.EventInput_Text{Text: "hi"}}},
		ProducerId: "p1",
	}
	first, err := c.AppendEvents(ctx, req)
	if err != nil || first.GetDuplicate() {
		t.Fatalf("AppendEvents = %v, %v", first, err)
	}
	retry, err := c.AppendEvents(ctx, req)
	if err != nil || !retry.GetDuplicate() || retry.GetLastSeq() != first.GetLastSeq() {
		t.Fatalf("the retried append = %v, %v; want a duplicate at seq %d", retry, err, first.GetLastSeq())
	}
	if _, err := c.SendInput(ctx, run.GetRunId(), map[string]any{"x": 1}); !errors.Is(err, ErrExternalRun) {
		t.Fatalf("SendInput to an external run: err = %v, want ErrExternalRun", err)
	}
	closed, err := c.CloseRun(ctx, run.GetRunId(), map[string]any{"ok": true})
	if err != nil || closed.GetState() != runservicev1.RunState_RUN_STATE_SUCCEEDED || closed.GetResult().AsMap()["ok"] != true {
		t.Fatalf("CloseRun = %v, %v", closed, err)
	}
	req.ProducerSeq = 1
	if _, err := c.AppendEvents(ctx, req); !errors.Is(err, ErrStreamClosed) {
		t.Fatalf("AppendEvents after CloseRun: err = %v, want ErrStreamClosed", err)
	}
	deliveries, err := c.ListWebhookDeliveries(ctx, run.GetRunId())
	if err != nil || len(deliveries) != 0 {
		t.Fatalf("ListWebhookDeliveries = %v, %v; want none", deliveries, err)
	}
}
