package client_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/sdk/client"
)

// recorder is a real HTTP listener that records what the client sent and
// answers with h.
func recorder(t *testing.T, h http.HandlerFunc) (*client.Client, *atomic.Int32) {
	t.Helper()
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		h(w, r)
	}))
	t.Cleanup(srv.Close)
	c, err := client.New(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	return c, &n
}

// TestApplyNilLoRAsIsRefused: a nil set is a forgotten field, not "remove
// every LoRA"; nothing reaches the host.
func TestApplyNilLoRAsIsRefused(t *testing.T) {
	c, n := recorder(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte(`{}`))
	})
	_, err := c.ApplyLoRAs(t.Context(), api.ApplyRequest{Model: "m"})
	if err == nil || !strings.Contains(err.Error(), "RemoveLoRAs") {
		t.Fatalf("ApplyLoRAs(nil LoRAs) = %v, want an error naming RemoveLoRAs", err)
	}
	if n.Load() != 0 {
		t.Fatalf("ApplyLoRAs(nil LoRAs) sent %d requests, want none", n.Load())
	}
	if _, err := c.ApplyLoRAs(t.Context(), api.ApplyRequest{LoRAs: []api.ApplyLoRA{}}); err != nil || n.Load() != 1 {
		t.Fatalf("ApplyLoRAs(empty LoRAs) = %v after %d requests, want it sent", err, n.Load())
	}
}

// TestWaitReopensAnEndedStream: an event stream that ends while the job
// still runs is reopened; Wait returns only the final snapshot, and an
// ended ctx while the job never finishes is an error, not a running job.
func TestWaitReopensAnEndedStream(t *testing.T) {
	var opens atomic.Int32
	var state atomic.Value
	state.Store(string(api.JobRunning))
	c, _ := recorder(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/jobs/j1/events":
			w.Header().Set("Content-Type", "text/event-stream")
			if opens.Add(1) >= 3 {
				state.Store(string(api.JobDone))
			}
			fmt.Fprintf(w, "event: state\nid: 1\ndata: {\"job\":\"j1\",\"state\":%q}\n\n", state.Load())
		case "/v1/jobs/j1":
			fmt.Fprintf(w, `{"id":"j1","state":%q}`, state.Load())
		default:
			http.NotFound(w, r)
		}
	})
	j, err := c.Wait(t.Context(), "j1")
	if err != nil || j.State != api.JobDone || opens.Load() != 3 {
		t.Fatalf("Wait = %+v, %v after %d opens; want done after 3", j, err, opens.Load())
	}

	state.Store(string(api.JobRunning))
	opens.Store(-1000)
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	j, err = c.Wait(ctx, "j1")
	if err == nil || !errors.Is(err, context.DeadlineExceeded) || j != nil {
		t.Fatalf("Wait on a job that never ends = %+v, %v; want ctx's error and no job", j, err)
	}
}

// TestPathSegmentsEscapedOnce: a name with a space, a slash or another
// special character reaches the host as that one segment, escaped once.
func TestPathSegmentsEscapedOnce(t *testing.T) {
	for _, tc := range []struct{ name, uri, path string }{
		{"a b", "/pre/v1/models/a%20b/digest", "/pre/v1/models/a b/digest"},
		{"x/y", "/pre/v1/models/x%2Fy/digest", "/pre/v1/models/x/y/digest"},
		{"p%q;r", "/pre/v1/models/p%25q%3Br/digest", "/pre/v1/models/p%q;r/digest"},
	} {
		var uri, path atomic.Value
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			uri.Store(r.RequestURI)
			path.Store(r.URL.Path)
			_, _ = w.Write([]byte(`{"model":"m"}`))
		}))
		c, err := client.New(srv.URL + "/pre/")
		if err != nil {
			t.Fatal(err)
		}
		_, err = c.ModelDigest(t.Context(), tc.name, client.DigestQuery{})
		srv.Close()
		if err != nil {
			t.Fatalf("ModelDigest(%q): %v", tc.name, err)
		}
		if got, _ := uri.Load().(string); !strings.HasPrefix(got, tc.uri) {
			t.Errorf("ModelDigest(%q) sent %s, want %s", tc.name, got, tc.uri)
		}
		if got, _ := path.Load().(string); got != tc.path {
			t.Errorf("ModelDigest(%q): host saw path %q, want %q", tc.name, got, tc.path)
		}
	}
}

// TestDigestQuery: detail and prefix reach the host as docs/api.md names
// them.
func TestDigestQuery(t *testing.T) {
	var query atomic.Value
	c, _ := recorder(t, func(w http.ResponseWriter, r *http.Request) {
		query.Store(r.URL.Query().Encode())
		_, _ = w.Write([]byte(`{"model":"m"}`))
	})
	for _, tc := range []struct {
		q    client.DigestQuery
		want string
	}{
		{client.DigestQuery{}, ""},
		{client.DigestQuery{Detail: true}, "detail=1"},
		{client.DigestQuery{Prefix: "double_blocks.0."}, "prefix=double_blocks.0."},
		{client.DigestQuery{Detail: true, Prefix: "a&b"}, "detail=1&prefix=a%26b"},
	} {
		if _, err := c.ModelDigest(t.Context(), "m", tc.q); err != nil {
			t.Fatalf("ModelDigest(%+v): %v", tc.q, err)
		}
		if got, _ := query.Load().(string); got != tc.want {
			t.Errorf("ModelDigest(%+v) sent query %q, want %q", tc.q, got, tc.want)
		}
	}
}

// TestFrameIsBounded: Frame reads no more than the frame bound, whether
// the host announces the length or streams the body chunked.
func TestFrameIsBounded(t *testing.T) {
	t.Cleanup(client.SetMaxFrame(1024))
	for _, chunked := range []bool{false, true} {
		c, _ := recorder(t, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "image/jpeg")
			w.Header().Set("X-Frame-Id", "1")
			body := strings.Repeat("x", 4096)
			if chunked {
				_, _ = w.Write([]byte(body[:512]))
				w.(http.Flusher).Flush()
				_, _ = w.Write([]byte(body[512:]))
				return
			}
			w.Header().Set("Content-Length", "4096")
			_, _ = w.Write([]byte(body))
		})
		f, err := c.Frame(t.Context(), "j1")
		if err == nil || !strings.Contains(err.Error(), "over 1024") {
			t.Errorf("chunked=%v: Frame of 4096 bytes = %v, %v; want an error naming the 1024-byte bound", chunked, f, err)
		}
	}
	// Within the bound it is read whole.
	c, _ := recorder(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "image/jpeg")
		w.Header().Set("X-Frame-Id", "3")
		_, _ = w.Write([]byte(strings.Repeat("y", 1000)))
	})
	f, err := c.Frame(t.Context(), "j1")
	if err != nil || len(f.Data) != 1000 || f.ID != 3 {
		t.Fatalf("Frame of 1000 bytes = %+v, %v", f, err)
	}
}
