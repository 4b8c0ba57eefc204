package runservice_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"

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
