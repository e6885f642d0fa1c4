package api

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"image/png"
	"strings"
	"testing"
	"time"

	v1 "github.com/arenahost/arenahost/sdk/api"
)

// TestA1111Client plays an A1111 API client: it starts a job, polls
// /sdapi/v1/progress until the job is done, and decodes current_image.
func TestA1111Client(t *testing.T) {
	f := newFixture(t, jobPlugins(t), Options{})
	progress := func(q string) A1111Progress {
		t.Helper()
		status, b, _ := f.do(t, call{method: "GET", path: "/sdapi/v1/progress" + q})
		var p A1111Progress
		if status != 200 || json.Unmarshal(b, &p) != nil {
			t.Fatalf("progress: %d %s", status, b)
		}
		if strings.Contains(string(b), `"current_image": "data:`) {
			t.Fatal("current_image has a data: prefix")
		}
		return p
	}
	if p := progress(""); p.Progress != 0 || p.State.JobCount != 0 || p.CurrentImage != nil {
		t.Fatalf("idle progress %+v", p)
	}
	id := f.createJob(t, `{"pipeline": "test-pipeline", "params": {"steps": 40, "step_ms": 20, "height": 24, "width": 32}}`)
	sawRunning := false
	deadline := time.Now().Add(30 * time.Second)
	var p A1111Progress
	for {
		p = progress("")
		if p.State.Job != id {
			t.Fatalf("progress is about job %q, want %q", p.State.Job, id)
		}
		if p.State.JobCount == 1 && p.State.SamplingStep > 0 {
			sawRunning = true
			if p.Progress <= 0 || p.Progress > 1 || p.State.SamplingSteps != 40 || p.ETARelative < 0 {
				t.Fatalf("running progress %+v", p)
			}
		}
		if p.State.JobCount == 0 && p.State.SamplingStep == 40 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("job not done: %+v", p)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !sawRunning || p.State.Interrupted || p.CurrentImage == nil {
		t.Fatalf("saw running %v; final %+v", sawRunning, p)
	}
	raw, err := base64.StdEncoding.DecodeString(*p.CurrentImage)
	if err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("current_image is not a PNG: %v", err)
	}
	if b := img.Bounds(); b.Dx() != 256 || b.Dy() != 192 {
		t.Fatalf("current_image %v, want 256×192 (a 32×24 latent ×8)", b)
	}
	if p := progress("?skip_current_image=true"); p.CurrentImage != nil {
		t.Error("skip_current_image=true still sent current_image")
	}
	c := call{method: "GET", path: "/sdapi/v1/progress?skip_current_image=maybe"}
	status, b, _ := f.do(t, c)
	wantError(t, c, status, b, "bad_request", "skip_current_image")

	// Interrupt stops the running job.
	id = f.createJob(t, `{"pipeline": "test-pipeline", "params": {"steps": 5000, "step_ms": 5}}`)
	for progress("?skip_current_image=true").State.SamplingStep == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	if status, b, _ := f.do(t, call{method: "POST", path: "/sdapi/v1/interrupt"}); status != 200 || strings.TrimSpace(string(b)) != "{}" {
		t.Fatalf("interrupt: %d %s", status, b)
	}
	if s := f.waitJob(t, id); s.State != v1.JobCancelled {
		t.Fatalf("after interrupt: %+v", s)
	}
	if p := progress("?skip_current_image=true"); !p.State.Interrupted || p.State.JobCount != 0 {
		t.Errorf("after interrupt: %+v", p)
	}
}
