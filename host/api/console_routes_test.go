package api

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/server"
	v1 "github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/samples"
)

func getInto(t *testing.T, f *fixture, path string, v any) {
	t.Helper()
	status, b, _ := f.do(t, call{method: "GET", path: path})
	if status != http.StatusOK {
		t.Fatalf("GET %s: %d %s", path, status, b)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("GET %s: %v: %s", path, err, b)
	}
}

// The models directory listing offers what POST /v1/models can load, and
// only that: files inside the directory (symlinks that stay inside
// included), with the models loaded from each.
func TestModelFiles(t *testing.T) {
	f := newFixture(t, "", Options{})
	models := filepath.Join(f.data, "models")
	outside := t.TempDir()
	sample := filepath.Join(models, samples.ModelFile)
	if err := os.MkdirAll(filepath.Join(models, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, l := range [][2]string{
		{sample, filepath.Join(models, "sub", "linked.safetensors")},
		{filepath.Join(outside, "secret.safetensors"), filepath.Join(models, "escape.safetensors")},
	} {
		if err := os.Symlink(l[0], l[1]); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(outside, "secret.safetensors"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(models, "notes.txt"), []byte("not a model"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(models, "dir.safetensors"), 0o755); err != nil {
		t.Fatal(err)
	}

	var files []v1.ModelFile
	getInto(t, f, "/v1/models/files", &files)
	var paths []string
	for _, mf := range files {
		paths = append(paths, mf.Path)
	}
	if want := []string{samples.ModelFile, "sub/linked.safetensors"}; !slices.Equal(paths, want) {
		t.Fatalf("listed %v, want %v", paths, want)
	}
	st, err := os.Stat(sample)
	if err != nil {
		t.Fatal(err)
	}
	if files[0].Bytes != st.Size() || files[0].Name != "flux-sample-nf4" || !slices.Equal(files[0].Loaded, []string{"sample"}) {
		t.Fatalf("sample entry %+v", files[0])
	}

	// A listed path loads as it is; the listing then names the new model.
	body := `{"path": "` + files[1].Path + `", "name": "second"}`
	if status, b, _ := f.do(t, call{method: "POST", path: "/v1/models", body: body}); status != http.StatusCreated {
		t.Fatalf("load a listed path: %d %s", status, b)
	}
	getInto(t, f, "/v1/models/files", &files)
	// Both entries resolve to the same file, so both name both models.
	for _, mf := range files {
		if slices.Sort(mf.Loaded); !slices.Equal(mf.Loaded, []string{"sample", "second"}) {
			t.Fatalf("after loading %s: entry %+v", files[1].Path, mf)
		}
	}
}

// Every allocated byte is attributed to an owner, each loaded model under
// its own name; the history records samples and filters by time.
func TestArenaUsageAndHistory(t *testing.T) {
	f := newFixture(t, "", Options{})
	body := `{"path": "` + samples.ModelFile + `", "name": "second"}`
	if status, b, _ := f.do(t, call{method: "POST", path: "/v1/models", body: body}); status != http.StatusCreated {
		t.Fatalf("load: %d %s", status, b)
	}
	var u v1.ArenaUsage
	getInto(t, f, "/v1/arena/usage", &u)
	var sum uint64
	got := map[string]v1.Usage{}
	for _, x := range u.ByOwner {
		sum += x.Bytes
		got[x.Owner] = x
	}
	if sum != u.Allocated || u.Allocated == 0 {
		t.Fatalf("by_owner sums to %d, allocated %d: %+v", sum, u.Allocated, u.ByOwner)
	}
	m, _ := f.s.Registry.Model("sample")
	for _, name := range []string{"sample", "second"} {
		x := got["model:"+name]
		if x.Purpose != v1.PurposeModel || x.Bytes < m.Bytes || x.Regions != len(m.Tensors) {
			t.Fatalf("model %s: %+v, want %d tensors of %d bytes at least", name, x, len(m.Tensors), m.Bytes)
		}
	}
	if u.Device != nil {
		t.Fatalf("a CPU arena reports device memory %+v", u.Device)
	}

	var h v1.ArenaHistory
	deadline := time.Now().Add(5 * time.Second)
	for {
		getInto(t, f, "/v1/arena/history", &h)
		if len(h.Samples) >= 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if len(h.Samples) < 2 || h.Capacity != u.Capacity || h.IntervalSeconds != historyInterval.Seconds() {
		t.Fatalf("history %+v", h)
	}
	last := h.Samples[len(h.Samples)-1]
	if last.Allocated != u.Allocated || last.Peak < last.Allocated || last.Time.After(time.Now()) {
		t.Fatalf("last sample %+v, allocated %d", last, u.Allocated)
	}
	var after v1.ArenaHistory
	getInto(t, f, "/v1/arena/history?since="+url.QueryEscape(last.Time.Format(time.RFC3339Nano)), &after)
	for _, s := range after.Samples {
		if !s.Time.After(last.Time) {
			t.Fatalf("since=%v answered the sample of %v", last.Time, s.Time)
		}
	}
	c := call{method: "GET", path: "/v1/arena/history?since=yesterday"}
	status, b, _ := f.do(t, c)
	if status != http.StatusBadRequest {
		t.Fatalf("since=yesterday: %d", status)
	}
	wantError(t, c, status, b, "bad_request", "RFC 3339")
}

func TestPurposeOf(t *testing.T) {
	models := map[string]bool{"flux": true}
	for _, tc := range []struct {
		lease          arena.Lease
		owner, purpose string
	}{
		{arena.Lease{Owner: arena.HostOwner, Name: "flux/double_blocks.0.img_attn.proj.weight"}, "model:flux", v1.PurposeModel},
		{arena.Lease{Owner: arena.HostOwner, Name: "gone/x.weight"}, "host", v1.PurposeOther},
		{arena.Lease{Owner: arena.HostOwner, Name: "lora factors double_blocks.0.img_attn.proj.weight"}, "host", v1.PurposeLoRAFactors},
		{arena.Lease{Owner: arena.HostOwner, Name: "factors/double_blocks.0.img_attn.proj.weight/A"}, "host", v1.PurposeLoRAFactors},
		{arena.Lease{Owner: arena.HostOwner, Name: "lora journal double_blocks.0.img_attn.proj.weight"}, "host", v1.PurposeJournal},
		{arena.Lease{Owner: arena.HostOwner, Name: "job/job-1-1/latent-copy-3"}, "host", v1.PurposeJobs},
		{arena.Lease{Owner: arena.PluginOwner("lora-nf4", 2), Name: "scratch"}, "plugin:lora-nf4#2", v1.PurposePlugin},
	} {
		o, p := purposeOf(tc.lease, models)
		if o != tc.owner || p != tc.purpose {
			t.Errorf("%s %q: %s %s, want %s %s", tc.lease.Owner, tc.lease.Name, o, p, tc.owner, tc.purpose)
		}
	}
}

// A job says who started it: "api" unless the request names an origin,
// and an origin that is not a short label is refused.
func TestJobOrigin(t *testing.T) {
	f := newFixture(t, jobPlugins(t), Options{})
	c := call{method: "POST", path: "/v1/jobs", body: `{"pipeline": "test-pipeline", "origin": "Console <script>"}`}
	status, b, _ := f.do(t, c)
	if status != http.StatusBadRequest {
		t.Fatalf("bad origin: %d %s", status, b)
	}
	wantError(t, c, status, b, "bad_request", "origin")
	for _, tc := range []struct{ body, want string }{
		{`{"pipeline": "test-pipeline", "params": {"steps": 2, "step_ms": 1}}`, v1.OriginAPI},
		{`{"pipeline": "test-pipeline", "origin": "console", "params": {"steps": 2, "step_ms": 1}}`, v1.OriginConsole},
	} {
		id := f.createJob(t, tc.body)
		var s v1.Job
		getInto(t, f, "/v1/jobs/"+id, &s)
		if s.Origin != tc.want || s.Params["steps"] != float64(2) {
			t.Fatalf("job of %s: origin %q params %v, want origin %q", tc.body, s.Origin, s.Params, tc.want)
		}
	}
}

// A job cancelled while it waited never ran: its elapsed time is zero, not
// the time since the zero time.
func TestJobNeverRanHasNoElapsed(t *testing.T) {
	f := newFixture(t, jobPlugins(t), Options{})
	running := f.createJob(t, `{"pipeline": "test-pipeline", "params": {"steps": 200, "step_ms": 20}}`)
	waiting := f.createJob(t, `{"pipeline": "test-pipeline", "params": {"steps": 2, "step_ms": 1}}`)
	var s v1.Job
	getInto(t, f, "/v1/jobs/"+waiting, &s)
	if s.State != v1.JobQueued || s.Elapsed != 0 {
		t.Fatalf("second job %s elapsed %v, want queued with 0", s.State, s.Elapsed)
	}
	for _, id := range []string{waiting, running} {
		if status, b, _ := f.do(t, call{method: "DELETE", path: "/v1/jobs/" + id}); status != http.StatusOK {
			t.Fatalf("cancel %s: %d %s", id, status, b)
		}
	}
	getInto(t, f, "/v1/jobs/"+waiting, &s)
	if s.State != v1.JobCancelled || !s.Started.IsZero() || s.Elapsed != 0 {
		t.Fatalf("job cancelled while queued: %s started %v elapsed %v", s.State, s.Started, s.Elapsed)
	}
}

// On a device arena (the simulated device here) the usage and the history
// carry the device's own memory figures.
func TestArenaUsageOnDevice(t *testing.T) {
	ctx := t.Context()
	s, err := server.New(ctx, server.Config{DataDir: t.TempDir(), ArenaBackend: server.BackendCUDASim, ArenaCapacity: 1 << 30, Samples: true, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(context.Background()) })
	srv := httptest.NewServer(New(backendOf(s), quiet))
	t.Cleanup(srv.Close)
	f := &fixture{s: s, srv: srv}
	var u v1.ArenaUsage
	getInto(t, f, "/v1/arena/usage", &u)
	if u.Device == nil || u.Device.Total == 0 || u.Device.Used < u.Allocated || u.Device.Used+u.Device.Free != u.Device.Total {
		t.Fatalf("device memory %+v with %d bytes allocated in the arena", u.Device, u.Allocated)
	}
	if x := u.ByOwner[0]; x.Owner != "model:sample" || x.Purpose != v1.PurposeModel {
		t.Fatalf("largest owner on the device %+v, want the sample model", x)
	}
	var h v1.ArenaHistory
	getInto(t, f, "/v1/arena/history", &h)
	if h.DeviceTotal != u.Device.Total || len(h.Samples) == 0 || h.Samples[0].DeviceUsed == 0 {
		t.Fatalf("device history %+v", h)
	}
}
