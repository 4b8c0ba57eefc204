// Command producer-go feeds a runservice stream from outside the server: it creates
// the stream (an external run) and appends JSON messages to it as an idempotent
// producer, retrying each append until it is answered, so that a dropped connection
// never loses nor doubles a message. Then it closes the stream.
//
//	go run . -url http://127.0.0.1:8080 -token-file ~/.local/share/runservice/dev-token \
//	    -stream demo/feed -count 20
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

type producer struct {
	client *http.Client
	url    string // the stream's URL
	token  string
	id     string
	epoch  int
	seq    int
}

// do sends one request, retrying transport errors and 5xx answers with a backoff; any
// other answer is returned.
func (p *producer) do(method string, body []byte, headers map[string]string) (*http.Response, error) {
	delay := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		req, err := http.NewRequest(method, p.url, bytes.NewReader(body))
		if err != nil {
			return nil, err
		}
		req.Header.Set("Authorization", "Bearer "+p.token) // never in the URL
		for k, v := range headers {
			req.Header.Set(k, v)
		}
		resp, err := p.client.Do(req)
		if err == nil && resp.StatusCode < 500 {
			return resp, nil
		}
		if err == nil {
			resp.Body.Close()
			err = fmt.Errorf("server answered %s", resp.Status)
		}
		if attempt == 10 {
			return nil, fmt.Errorf("%s %s: %w", method, p.url, err)
		}
		log.Printf("retrying after %v: %v", delay, err)
		time.Sleep(delay)
		delay *= 2
	}
}

// append sends one message as the producer's next seq. A retry of an append the server
// already took is answered 204: it is not written twice.
func (p *producer) append(message any) error {
	body, err := json.Marshal(message)
	if err != nil {
		return err
	}
	resp, err := p.do(http.MethodPost, body, map[string]string{
		"Content-Type":   "application/json",
		"Producer-Id":    p.id,
		"Producer-Epoch": strconv.Itoa(p.epoch),
		"Producer-Seq":   strconv.Itoa(p.seq),
	})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK, http.StatusNoContent:
		p.seq++
		return nil
	case http.StatusForbidden:
		return errors.New("a newer instance of this producer took over (stale epoch " + resp.Header.Get("Producer-Epoch") + ")")
	default:
		text, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("append refused: %s: %s", resp.Status, strings.TrimSpace(string(text)))
	}
}

func main() {
	base := flag.String("url", "http://127.0.0.1:8080", "runservice's HTTP edge (--http-listen)")
	tokenFile := flag.String("token-file", "", "a file holding the bearer token")
	stream := flag.String("stream", "demo/feed", "the stream's path under /v1/streams/")
	count := flag.Int("count", 20, "how many messages to append")
	id := flag.String("producer", "producer-go", "the producer's id")
	epoch := flag.Int("epoch", 0, "the producer's epoch (raise it for a new instance)")
	flag.Parse()
	raw, err := os.ReadFile(*tokenFile)
	if err != nil {
		log.Fatalf("reading the token: %v", err)
	}
	p := &producer{
		client: &http.Client{Timeout: 10 * time.Second},
		url:    strings.TrimSuffix(*base, "/") + "/v1/streams/" + *stream,
		token:  strings.TrimSpace(string(raw)),
		id:     *id,
		epoch:  *epoch,
	}
	resp, err := p.do(http.MethodPut, nil, map[string]string{"Content-Type": "application/json"})
	if err != nil {
		log.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		log.Fatalf("creating %s: %s", p.url, resp.Status)
	}
	for i := 0; i < *count; i++ {
		if err := p.append(map[string]any{"n": i, "text": fmt.Sprintf("message %d", i)}); err != nil {
			log.Fatal(err)
		}
	}
	resp, err = p.do(http.MethodPost, nil, map[string]string{"Stream-Closed": "true"})
	if err != nil {
		log.Fatal(err)
	}
	resp.Body.Close()
	fmt.Printf("appended %d messages to %s and closed it (next offset %s)\n",
		*count, p.url, resp.Header.Get("Stream-Next-Offset"))
}
