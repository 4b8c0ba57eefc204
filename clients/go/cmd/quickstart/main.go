// Command quickstart starts a ticker run and follows its events to the end; the Go
// snippet in docs/clients.md is taken from it.
//
//	RUNSERVICE_ADDR=127.0.0.1:50051 RUNSERVICE_TOKEN=... go run ./cmd/quickstart
//
// Like the runservice CLI, it defaults to 127.0.0.1:50051 and, with RUNSERVICE_TOKEN
// unset and a loopback address, uses the development token of `make run`.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"

	"google.golang.org/protobuf/types/known/structpb"

	"github.com/runservice/runservice/clients/go/internal/clienv"
	"github.com/runservice/runservice/clients/go/runservice"
	runservicev1 "github.com/runservice/runservice/clients/go/runservice/v1"
)

func main() {
	ctx := context.Background()
	addr := clienv.Addr()
	token, err := clienv.Token(addr)
	if err != nil {
		log.Fatal(err)
	}

	c, err := runservice.Dial(ctx, addr, runservice.WithToken(token))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	input, _ := structpb.NewStruct(map[string]any{"count": 5})
	run, err := c.StartRun(ctx, &runservicev1.StartRunRequest{Agent: "ticker", Input: input})
	if err != nil {
		log.Fatal(err)
	}
	for ev, err := range c.Subscribe(ctx, run.GetRunId(), 1) {
		if err != nil {
			log.Fatal(err) // e.g. errors.Is(err, runservice.ErrRunNotFound)
		}
		if ev.GetType() != runservice.StateEventType {
			fmt.Println(ev.GetSeq(), ev.GetType(), payload(ev))
			continue
		}
		fmt.Println(ev.GetSeq(), ev.GetType(), runservice.StateName(ev.GetState()))
	}

	_, err = c.GetRun(ctx, "0190f6e4-8c4e-7a1b-9c2d-3e4f5a6b7c8d")
	if errors.Is(err, runservice.ErrRunNotFound) {
		fmt.Println("not found:", err)
	}
}

// payload is an ordinary event's content as the runservice CLI's tail shows it:
// the text, the data as JSON, or the size of the bytes.
func payload(ev *runservicev1.RunEvent) string {
	switch p := ev.GetPayload().(type) {
	case *runservicev1.RunEvent_Text:
		return p.Text
	case *runservicev1.RunEvent_Data:
		data, err := json.Marshal(p.Data.AsMap())
		if err != nil {
			return fmt.Sprintf("<%v>", err)
		}
		return string(data)
	case *runservicev1.RunEvent_Binary:
		return fmt.Sprintf("<%d bytes>", len(p.Binary))
	}
	return ""
}
