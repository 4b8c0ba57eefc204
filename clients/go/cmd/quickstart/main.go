// Command quickstart starts a ticker run and follows its events to the end; the Go
// snippet in docs/clients.md is taken from it.
//
//	RUNSERVICE_ADDR=127.0.0.1:50051 RUNSERVICE_TOKEN=... go run ./cmd/quickstart
package main

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

func main() {
	ctx := context.Background()
	addr, token := os.Getenv("RUNSERVICE_ADDR"), os.Getenv("RUNSERVICE_TOKEN")

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
		fmt.Println(ev.GetSeq(), ev.GetType(), runservice.StateName(ev.GetState()))
	}

	_, err = c.GetRun(ctx, "0190f6e4-8c4e-7a1b-9c2d-3e4f5a6b7c8d")
	if errors.Is(err, runservice.ErrRunNotFound) {
		fmt.Println("not found:", err)
	}
}
