package client

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/arenahost/arenahost/sdk/api"
)

// Event is one server-sent event of a job's event stream.
type Event struct {
	// Type is api.EventState, api.EventProgress or api.EventFrame; ID the
	// event's sequence number in this stream.
	Type string
	ID   string
	Data api.JobEvent
}

// Events follows a job's server-sent events (GET /v1/jobs/{id}/events):
// a "state" event at once and on every state change, "progress" per step,
// "frame" per rendered preview frame. A reader that falls behind loses the
// oldest events (the host never waits for it). Close the stream when done;
// it ends (Next answers io.EOF) after the job's final state.
func (c *Client) Events(ctx context.Context, id string) (*EventStream, error) {
	req, err := c.newRequest(ctx, http.MethodGet, "/v1/jobs/"+seg(id)+"/events", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "text/event-stream")
	resp, err := c.send(req)
	if err != nil {
		return nil, err
	}
	if ct, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); ct != "text/event-stream" {
		resp.Body.Close()
		return nil, fmt.Errorf("arenahost GET %s: Content-Type %q, want text/event-stream", req.URL.Path, resp.Header.Get("Content-Type"))
	}
	return &EventStream{body: resp.Body, rd: bufio.NewReader(resp.Body), path: req.URL.Path}, nil
}

// EventStream is an open event stream; it is not safe for concurrent use.
type EventStream struct {
	body io.Closer
	rd   *bufio.Reader
	path string
}

// maxEventLine bounds one line of the stream.
const maxEventLine = 1 << 20

// Next returns the next event; io.EOF once the host has ended the stream.
func (s *EventStream) Next() (Event, error) {
	var ev Event
	var data strings.Builder
	for {
		line, err := s.readLine()
		if err != nil {
			if errors.Is(err, io.EOF) && data.Len() == 0 {
				return Event{}, io.EOF
			}
			if !errors.Is(err, io.EOF) {
				return Event{}, fmt.Errorf("arenahost GET %s: read event: %w", s.path, err)
			}
			line = "" // a last event without its blank line
		}
		if line == "" {
			if data.Len() == 0 && ev.Type == "" {
				if err != nil {
					return Event{}, io.EOF
				}
				continue
			}
			if ev.Type == "" {
				ev.Type = "message"
			}
			if jerr := json.Unmarshal([]byte(data.String()), &ev.Data); jerr != nil {
				return Event{}, fmt.Errorf("arenahost GET %s: event %s %q: %w", s.path, ev.Type, data.String(), jerr)
			}
			return ev, nil
		}
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "event":
			ev.Type = value
		case "id":
			ev.ID = value
		case "data":
			if data.Len() > 0 {
				data.WriteByte('\n')
			}
			data.WriteString(value)
		}
	}
}

func (s *EventStream) readLine() (string, error) {
	var b []byte
	for {
		part, isPrefix, err := s.rd.ReadLine()
		b = append(b, part...)
		if len(b) > maxEventLine {
			return "", fmt.Errorf("event line over %d bytes", maxEventLine)
		}
		if err != nil {
			return string(b), err
		}
		if !isPrefix {
			return string(b), nil
		}
	}
}

// Close ends the stream.
func (s *EventStream) Close() error { return s.body.Close() }

// Wait follows the job's events until it reaches a final state and returns
// its snapshot then (with the pipeline's result). A job that failed or was
// cancelled is returned without error: its State and Error say so. A stream
// that ends before the final state (a proxy's timeout, a dropped
// connection) is reopened until the job is final or ctx ends; Wait never
// returns a job that is still running.
func (c *Client) Wait(ctx context.Context, id string) (*api.Job, error) {
	backoff := waitRetry
	for {
		if err := c.follow(ctx, id); err != nil {
			return nil, err
		}
		j, err := c.Job(ctx, id)
		if err != nil {
			return nil, err
		}
		if j.State.Final() {
			return j, nil
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("arenahost wait for job %s (still %s): %w", id, j.State, ctx.Err())
		case <-t.C:
		}
		backoff = min(2*backoff, maxWaitRetry)
	}
}

// waitRetry and maxWaitRetry pace Wait's reopening of an event stream that
// ended before the job's final state.
const (
	waitRetry    = 50 * time.Millisecond
	maxWaitRetry = 2 * time.Second
)

// follow reads the job's events until a final state or the stream's end.
func (c *Client) follow(ctx context.Context, id string) error {
	s, err := c.Events(ctx, id)
	if err != nil {
		return err
	}
	defer s.Close()
	for {
		ev, err := s.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if ev.Type == api.EventState && ev.Data.State.Final() {
			return nil
		}
	}
}

// Frame is one preview frame.
type Frame struct {
	// ID numbers the job's frames from 1; Step is the step it shows;
	// Generation the preview plugin generation that rendered it.
	ID         uint64
	Step       int
	Generation uint64
	// ContentType is "image/jpeg" or "image/png" (the job's
	// preview.format); Data the encoded image.
	ContentType string
	Data        []byte
}

// Frame returns the job's newest preview frame (GET
// /v1/jobs/{id}/preview.jpg); an *Error with Code "no_frame" before the
// first.
func (c *Client) Frame(ctx context.Context, id string) (*Frame, error) {
	req, err := c.newRequest(ctx, http.MethodGet, "/v1/jobs/"+seg(id)+"/preview.jpg", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "image/*")
	resp, err := c.send(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.ContentLength > maxFrame {
		return nil, fmt.Errorf("arenahost GET %s: frame of %d bytes over %d", req.URL.Path, resp.ContentLength, maxFrame)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxFrame+1))
	if err != nil {
		return nil, fmt.Errorf("arenahost GET %s: read frame: %w", req.URL.Path, err)
	}
	if int64(len(data)) > maxFrame {
		return nil, fmt.Errorf("arenahost GET %s: frame over %d bytes", req.URL.Path, maxFrame)
	}
	return frameOf(resp.Header, data), nil
}

func frameOf(h interface{ Get(string) string }, data []byte) *Frame {
	f := &Frame{ContentType: h.Get("Content-Type"), Data: data}
	f.ID, _ = strconv.ParseUint(h.Get("X-Frame-Id"), 10, 64)
	f.Step, _ = strconv.Atoi(h.Get("X-Frame-Step"))
	f.Generation, _ = strconv.ParseUint(h.Get("X-Preview-Generation"), 10, 64)
	return f
}

// Previews follows a job's preview frames as they are rendered (the MJPEG
// stream, GET /v1/jobs/{id}/preview.mjpeg): the newest frame at once, then
// each new one. Only the newest frame matters, so a reader that falls
// behind skips frames (their IDs show the gap). It ends (Next answers
// io.EOF) after the job's last frame.
func (c *Client) Previews(ctx context.Context, id string) (*PreviewStream, error) {
	req, err := c.newRequest(ctx, http.MethodGet, "/v1/jobs/"+seg(id)+"/preview.mjpeg", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "multipart/x-mixed-replace")
	resp, err := c.send(req)
	if err != nil {
		return nil, err
	}
	ct, params, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if err != nil || ct != "multipart/x-mixed-replace" || params["boundary"] == "" {
		resp.Body.Close()
		return nil, fmt.Errorf("arenahost GET %s: Content-Type %q, want multipart/x-mixed-replace with a boundary", req.URL.Path, resp.Header.Get("Content-Type"))
	}
	return &PreviewStream{body: resp.Body, mr: multipart.NewReader(resp.Body, params["boundary"]), path: req.URL.Path}, nil
}

// PreviewStream is an open preview stream; it is not safe for concurrent
// use.
type PreviewStream struct {
	body io.Closer
	mr   *multipart.Reader
	path string
}

// maxFrame bounds one frame, of Frame and of a PreviewStream (a PNG of
// the largest preview side, 8192², is far below it); a variable so tests
// can lower it.
var maxFrame int64 = 256 << 20

// Next returns the next frame; io.EOF once the job's last frame was sent.
func (s *PreviewStream) Next() (*Frame, error) {
	p, err := s.mr.NextPart()
	if errors.Is(err, io.EOF) {
		return nil, io.EOF
	}
	if err != nil {
		return nil, fmt.Errorf("arenahost GET %s: next frame: %w", s.path, err)
	}
	defer p.Close()
	data, err := io.ReadAll(io.LimitReader(p, maxFrame+1))
	if err != nil {
		return nil, fmt.Errorf("arenahost GET %s: read frame: %w", s.path, err)
	}
	if int64(len(data)) > maxFrame {
		return nil, fmt.Errorf("arenahost GET %s: frame over %d bytes", s.path, maxFrame)
	}
	return frameOf(p.Header, data), nil
}

// Close ends the stream.
func (s *PreviewStream) Close() error { return s.body.Close() }
