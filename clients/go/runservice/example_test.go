package runservice_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"strings"

	"google.golang.org/protobuf/types/known/structpb"

	"github.com/runservice/runservice/clients/go/runservice"
	runservicev1 "github.com/runservice/runservice/clients/go/runservice/v1"
)

// These examples need a running server, so they are compiled but not run.

func Example() {
	ctx := context.Background()
	c, err := runservice.Dial(ctx, "127.0.0.1:50051", runservice.WithToken(os.Getenv("RUNSERVICE_TOKEN")))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	input, _ := structpb.NewStruct(map[string]any{"text": "one two three", "delay": 0.1})
	run, err := c.StartRun(ctx, &runservicev1.StartRunRequest{Agent: "echo", Input: input})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("started", run.GetRunId(), runservice.StateName(run.GetState()))

	// Follows the run to its end, resuming across disconnects and restarts.
	for ev, err := range c.Subscribe(ctx, run.GetRunId(), 1) {
		if err != nil {
			log.Fatal(err)
		}
		payload := ev.GetText()
		if ev.GetType() == runservice.StateEventType {
			payload = runservice.StateName(ev.GetState())
		}
		fmt.Println(ev.GetSeq(), ev.GetType(), payload)
	}

	run, err = c.GetRun(ctx, run.GetRunId())
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(runservice.StateName(run.GetState()), run.GetResult().AsMap())
}

func ExampleClient_AllRuns() {
	ctx := context.Background()
	c, _ := runservice.Dial(ctx, "127.0.0.1:50051", runservice.WithToken(os.Getenv("RUNSERVICE_TOKEN")))
	defer c.Close()

	req := &runservicev1.ListRunsRequest{
		Agent:    "echo",
		States:   []runservicev1.RunState{runservicev1.RunState_RUN_STATE_SUCCEEDED},
		PageSize: 100,
	}
	for run, err := range c.AllRuns(ctx, req) {
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(run.GetRunId(), runservice.StateName(run.GetState()), run.GetLastSeq())
	}
}

func ExampleClient_ListRuns() {
	ctx := context.Background()
	c, _ := runservice.Dial(ctx, "127.0.0.1:50051", runservice.WithToken(os.Getenv("RUNSERVICE_TOKEN")))
	defer c.Close()

	req := &runservicev1.ListRunsRequest{PageSize: 10}
	for {
		page, err := c.ListRuns(ctx, req)
		if err != nil {
			log.Fatal(err)
		}
		for _, run := range page.GetRuns() {
			fmt.Println(run.GetRunId())
		}
		if page.GetNextPageToken() == "" {
			break
		}
		req.PageToken = page.GetNextPageToken()
	}
}

func ExampleClient_SubscribeFunc() {
	ctx := context.Background()
	c, _ := runservice.Dial(ctx, "127.0.0.1:50051",
		runservice.WithTokenSource(func(ctx context.Context) (string, error) {
			return os.Getenv("RUNSERVICE_TOKEN"), nil // called before every call and reconnect
		}))
	defer c.Close()

	policy := runservice.DefaultResumePolicy()
	policy.MaxRetries = 20
	policy.OnRetry = func(r runservice.RetryInfo) {
		log.Printf("reconnecting from seq %d in %s: %v", r.FromSeq, r.Delay, r.Err)
	}
	err := c.SubscribeFunc(ctx, "01a1ffdf-0742-7dc2-9567-13071562e9f8", 1, func(ev *runservicev1.RunEvent) error {
		fmt.Println(ev.GetSeq(), ev.GetType())
		return nil
	}, runservice.WithResume(policy))
	if errors.Is(err, runservice.ErrGaveUp) {
		log.Fatal("the server stayed unreachable: ", err)
	}
}

func ExampleError() {
	ctx := context.Background()
	c, _ := runservice.Dial(ctx, "127.0.0.1:50051", runservice.WithToken(os.Getenv("RUNSERVICE_TOKEN")))
	defer c.Close()

	err := c.DeleteRun(ctx, "0190f6e4-8c4e-7a1b-9c2d-3e4f5a6b7c8d")
	switch {
	case errors.Is(err, runservice.ErrRunNotFound):
		fmt.Println("no such run")
	case errors.Is(err, runservice.ErrRunActive):
		fmt.Println("stop it first")
	case err != nil:
		var e *runservice.Error
		if errors.As(err, &e) {
			fmt.Println(e.Code, e.Reason, e.Metadata, e.Message)
		}
	}
}

func ExampleClient_SendInput() {
	ctx := context.Background()
	c, _ := runservice.Dial(ctx, "127.0.0.1:50051", runservice.WithToken(os.Getenv("RUNSERVICE_TOKEN")))
	defer c.Close()

	// The approval agent asks its question (an input.requested event), then waits.
	question, _ := structpb.NewStruct(map[string]any{"question": "Deploy to production?"})
	run, err := c.StartRun(ctx, &runservicev1.StartRunRequest{Agent: "approval", Input: question})
	if err != nil {
		log.Fatal(err)
	}
	for ev, err := range c.Subscribe(ctx, run.GetRunId(), 1) {
		if err != nil {
			log.Fatal(err)
		}
		if ev.GetType() == runservice.InputRequestedEventType {
			break // run.GetWaitingForInput() is true from now on
		}
	}

	// Retried on UNAVAILABLE under one request id: the agent gets it once.
	ev, err := c.SendInput(ctx, run.GetRunId(), map[string]any{"approve": true, "note": "go ahead"})
	switch {
	case errors.Is(err, runservice.ErrRunEnded):
		log.Fatal("the run ended before the answer arrived")
	case err != nil:
		log.Fatal(err)
	}
	fmt.Println("input at seq", ev.GetSeq())

	run, err = c.Wait(ctx, run.GetRunId())
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(runservice.StateName(run.GetState()), run.GetResult().AsMap())
}

func ExampleWithSnapshot() {
	ctx := context.Background()
	c, _ := runservice.Dial(ctx, "127.0.0.1:50051", runservice.WithToken(os.Getenv("RUNSERVICE_TOKEN")))
	defer c.Close()

	// The echo agent's output so far in one message, then only the tokens after it.
	var text strings.Builder
	err := c.SubscribeFunc(ctx, "01a1ffdf-0742-7dc2-9567-13071562e9f8", 1, func(ev *runservicev1.RunEvent) error {
		text.WriteString(ev.GetText())
		return nil
	}, runservice.WithSnapshot(func(s *runservicev1.RunSnapshot) error {
		text.WriteString(s.GetData().GetStructValue().GetFields()["text"].GetStringValue())
		return nil
	}))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(text.String())
}
