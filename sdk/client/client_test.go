package client_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/sdk/client"
	"github.com/arenahost/arenahost/sdk/client/tensors"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func TestNewRefusesBadURLs(t *testing.T) {
	for _, u := range []string{"", "127.0.0.1:7860", "ftp://h/", "http://", "://x"} {
		if _, err := client.New(u); err == nil {
			t.Errorf("New(%q): no error", u)
		}
	}
	c, err := client.New("http://127.0.0.1:7860/prefix/?q=1")
	if err != nil || c.BaseURL() != "http://127.0.0.1:7860/prefix" {
		t.Fatalf("New: %v, base %q", err, c.BaseURL())
	}
}

// TestAgainstServe drives a real `arenahost serve` (the built binary, with
// the built lora-nf4 plugin and a token) through every kind of route the
// client has, success and error answers alike.
func TestAgainstServe(t *testing.T) {
	h := testenv.StartHost(t, []string{"lora-nf4"}, "--token", "s3cret")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := client.New(h.URL, client.WithToken("s3cret"))
	if err != nil {
		t.Fatal(err)
	}
	anon, err := client.New(h.URL + "/")
	if err != nil {
		t.Fatal(err)
	}

	if hl, err := anon.Health(ctx); err != nil || hl.Status != "ok" {
		t.Fatalf("Health: %+v %v", hl, err)
	}
	if st, err := anon.Arena(ctx); err != nil || st.Backend == "" || st.Allocated == 0 {
		t.Fatalf("Arena: %+v %v", st, err)
	}
	if hist, err := anon.ArenaHistory(ctx, time.Now().Add(-time.Hour)); err != nil || hist.Backend == "" || hist.IntervalSeconds <= 0 {
		t.Fatalf("ArenaHistory: %+v %v", hist, err)
	}
	if u, err := anon.ArenaUsage(ctx); err != nil || len(u.ByOwner) == 0 {
		t.Fatalf("ArenaUsage: %+v %v", u, err)
	}
	models, err := anon.Models(ctx)
	if err != nil || len(models) != 1 || models[0].Name != "sample" || models[0].Weights == 0 {
		t.Fatalf("Models: %+v %v", models, err)
	}
	files, err := anon.ModelFiles(ctx)
	if err != nil || len(files) == 0 || files[0].Loaded[0] != "sample" {
		t.Fatalf("ModelFiles: %+v %v", files, err)
	}

	// Reads need no token; a mutating route without it is 401.
	_, err = anon.LoadModel(ctx, api.LoadModelRequest{Path: files[0].Path, Name: "second"})
	wantErr(t, "LoadModel without token", err, 401, "unauthorized")
	_, err = c.LoadModel(ctx, api.LoadModelRequest{Path: "../outside.safetensors"})
	wantErr(t, "LoadModel outside", err, 400, "bad_path")
	m, err := c.LoadModel(ctx, api.LoadModelRequest{Path: files[0].Path, Name: "second"})
	if err != nil || m.Name != "second" || m.Weights != models[0].Weights {
		t.Fatalf("LoadModel: %+v %v", m, err)
	}
	_, err = c.LoadModel(ctx, api.LoadModelRequest{Path: files[0].Path, Name: "second"})
	wantErr(t, "LoadModel twice", err, 409, "conflict")
	if err := c.UnloadModel(ctx, "second"); err != nil {
		t.Fatalf("UnloadModel: %v", err)
	}
	wantErr(t, "UnloadModel unknown", c.UnloadModel(ctx, "second"), 404, "not_found")

	d1, err := anon.ModelDigest(ctx, "sample", client.DigestQuery{})
	if err != nil || len(d1.SHA256) != 64 || d1.Tensors != models[0].Tensors {
		t.Fatalf("ModelDigest: %+v %v", d1, err)
	}
	ts, err := tensors.Get(ctx, anon, "sample", tensors.Query{Prefix: "img_in"})
	if err != nil || len(ts.GetTensors()) == 0 || !strings.HasPrefix(ts.GetTensors()[0].GetName(), "img_in") {
		t.Fatalf("Tensors: %v %v", ts, err)
	}

	// The LoRA plugin starts in the background: wait for it.
	waitServing(ctx, t, anon, "lora-nf4")
	loras, err := anon.LoRAs(ctx)
	if err != nil || len(loras) == 0 {
		t.Fatalf("LoRAs: %+v %v", loras, err)
	}
	one := 1.0
	_, err = c.ApplyLoRAs(ctx, api.ApplyRequest{LoRAs: []api.ApplyLoRA{{Name: "no-such-lora", Strength: &one}}})
	wantErr(t, "ApplyLoRAs unknown", err, 404, "not_found")
	res, err := c.ApplyLoRAs(ctx, api.ApplyRequest{Model: "sample", LoRAs: []api.ApplyLoRA{{Name: loras[0].Name}}})
	if err != nil || res.Path != "apply" || len(res.LoRAs) != 1 || res.LoRAs[0].Strength != 1 || res.Mode != api.ModeSide {
		t.Fatalf("ApplyLoRAs: %+v %v", res, err)
	}
	st, err := anon.LoRAState(ctx, "sample")
	if err != nil || len(st.LoRAs) != 1 || st.BindingGeneration == 0 {
		t.Fatalf("LoRAState: %+v %v", st, err)
	}
	res, err = c.RemoveLoRAs(ctx, "sample")
	if err != nil || len(res.LoRAs) != 0 || res.Path != "remove" {
		t.Fatalf("RemoveLoRAs: %+v %v", res, err)
	}
	if d2, err := anon.ModelDigest(ctx, "sample", client.DigestQuery{}); err != nil || d2.SHA256 != d1.SHA256 {
		t.Fatalf("digest after remove %v (%v), before %s", d2, err, d1.SHA256)
	}

	ps, err := anon.Plugins(ctx)
	if err != nil || len(ps) != 1 || ps[0].Kind != api.KindLoRA {
		t.Fatalf("Plugins: %+v %v", ps, err)
	}
	if lines, err := anon.PluginLogs(ctx, "lora-nf4", 5); err != nil || len(lines) == 0 || len(lines) > 5 {
		t.Fatalf("PluginLogs: %+v %v", lines, err)
	}
	_, err = anon.PluginLogs(ctx, "nope", 0)
	wantErr(t, "PluginLogs unknown", err, 404, "not_found")
	if rs, err := c.RescanPlugins(ctx); err != nil || len(rs.Added) != 0 || len(rs.Removed) != 0 {
		t.Fatalf("RescanPlugins: %+v %v", rs, err)
	}
	if st, err := c.ReloadPlugin(ctx, "lora-nf4"); err != nil || st.State != api.PluginServing || st.Generation < 2 {
		t.Fatalf("ReloadPlugin: %+v %v", st, err)
	}

	// No pipeline plugin: the default is "" and a job cannot start.
	pp, err := anon.Pipelines(ctx)
	if err != nil || pp.Default != "" || pp.Reason == "" {
		t.Fatalf("Pipelines: %+v %v", pp, err)
	}
	_, err = c.CreateJob(ctx, api.JobSpec{Params: map[string]any{"steps": 1}})
	wantErr(t, "CreateJob without pipeline", err, 503, "unavailable")
	_, err = c.CreateJob(ctx, api.JobSpec{Pipeline: "lora-nf4", Method: "apply"})
	wantErr(t, "CreateJob on the LoRA plugin", err, 403, "method_not_public")
	_, err = anon.Job(ctx, "job-nope")
	wantErr(t, "Job unknown", err, 404, "not_found")
	if _, err := anon.Events(ctx, "job-nope"); client.ErrorCode(err) != "not_found" {
		t.Fatalf("Events unknown: %v", err)
	}
	if js, err := anon.Jobs(ctx); err != nil || len(js) != 0 {
		t.Fatalf("Jobs: %+v %v", js, err)
	}
}

func waitServing(ctx context.Context, t *testing.T, c *client.Client, name string) {
	t.Helper()
	for {
		ps, err := c.Plugins(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range ps {
			if p.Name == name && p.State == api.PluginServing {
				return
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("plugin %s not serving: %+v", name, ps)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func wantErr(t *testing.T, what string, err error, status int, code string) {
	t.Helper()
	var e *client.Error
	if !errors.As(err, &e) {
		t.Fatalf("%s: err = %v (%T), want *client.Error %d %s", what, err, err, status, code)
	}
	if e.Status != status || e.Code != code || e.Detail == "" || !strings.Contains(e.Error(), code) {
		t.Fatalf("%s: %+v, want %d %s with a detail", what, e, status, code)
	}
}

// TestStreamsAndErrorsParse checks the parsers against answers the host
// does not give today but HTTP allows: multi-line data, comments, a stream
// cut before its last blank line, an error answer from a proxy that is not
// arenahost's JSON.
func TestStreamsAndErrorsParse(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/jobs/j/events":
			w.Header().Set("Content-Type", "text/event-stream; charset=utf-8")
			fmt.Fprint(w, ": a comment\n\nevent: progress\nid: 1\ndata: {\"job\": \"j\",\ndata:  \"step\": 2}\n\n")
			fmt.Fprint(w, "event: state\ndata: {\"job\": \"j\", \"state\": \"done\"}")
		case "/v1/jobs/bad/events":
			w.Header().Set("Content-Type", "text/event-stream")
			fmt.Fprint(w, "data: {not json\n\n")
		case "/v1/jobs/html/events":
			fmt.Fprint(w, "<html>")
		case "/v1/jobs/j/preview.mjpeg":
			w.Header().Set("Content-Type", "multipart/x-mixed-replace; boundary=b")
			fmt.Fprint(w, "--b\r\nContent-Type: image/png\r\nX-Frame-Id: 7\r\nX-Frame-Step: 3\r\nX-Preview-Generation: 2\r\n\r\nPNGDATA\r\n--b--\r\n")
		case "/v1/models":
			w.Header().Set("Retry-After", "3")
			http.Error(w, "upstream down", http.StatusBadGateway)
		}
	}))
	defer srv.Close()
	ctx := context.Background()
	c, err := client.New(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.Events(ctx, "j")
	if err != nil {
		t.Fatal(err)
	}
	ev, err := s.Next()
	if err != nil || ev.Type != api.EventProgress || ev.ID != "1" || ev.Data.Job != "j" || ev.Data.Step != 2 {
		t.Fatalf("first event %+v %v", ev, err)
	}
	ev, err = s.Next()
	if err != nil || ev.Type != api.EventState || ev.Data.State != api.JobDone {
		t.Fatalf("second event %+v %v", ev, err)
	}
	if _, err := s.Next(); err != io.EOF {
		t.Fatalf("after the last event: %v, want io.EOF", err)
	}
	s.Close()
	s, err = c.Events(ctx, "bad")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Next(); err == nil || !strings.Contains(err.Error(), "{not json") {
		t.Fatalf("bad data: %v", err)
	}
	s.Close()
	if _, err := c.Events(ctx, "html"); err == nil || !strings.Contains(err.Error(), "text/event-stream") {
		t.Fatalf("not an event stream: %v", err)
	}
	p, err := c.Previews(ctx, "j")
	if err != nil {
		t.Fatal(err)
	}
	f, err := p.Next()
	if err != nil || f.ID != 7 || f.Step != 3 || f.Generation != 2 || f.ContentType != "image/png" || string(f.Data) != "PNGDATA" {
		t.Fatalf("frame %+v %v", f, err)
	}
	if _, err := p.Next(); err != io.EOF {
		t.Fatalf("after the last frame: %v, want io.EOF", err)
	}
	p.Close()
	_, err = c.Models(ctx)
	var e *client.Error
	if !errors.As(err, &e) || e.Status != 502 || e.Code != "" || e.Detail != "upstream down" || e.RetryAfter != 3*time.Second {
		t.Fatalf("non-JSON error: %+v (%v)", e, err)
	}
}
