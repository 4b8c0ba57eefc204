package runservice

import (
	"context"
	"errors"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	runservicev1 "github.com/runservice/runservice/clients/go/runservice/v1"
)

const runID = "01a1ffdf-0742-7dc2-9567-13071562e9f8"

func collect(t *testing.T, c *Client, ctx context.Context, from int64, opts ...SubscribeOption) ([]*runservicev1.RunEvent, error) {
	t.Helper()
	var got []*runservicev1.RunEvent
	for ev, err := range c.Subscribe(ctx, runID, from, opts...) {
		if err != nil {
			return got, err
		}
		got = append(got, ev)
	}
	return got, nil
}

func TestSubscribeResumesGapFreeAndDuplicateFree(t *testing.T) {
	for _, tc := range []struct {
		name    string
		batch   int
		overlap int64
		cuts    []int
	}{
		{"single events", 1, 0, []int{10, 0, 25, 1, 7}},
		{"batches with resent overlap", 7, 5, []int{10, 0, 25, 1, 7, 40}},
		{"cut mid-batch", 16, 3, []int{9, 17, 33}},
		{"cut just before the terminal event", 4, 2, []int{101}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeService{events: tickLog(runID, 100, runservicev1.RunState_RUN_STATE_SUCCEEDED),
				batch: tc.batch, overlap: tc.overlap, cuts: tc.cuts}
			c := serveBufconn(t, f)
			got, err := collect(t, c, context.Background(), 1)
			if err != nil {
				t.Fatal(err)
			}
			checkRange(t, seqs(got), 1, 102)
			if !IsTerminalEvent(got[len(got)-1]) {
				t.Fatalf("last event %v is not terminal", got[len(got)-1])
			}
			// Each reconnect asks for the seq after the last one delivered.
			want := []int64{1}
			next := int64(1)
			for _, cut := range tc.cuts {
				next += int64(cut)
				want = append(want, next)
			}
			if tc.overlap == 0 {
				if a := f.attempts(); !slices.Equal(a, want) {
					t.Fatalf("from_seq of the attempts = %v, want %v", a, want)
				}
			} else if a := f.attempts(); len(a) != len(tc.cuts)+1 {
				t.Fatalf("attempts = %v, want %d", a, len(tc.cuts)+1)
			}
		})
	}
}

func TestSubscribeFromTheMiddle(t *testing.T) {
	f := &fakeService{events: tickLog(runID, 60, runservicev1.RunState_RUN_STATE_SUCCEEDED), batch: 5, overlap: 2, cuts: []int{3, 4}}
	c := serveBufconn(t, f)
	got, err := collect(t, c, context.Background(), 40)
	if err != nil {
		t.Fatal(err)
	}
	checkRange(t, seqs(got), 40, 62)
	if a := f.attempts(); a[0] != 40 {
		t.Fatalf("first from_seq %d, want 40", a[0])
	}
}

func TestSubscribeFromZeroMeansStart(t *testing.T) {
	f := &fakeService{events: tickLog(runID, 3, runservicev1.RunState_RUN_STATE_SUCCEEDED)}
	c := serveBufconn(t, f)
	got, err := collect(t, c, context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	checkRange(t, seqs(got), 1, 5)
}

func TestSubscribeRidesThroughServerRestart(t *testing.T) {
	f := &fakeService{events: tickLog(runID, 200, runservicev1.RunState_RUN_STATE_INTERRUPTED), pace: time.Millisecond}
	s := startTCP(t, f)
	var retries []RetryInfo
	policy := ResumePolicy{BaseDelay: 20 * time.Millisecond, MaxDelay: 200 * time.Millisecond, GiveUpAfter: 5 * time.Second,
		OnRetry: func(r RetryInfo) { retries = append(retries, r) }}
	c, err := Dial(context.Background(), s.addr, WithResumePolicy(policy))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	var got []int64
	restarted := make(chan struct{})
	err = c.SubscribeFunc(context.Background(), runID, 1, func(ev *runservicev1.RunEvent) error {
		got = append(got, ev.GetSeq())
		if ev.GetSeq() == 50 {
			go func() { // kill the server, keep it down a while, bring it back on the same port
				defer close(restarted)
				s.stop()
				time.Sleep(400 * time.Millisecond)
				s.start()
			}()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	<-restarted
	checkRange(t, got, 1, 202)
	if len(retries) == 0 {
		t.Fatal("the restart caused no reconnect")
	}
	for _, r := range retries {
		if status.Code(r.Err) != codes.Unavailable {
			t.Fatalf("retried on %v, want UNAVAILABLE", r.Err)
		}
	}
	a := f.attempts()
	if len(a) < 2 || a[len(a)-1] <= 50 {
		t.Fatalf("attempts %v: want a resume past seq 50", a)
	}
}

func TestSubscribeGivesUpAfterTime(t *testing.T) {
	f := &fakeService{failWith: slices.Repeat([]error{status.Error(codes.Unavailable, "down")}, 1000)}
	c := serveBufconn(t, f)
	start := time.Now()
	_, err := collect(t, c, context.Background(), 1, WithResume(ResumePolicy{BaseDelay: 5 * time.Millisecond, MaxDelay: 20 * time.Millisecond, GiveUpAfter: 200 * time.Millisecond}))
	if !errors.Is(err, ErrGaveUp) || !errors.Is(err, ErrUnavailable) {
		t.Fatalf("err = %v, want ErrGaveUp wrapping UNAVAILABLE", err)
	}
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("status.Code(err) = %v", status.Code(err))
	}
	if d := time.Since(start); d < 200*time.Millisecond || d > 2*time.Second {
		t.Fatalf("gave up after %v, want about 200ms", d)
	}
}

func TestSubscribeGivesUpAfterMaxRetries(t *testing.T) {
	f := &fakeService{failWith: slices.Repeat([]error{status.Error(codes.Unavailable, "down")}, 1000)}
	c := serveBufconn(t, f)
	_, err := collect(t, c, context.Background(), 1, WithResume(ResumePolicy{BaseDelay: time.Millisecond, MaxRetries: 3}))
	if !errors.Is(err, ErrGaveUp) {
		t.Fatalf("err = %v, want ErrGaveUp", err)
	}
	if n := len(f.attempts()); n != 4 {
		t.Fatalf("%d attempts, want 1 + 3 retries", n)
	}
}

func TestSubscribeProgressResetsTheRetryBudget(t *testing.T) {
	// 6 cuts, each after one new event: more failures than MaxRetries in
	// total, but never more than one in a row without progress.
	f := &fakeService{events: tickLog(runID, 10, runservicev1.RunState_RUN_STATE_SUCCEEDED), cuts: []int{1, 1, 1, 1, 1, 1}}
	c := serveBufconn(t, f)
	got, err := collect(t, c, context.Background(), 1, WithResume(ResumePolicy{BaseDelay: time.Millisecond, MaxRetries: 1}))
	if err != nil {
		t.Fatal(err)
	}
	checkRange(t, seqs(got), 1, 12)
}

func TestSubscribeDoesNotRetryPermanentErrors(t *testing.T) {
	f := &fakeService{failWith: []error{richError(codes.NotFound, "run not found", "RUN_NOT_FOUND", map[string]string{"run_id": runID})}}
	c := serveBufconn(t, f)
	_, err := collect(t, c, context.Background(), 1)
	if !errors.Is(err, ErrRunNotFound) {
		t.Fatalf("err = %v, want ErrRunNotFound", err)
	}
	if n := len(f.attempts()); n != 1 {
		t.Fatalf("%d attempts, want 1", n)
	}
}

func TestSubscribeOutOfRange(t *testing.T) {
	f := &fakeService{events: tickLog(runID, 3, runservicev1.RunState_RUN_STATE_SUCCEEDED)}
	c := serveBufconn(t, f)
	_, err := collect(t, c, context.Background(), 99)
	if !errors.Is(err, ErrSeqOutOfRange) {
		t.Fatalf("err = %v, want ErrSeqOutOfRange", err)
	}
}

func TestSubscribeWithoutResumeReturnsTheFailure(t *testing.T) {
	f := &fakeService{events: tickLog(runID, 10, runservicev1.RunState_RUN_STATE_SUCCEEDED), cuts: []int{4}}
	c := serveBufconn(t, f)
	got, err := collect(t, c, context.Background(), 1, WithoutResume())
	if status.Code(err) != codes.Unavailable || errors.Is(err, ErrGaveUp) {
		t.Fatalf("err = %v, want the plain UNAVAILABLE", err)
	}
	checkRange(t, seqs(got), 1, 4)
}

func TestSubscribeEndsWhenTheStreamEndsOK(t *testing.T) {
	evs := tickLog(runID, 5, runservicev1.RunState_RUN_STATE_SUCCEEDED)
	f := &fakeService{events: evs[:4]} // no terminal event, then OK
	c := serveBufconn(t, f)
	got, err := collect(t, c, context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	checkRange(t, seqs(got), 1, 4)
}

func TestSubscribeStopsAtTheTerminalEvent(t *testing.T) {
	f := &fakeService{events: tickLog(runID, 5, runservicev1.RunState_RUN_STATE_STOPPED), hold: true}
	c := serveBufconn(t, f)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := collect(t, c, ctx, 1) // the server holds the stream open: the client must end by itself
	if err != nil {
		t.Fatal(err)
	}
	checkRange(t, seqs(got), 1, 7)
	if StateName(got[6].GetState()) != "STOPPED" {
		t.Fatalf("final state %v", got[6].GetState())
	}
}

func TestSubscribeRefusesAGap(t *testing.T) {
	evs := tickLog(runID, 5, runservicev1.RunState_RUN_STATE_SUCCEEDED)
	f := &fakeService{events: append(evs[:2:2], evs[3:]...)}
	c := serveBufconn(t, f)
	got, err := collect(t, c, context.Background(), 1)
	if !errors.Is(err, ErrSequenceGap) {
		t.Fatalf("err = %v, want ErrSequenceGap", err)
	}
	checkRange(t, seqs(got), 1, 2)
}

func TestSubscribeHonoursCancellationWhileStreaming(t *testing.T) {
	f := &fakeService{events: tickLog(runID, 5, runservicev1.RunState_RUN_STATE_SUCCEEDED)[:3], hold: true}
	c := serveBufconn(t, f)
	ctx, cancel := context.WithCancel(context.Background())
	var n int
	err := c.SubscribeFunc(ctx, runID, 1, func(*runservicev1.RunEvent) error {
		n++
		if n == 3 {
			time.AfterFunc(20*time.Millisecond, cancel)
		}
		return nil
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if n != 3 {
		t.Fatalf("%d events, want 3", n)
	}
}

func TestSubscribeHonoursCancellationWhileBackingOff(t *testing.T) {
	f := &fakeService{failWith: slices.Repeat([]error{status.Error(codes.Unavailable, "down")}, 1000)}
	c := serveBufconn(t, f)
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := collect(t, c, ctx, 1, WithResume(ResumePolicy{BaseDelay: time.Second, MaxDelay: time.Second, GiveUpAfter: -1}))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want context.DeadlineExceeded", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("returned after %v: the backoff sleep ignored the context", d)
	}
}

func TestSubscribeBreakClosesTheStream(t *testing.T) {
	f := &fakeService{events: tickLog(runID, 100, runservicev1.RunState_RUN_STATE_SUCCEEDED), hold: true}
	c := serveBufconn(t, f)
	var got []int64
	for ev, err := range c.Subscribe(context.Background(), runID, 1) {
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, ev.GetSeq())
		if len(got) == 5 {
			break
		}
	}
	checkRange(t, got, 1, 5)
	for deadline := time.Now().Add(2 * time.Second); f.open.Load() != 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the server's stream is still open after the loop ended")
		}
	}
}

func TestSubscribeHandlerErrorIsReturnedAsIs(t *testing.T) {
	f := &fakeService{events: tickLog(runID, 10, runservicev1.RunState_RUN_STATE_SUCCEEDED)}
	c := serveBufconn(t, f)
	mine := errors.New("mine")
	err := c.SubscribeFunc(context.Background(), runID, 1, func(ev *runservicev1.RunEvent) error {
		if ev.GetSeq() == 3 {
			return mine
		}
		return nil
	})
	if err != mine {
		t.Fatalf("err = %v, want the handler's error", err)
	}
}

func TestSubscribeRefreshesAnExpiredToken(t *testing.T) {
	f := &fakeService{events: tickLog(runID, 3, runservicev1.RunState_RUN_STATE_SUCCEEDED),
		failWith: []error{richError(codes.Unauthenticated, "token expired", "TOKEN_EXPIRED", nil)}}
	var calls atomic.Int32
	c := serveBufconn(t, f, WithTokenSource(func(context.Context) (string, error) {
		return []string{"old", "new"}[min(calls.Add(1)-1, 1)], nil
	}))
	got, err := collect(t, c, context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	checkRange(t, seqs(got), 1, 5)
	if a := f.authSeen(); !slices.Equal(a, []string{"Bearer old", "Bearer new"}) {
		t.Fatalf("authorization seen %v", a)
	}

	// A fixed token cannot get better: no retry.
	f2 := &fakeService{failWith: []error{richError(codes.Unauthenticated, "token expired", "TOKEN_EXPIRED", nil)}}
	c2 := serveBufconn(t, f2, WithToken("fixed"))
	if _, err := collect(t, c2, context.Background(), 1); !errors.Is(err, ErrTokenExpired) {
		t.Fatalf("err = %v, want ErrTokenExpired", err)
	}
}

func TestBackoffDelays(t *testing.T) {
	p := DefaultResumePolicy().withDefaults()
	for n, want := range map[int]time.Duration{1: 100 * time.Millisecond, 2: 200 * time.Millisecond, 3: 400 * time.Millisecond,
		5: 1600 * time.Millisecond, 6: 2 * time.Second, 50: 2 * time.Second} {
		for range 100 {
			if d := p.delay(n); d < want/2 || d > want {
				t.Fatalf("delay(%d) = %v, want within [%v, %v]", n, d, want/2, want)
			}
		}
	}
}

func TestIsTransient(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{status.Error(codes.Unavailable, "connection refused"), true},
		{status.Error(codes.DeadlineExceeded, "proxy timeout"), true},
		{status.Error(codes.Internal, "stream terminated by RST_STREAM with error code: INTERNAL_ERROR"), true},
		{status.Error(codes.Internal, "server closed the stream without sending trailers"), true},
		{richError(codes.Internal, "internal error (error id 1234)", "INTERNAL_ERROR", nil), false},
		{status.Error(codes.NotFound, "nope"), false},
		{status.Error(codes.InvalidArgument, "nope"), false},
		{toError(canceledCtx(), status.Error(codes.Canceled, "context canceled")), false},
		{errors.New("not a status"), false},
	} {
		if got := IsTransient(toError(context.Background(), tc.err)); got != tc.want {
			t.Errorf("IsTransient(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func canceledCtx() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

// A snapshot subscription delivers the snapshot first, then the events after
// it; its reconnects resume from the last seq + 1 and never ask again.
func TestSubscribeWithSnapshotResumesWithoutAskingAgain(t *testing.T) {
	f := &fakeService{
		events:   tickLog(runID, 100, runservicev1.RunState_RUN_STATE_SUCCEEDED),
		snapshot: &runservicev1.RunSnapshot{Seq: 60, Data: structpb.NewStringValue("state as of 60")},
		cuts:     []int{0, 10, 5},
	}
	c := serveBufconn(t, f)
	var snaps []*runservicev1.RunSnapshot
	got, err := collect(t, c, context.Background(), 1, WithSnapshot(func(s *runservicev1.RunSnapshot) error {
		snaps = append(snaps, s)
		return nil
	}))
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 1 || snaps[0].GetSeq() != 60 || snaps[0].GetData().GetStringValue() != "state as of 60" {
		t.Fatalf("snapshots %v, want the one at seq 60", snaps)
	}
	checkRange(t, seqs(got), 61, 102)
	if a := f.attempts(); !slices.Equal(a, []int64{1, 61, 71, 76}) {
		t.Fatalf("from_seq of the attempts = %v", a)
	}
	if a := f.snapshotsAsked(); !slices.Equal(a, []bool{true, false, false, false}) {
		t.Fatalf("snapshot asked per attempt = %v, want only by the first", a)
	}
}

// Without a snapshot that far, a snapshot subscription is a plain one.
func TestSubscribeWithSnapshotWhenThereIsNone(t *testing.T) {
	f := &fakeService{events: tickLog(runID, 20, runservicev1.RunState_RUN_STATE_SUCCEEDED), cuts: []int{4}}
	c := serveBufconn(t, f)
	called := false
	got, err := collect(t, c, context.Background(), 1, WithSnapshot(func(*runservicev1.RunSnapshot) error {
		called = true
		return nil
	}))
	if err != nil {
		t.Fatal(err)
	}
	checkRange(t, seqs(got), 1, 22)
	if called || !slices.Equal(f.snapshotsAsked(), []bool{true, false}) {
		t.Fatalf("snapshot handler called: %v; asked per attempt %v", called, f.snapshotsAsked())
	}
}

// An error from the snapshot handler ends the subscription with that error.
func TestSubscribeSnapshotHandlerErrorIsReturnedAsIs(t *testing.T) {
	f := &fakeService{
		events:   tickLog(runID, 20, runservicev1.RunState_RUN_STATE_SUCCEEDED),
		snapshot: &runservicev1.RunSnapshot{Seq: 5},
	}
	c := serveBufconn(t, f)
	mine := errors.New("cannot apply it")
	err := c.SubscribeFunc(context.Background(), runID, 1, func(*runservicev1.RunEvent) error {
		t.Fatal("an event came after the snapshot handler failed")
		return nil
	}, WithSnapshot(func(*runservicev1.RunSnapshot) error { return mine }))
	if err != mine {
		t.Fatalf("err = %v, want the handler's error as is", err)
	}
}
