// Command scenario exercises the Go client against a real runservice server,
// for the cross-language resume tests. It prints JSON lines on stdout: progress
// lines with a "phase" key (the test harness kills and restarts the server
// when it sees them), then one {"summary": {...}} line. Diagnostics go to
// stderr.
//
//	scenario --addr 127.0.0.1:50051 --token TOKEN --scenario replay|live
//
// Without --token it uses RUNSERVICE_TOKEN, else, on a loopback address, the
// development token of `make run`, as the runservice CLI does.
//
// replay: start a 200-tick run and wait for it to finish; read events 1..50
// with a plain Subscribe and cancel it; then follow from 51 with the resuming
// Subscribe, slowly, across a server restart, to the terminal event.
//
// live: start a 10000-tick run (10ms apart); follow it from 1 with the
// resuming Subscribe; after seq 100 the server is killed and restarted, which
// interrupts the run; read on to its INTERRUPTED terminal event.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	"google.golang.org/protobuf/types/known/structpb"

	"github.com/runservice/runservice/clients/go/internal/clienv"
	"github.com/runservice/runservice/clients/go/runservice"
	runservicev1 "github.com/runservice/runservice/clients/go/runservice/v1"
)

// summary is the last output line; its keys are part of the harness contract.
type summary struct {
	Scenario      string `json:"scenario"`
	FirstSeq      int64  `json:"first_seq"`
	LastSeq       int64  `json:"last_seq"`
	Count         int    `json:"count"`
	GapFree       bool   `json:"gap_free"`
	Duplicates    int    `json:"duplicates"`
	Ticks         int    `json:"ticks"`
	FinalState    string `json:"final_state"`
	GetRunLastSeq int64  `json:"get_run_last_seq"`
	GetRunState   string `json:"get_run_state"`
}

// tally records every event the scenario received, in order.
type tally struct {
	seqs     []int64
	seen     map[int64]bool
	dups     int
	ticks    int
	terminal *runservicev1.RunEvent
}

func (t *tally) add(ev *runservicev1.RunEvent) {
	if t.seen == nil {
		t.seen = map[int64]bool{}
	}
	if t.seen[ev.GetSeq()] {
		t.dups++
	}
	t.seen[ev.GetSeq()] = true
	t.seqs = append(t.seqs, ev.GetSeq())
	if ev.GetType() == "tick" {
		t.ticks++
	}
	if runservice.IsTerminalEvent(ev) {
		t.terminal = ev
	}
}

func (t *tally) gapFree() bool {
	for i, s := range t.seqs {
		if s != t.seqs[0]+int64(i) {
			return false
		}
	}
	return len(t.seqs) > 0
}

func emit(v any) {
	line, err := json.Marshal(v)
	if err != nil {
		log.Fatalf("encoding output: %v", err)
	}
	// os.Stdout is unbuffered: each line is written (flushed) at once.
	if _, err := os.Stdout.Write(append(line, '\n')); err != nil {
		log.Fatalf("writing output: %v", err)
	}
}

func main() {
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	log.SetPrefix("scenario: ")
	log.SetOutput(os.Stderr)

	a, err := parseArgs(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "scenario: %v\n", err)
		os.Exit(2)
	}
	if a.token == "" {
		if a.token, err = clienv.Token(a.addr); err != nil {
			log.Fatalf("reading the development token: %v", err)
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()

	if err := run(ctx, a.addr, a.token, a.scenario); err != nil {
		log.Printf("FAILED: %v", err)
		os.Exit(1)
	}
}

// args is the command line; an empty token means "find one as the CLI does".
type args struct {
	addr, token, scenario string
}

// parseArgs parses the flags, writing usage and errors to out. The token's
// default is looked up after parsing, never shown: --help must not print it.
func parseArgs(argv []string, out io.Writer) (args, error) {
	var a args
	fs := flag.NewFlagSet("scenario", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&a.addr, "addr", clienv.DefaultAddr, "server address, HOST:PORT")
	fs.StringVar(&a.token, "token", "", "bearer token (from RUNSERVICE_TOKEN or the dev token)")
	fs.StringVar(&a.scenario, "scenario", "", "replay or live")
	if err := fs.Parse(argv); err != nil {
		return a, err
	}
	if a.scenario != "replay" && a.scenario != "live" {
		return a, errors.New("--scenario must be replay or live")
	}
	return a, nil
}

func run(ctx context.Context, addr, token, scenario string) error {
	policy := runservice.DefaultResumePolicy()
	policy.OnRetry = func(r runservice.RetryInfo) {
		log.Printf("subscribe failed (%v); reconnect #%d from seq %d in %s", r.Err, r.Attempt, r.FromSeq, r.Delay.Round(time.Millisecond))
	}
	c, err := runservice.Dial(ctx, addr, runservice.WithToken(token), runservice.WithResumePolicy(policy))
	if err != nil {
		return fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()

	input := map[string]any{"count": 200}
	if scenario == "live" {
		input = map[string]any{"count": 10000, "interval": 0.01}
	}
	runID, err := startRun(ctx, c, input)
	if err != nil {
		return err
	}
	log.Printf("started run %s (%s)", runID, scenario)

	var t tally
	switch scenario {
	case "replay":
		err = replay(ctx, c, runID, &t)
	case "live":
		err = live(ctx, c, runID, &t)
	}
	if err != nil {
		return err
	}
	if len(t.seqs) == 0 {
		return errors.New("no events received")
	}
	if t.terminal == nil {
		return fmt.Errorf("the event stream ended without a terminal event (last seq %d)", t.seqs[len(t.seqs)-1])
	}

	final, err := retryUnavailable(ctx, func() (*runservicev1.Run, error) { return c.GetRun(ctx, runID) })
	if err != nil {
		return fmt.Errorf("GetRun: %w", err)
	}
	s := summary{
		Scenario:      scenario,
		FirstSeq:      t.seqs[0],
		LastSeq:       t.seqs[len(t.seqs)-1],
		Count:         len(t.seqs),
		GapFree:       t.gapFree(),
		Duplicates:    t.dups,
		Ticks:         t.ticks,
		FinalState:    runservice.StateName(t.terminal.GetState()),
		GetRunLastSeq: final.GetLastSeq(),
		GetRunState:   runservice.StateName(final.GetState()),
	}
	emit(map[string]summary{"summary": s})
	if !s.GapFree || s.Duplicates != 0 {
		return fmt.Errorf("the sequence has gaps or duplicates: %+v", s)
	}
	return nil
}

// startRun starts a ticker run, retrying UNAVAILABLE (a server still coming
// up) with the same request_id, so a retry cannot start a second run.
func startRun(ctx context.Context, c *runservice.Client, input map[string]any) (string, error) {
	in, err := structpb.NewStruct(input)
	if err != nil {
		return "", err
	}
	var key [16]byte
	_, _ = rand.Read(key[:])
	req := &runservicev1.StartRunRequest{Agent: "ticker", Input: in, RequestId: hex.EncodeToString(key[:])}
	r, err := retryUnavailable(ctx, func() (*runservicev1.Run, error) { return c.StartRun(ctx, req) })
	if err != nil {
		return "", fmt.Errorf("StartRun: %w", err)
	}
	return r.GetRunId(), nil
}

func replay(ctx context.Context, c *runservice.Client, runID string, t *tally) error {
	// Wait for the whole log to exist, so everything below is replay.
	for {
		r, err := retryUnavailable(ctx, func() (*runservicev1.Run, error) { return c.GetRun(ctx, runID) })
		if err != nil {
			return fmt.Errorf("GetRun: %w", err)
		}
		if runservice.IsTerminal(r.GetState()) {
			log.Printf("run is %s with last_seq %d", runservice.StateName(r.GetState()), r.GetLastSeq())
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}

	// A plain stream: read 1..50, then cancel it by leaving the loop.
	for ev, err := range c.Subscribe(ctx, runID, 1, runservice.WithoutResume()) {
		if err != nil {
			return fmt.Errorf("plain Subscribe: %w", err)
		}
		t.add(ev)
		if len(t.seqs) == 50 {
			break
		}
	}
	if len(t.seqs) != 50 || t.seqs[49] != 50 {
		return fmt.Errorf("plain Subscribe delivered %d events, last seq %v; want 1..50", len(t.seqs), t.seqs[len(t.seqs)-1:])
	}
	emit(map[string]any{"phase": "first50", "last_seq": 50})

	// The resuming stream from 51, slowly, while the server is restarted.
	for ev, err := range c.Subscribe(ctx, runID, 51) {
		if err != nil {
			return fmt.Errorf("resuming Subscribe: %w", err)
		}
		t.add(ev)
		if ev.GetSeq() == 51 {
			emit(map[string]any{"phase": "resumed", "seq": 51})
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

func live(ctx context.Context, c *runservice.Client, runID string, t *tally) error {
	announced := false
	for ev, err := range c.Subscribe(ctx, runID, 1) {
		if err != nil {
			return fmt.Errorf("resuming Subscribe: %w", err)
		}
		t.add(ev)
		if !announced && ev.GetSeq() >= 100 {
			announced = true
			emit(map[string]any{"phase": "live", "seq": ev.GetSeq()})
		}
	}
	return nil
}

// retryUnavailable calls fn until it succeeds, fails with something other
// than UNAVAILABLE, or 30 seconds have passed.
func retryUnavailable(ctx context.Context, fn func() (*runservicev1.Run, error)) (*runservicev1.Run, error) {
	deadline := time.Now().Add(30 * time.Second)
	delay := 100 * time.Millisecond
	for {
		r, err := fn()
		if err == nil || !errors.Is(err, runservice.ErrUnavailable) || time.Now().After(deadline) {
			return r, err
		}
		log.Printf("%v; retrying in %s", err, delay)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, 2*time.Second)
	}
}
