package client_test

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

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
