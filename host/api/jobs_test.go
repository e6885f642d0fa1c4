package api

import (
	"bufio"
	"bytes"
	"encoding/json"
	"image/jpeg"
	"io"
	"mime"
	"mime/multipart"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/arenahost/arenahost/internal/testenv"
	v1 "github.com/arenahost/arenahost/sdk/api"
)

// jobPlugins installs the preview plugin and host/job's test pipeline
// (built once per test binary) into a fresh plugins directory.
func jobPlugins(t *testing.T) string {
	t.Helper()
	plugins := t.TempDir()
	testenv.InstallPlugin(t, plugins, "preview", "./plugins/preview", goManifest("preview", "preview"))
	testenv.InstallPlugin(t, plugins, "test-pipeline", "./host/job/testdata/pipeline", goManifest("test-pipeline", "pipeline"))
	return plugins
}

// createJob posts a job and returns its id.
func (f *fixture) createJob(t *testing.T, body string) string {
	t.Helper()
	c := call{method: "POST", path: "/v1/jobs", body: body}
	status, b, h := f.do(t, c)
	if status != http.StatusCreated {
		t.Fatalf("POST /v1/jobs: %d %s", status, b)
	}
	var jc v1.JobCreated
	if err := json.Unmarshal(b, &jc); err != nil {
		t.Fatal(err)
	}
	if jc.ID == "" || h.Get("Location") != "/v1/jobs/"+jc.ID || jc.Links["mjpeg"] != "/v1/jobs/"+jc.ID+"/preview.mjpeg" {
		t.Fatalf("created %s (Location %q)", b, h.Get("Location"))
	}
	return jc.ID
}

func (f *fixture) waitJob(t *testing.T, id string) v1.Job {
	t.Helper()
	j, err := f.s.Jobs.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-j.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("job %s not done: %+v", id, j.Snapshot())
	}
	return j.Snapshot()
}

func TestJobRoutes(t *testing.T) {
	f := newFixture(t, jobPlugins(t), Options{})
	for _, tc := range []struct {
		name, body, code, detail string
		status                   int
	}{
		{"unknown preview method", `{"pipeline": "test-pipeline", "preview": {"method": "taesd"}}`, "bad_request", `preview.method: "taesd" unknown`, 400},
		{"unknown pipeline", `{"pipeline": "nope"}`, "not_found", "nope", 404},
		{"unknown field", `{"pipeline": "test-pipeline", "previews": {}}`, "bad_request", "previews", 400},
	} {
		c := call{method: "POST", path: "/v1/jobs", body: tc.body}
		status, b, _ := f.do(t, c)
		wantError(t, c, status, b, tc.code, tc.detail)
		if status != tc.status {
			t.Errorf("%s: status %d, want %d", tc.name, status, tc.status)
		}
	}
	c := call{method: "GET", path: "/v1/jobs/job-nope"}
	status, b, _ := f.do(t, c)
	wantError(t, c, status, b, "not_found", "job-nope")

	id := f.createJob(t, `{"pipeline": "test-pipeline", "params": {"steps": 30, "step_ms": 20}, "preview": {"quality": 90}}`)
	// Server-sent events and MJPEG, read concurrently while the job runs.
	type sse struct{ typ, data string }
	evc := make(chan []sse, 1)
	go func() {
		resp, err := http.Get(f.srv.URL + "/v1/jobs/" + id + "/events")
		if err != nil {
			t.Error(err)
			evc <- nil
			return
		}
		defer resp.Body.Close()
		if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
			t.Errorf("events content type %q", ct)
		}
		var evs []sse
		var cur sse
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "event: "):
				cur.typ = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: "):
				cur.data = strings.TrimPrefix(line, "data: ")
			case line == "":
				evs = append(evs, cur)
				cur = sse{}
			}
		}
		evc <- evs
	}()
	mjc := make(chan int, 1)
	go func() {
		resp, err := http.Get(f.srv.URL + "/v1/jobs/" + id + "/preview.mjpeg")
		if err != nil {
			t.Error(err)
			mjc <- 0
			return
		}
		defer resp.Body.Close()
		mt, params, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
		if err != nil || mt != "multipart/x-mixed-replace" {
			t.Errorf("mjpeg content type %q: %v", resp.Header.Get("Content-Type"), err)
			mjc <- 0
			return
		}
		mr := multipart.NewReader(resp.Body, params["boundary"])
		n := 0
		for {
			p, err := mr.NextPart()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Errorf("mjpeg part %d: %v", n, err)
				break
			}
			img, err := jpeg.Decode(p)
			if err != nil {
				t.Errorf("mjpeg part %d: %v", n, err)
				break
			}
			if b := img.Bounds(); b.Dx() != 128 || b.Dy() != 128 {
				t.Errorf("mjpeg part %d: %v", n, b)
			}
			n++
		}
		mjc <- n
	}()
	snap := f.waitJob(t, id)
	if snap.State != v1.JobDone || snap.Step != 30 {
		t.Fatalf("job: %+v", snap)
	}
	evs, parts := <-evc, <-mjc
	if parts < 1 {
		t.Errorf("mjpeg stream gave %d frames", parts)
	}
	var progress, frames int
	var last v1.JobEvent
	for _, e := range evs {
		var je v1.JobEvent
		if err := json.Unmarshal([]byte(e.data), &je); err != nil {
			t.Fatalf("event %s data %q: %v", e.typ, e.data, err)
		}
		switch e.typ {
		case "progress":
			progress++
		case "frame":
			frames++
			if je.Frame == 0 || je.FrameURL == "" || je.Generation == 0 {
				t.Errorf("frame event %s", e.data)
			}
		}
		last = je
	}
	if len(evs) == 0 || evs[len(evs)-1].typ != "state" || last.State != v1.JobDone || last.Step != 30 || last.Total != 30 || last.Progress != 1 {
		t.Fatalf("last event %+v of %d", last, len(evs))
	}
	if progress == 0 || frames == 0 || last.Published != 30 || last.Rendered+last.Dropped != 30 {
		t.Errorf("%d progress and %d frame events; last %+v", progress, frames, last)
	}
	status, b, h := f.do(t, call{method: "GET", path: "/v1/jobs/" + id + "/preview.jpg"})
	if status != 200 || h.Get("Content-Type") != "image/jpeg" || h.Get("X-Frame-Step") != "30" {
		t.Fatalf("preview.jpg: %d %v", status, h)
	}
	if img, err := jpeg.Decode(bytes.NewReader(b)); err != nil || img.Bounds().Dx() != 128 {
		t.Fatalf("preview.jpg: %v", err)
	}

	// Cancel a long job.
	id = f.createJob(t, `{"pipeline": "test-pipeline", "params": {"steps": 5000, "step_ms": 5}}`)
	status, b, _ = f.do(t, call{method: "DELETE", path: "/v1/jobs/" + id})
	var s v1.Job
	if err := json.Unmarshal(b, &s); err != nil || status != 200 || s.State != v1.JobCancelled {
		t.Fatalf("DELETE: %d %s", status, b)
	}
	if c := s.Preview.PreviewCounters; c.Published != c.Rendered+c.Dropped {
		t.Errorf("cancelled job counters %+v", c)
	}
}

// stall opens a streaming request and never reads the response.
func stall(t *testing.T, addr, req string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetReadBuffer(4096)
	}
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestStalledClientsDoNotSlowTheJob runs the same job twice, previews off
// and previews on with an MJPEG, an SSE and a websocket client that read
// nothing for the whole run (over 5 s), plus one healthy SSE client: the
// median step time stays within 10% and the healthy client sees the whole
// job. Frames are 512² JPEGs at quality 95 (tens of KiB), so the stalled
// sockets' buffers fill early; min_interval_ms keeps the renderer's CPU
// share modest on a shared 2-core machine.
func TestStalledClientsDoNotSlowTheJob(t *testing.T) {
	f := newFixture(t, jobPlugins(t), Options{})
	const params = `"params": {"steps": 260, "step_ms": 20, "channels": 16, "height": 64, "width": 64}, "pipeline": "test-pipeline"`
	// The median step time: steps sleep to a fixed time, and on a shared
	// 2-core machine a few late wake-ups would dominate a mean.
	medianStep := func(s v1.Job) float64 {
		m, ok := s.Result.(map[string]any)
		if !ok {
			t.Fatalf("result %#v", s.Result)
		}
		var ms []float64
		for _, v := range m["step_ms"].([]any) {
			ms = append(ms, v.(float64))
		}
		slices.Sort(ms)
		return ms[len(ms)/2]
	}
	off := f.waitJob(t, f.createJob(t, `{`+params+`, "preview": {"method": "none"}}`))

	id := f.createJob(t, `{`+params+`, "preview": {"quality": 95, "min_interval_ms": 60}}`)
	addr := strings.TrimPrefix(f.srv.URL, "http://")
	stall(t, addr, "GET /v1/jobs/"+id+"/preview.mjpeg HTTP/1.1\r\nHost: x\r\n\r\n")
	stall(t, addr, "GET /v1/jobs/"+id+"/events HTTP/1.1\r\nHost: x\r\n\r\n")
	stall(t, addr, "GET /ws?clientId=stalled HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	healthy := make(chan string, 1)
	go func() {
		resp, err := http.Get(f.srv.URL + "/v1/jobs/" + id + "/events")
		if err != nil {
			healthy <- err.Error()
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		healthy <- string(b)
	}()
	on := f.waitJob(t, id)
	if on.State != v1.JobDone || off.State != v1.JobDone {
		t.Fatalf("states %s %s", off.State, on.State)
	}
	if d := on.Ended.Sub(on.Started); d < 5*time.Second {
		t.Fatalf("the run took %v; the stall must last 5 s", d)
	}
	mOff, mOn := medianStep(off), medianStep(on)
	t.Logf("median step: previews off %.2f ms, on with stalled clients %.2f ms (%+.1f%%); counters %+v", mOff, mOn, 100*(mOn/mOff-1), on.Preview.PreviewCounters)
	if mOn > 1.10*mOff {
		t.Errorf("previews on with stalled clients: %.2f ms per step vs %.2f ms off (> 10%% slower)", mOn, mOff)
	}
	if on.Preview.Rendered == 0 {
		t.Error("no frame rendered")
	}
	if h := <-healthy; !strings.Contains(h, `"state":"done"`) || !strings.Contains(h, "event: frame") {
		t.Errorf("healthy SSE client did not see frames and the end: %.300s", h)
	}
}

// TestJobEventsCarryClientID: the events of a job created with a client_id
// carry it, as docs/api.md says.
func TestJobEventsCarryClientID(t *testing.T) {
	f := newFixture(t, jobPlugins(t), Options{})
	id := f.createJob(t, `{"pipeline": "test-pipeline", "client_id": "tab-7", "params": {"steps": 2, "step_ms": 1}}`)
	resp, err := http.Get(f.srv.URL + "/v1/jobs/" + id + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	n := 0
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		var ev v1.JobEvent
		if err := json.Unmarshal([]byte(data), &ev); err != nil {
			t.Fatalf("event %s: %v", data, err)
		}
		if ev.ClientID != "tab-7" {
			t.Errorf("event %s: client_id %q, want tab-7", data, ev.ClientID)
		}
		n++
	}
	if n == 0 {
		t.Fatal("no events")
	}
}
