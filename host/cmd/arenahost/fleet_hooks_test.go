package main

import (
	"bytes"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/sdk/api"
)

// runFleetHook runs deploy/image/arenahost-fleet (the container's
// HEALTHCHECK, postStart and preStop hooks) with the core Python, and
// returns its exit code and stderr.
func runFleetHook(t *testing.T, python string, env []string, args ...string) (int, string) {
	t.Helper()
	script := filepath.Join(testenv.RepoRoot(t), "deploy", "image", "arenahost-fleet")
	cmd := exec.Command(python, append([]string{script}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		return ee.ExitCode(), stderr.String()
	case err != nil:
		t.Fatal(err)
	}
	return 0, stderr.String()
}

// TestFleetHooks runs the image's lifecycle hooks against a real host:
// health, load (postStart: the group's models, with the token) and drain
// (preStop: waits for queued and running jobs, bounded).
func TestFleetHooks(t *testing.T) {
	python := testenv.Python(t)
	bin := testenv.GoBinary(t, "./host/cmd/arenahost")
	plugins := t.TempDir()
	if err := os.CopyFS(filepath.Join(plugins, "reference_pipeline"), os.DirFS(filepath.Join(testenv.RepoRoot(t), "sdk", "python", "examples", "reference_pipeline"))); err != nil {
		t.Fatal(err)
	}
	const token = "fleet-hook-token"
	h := &fleetHost{data: t.TempDir(), logs: &bytes.Buffer{}}
	startServe(t, h, bin, "--listen", "127.0.0.1:0", "--token", token, "--data", h.data, "--plugins", plugins, "--python", python,
		"--arena-capacity", "256MiB")
	listen := strings.TrimSuffix(strings.TrimPrefix(h.url, "http://"), "/")
	env := []string{"ARENAHOST_LISTEN=" + listen, "ARENAHOST_TOKEN=" + token, "PYTHONDONTWRITEBYTECODE=1"}

	if code, stderr := runFleetHook(t, python, env, "health"); code != 0 {
		t.Fatalf("health: exit %d: %s", code, stderr)
	}
	// A port nobody listens on.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	if code, stderr := runFleetHook(t, python, []string{"ARENAHOST_LISTEN=" + dead}, "health"); code != 1 || !strings.Contains(stderr, "/v1/health: not ok") {
		t.Fatalf("health on a closed port: exit %d: %s", code, stderr)
	}
	if code, stderr := runFleetHook(t, python, []string{"ARENAHOST_LISTEN=nonsense"}, "health"); code != 1 || !strings.Contains(stderr, "ARENAHOST_LISTEN='nonsense': want HOST:PORT") {
		t.Fatalf("health with a bad listen: exit %d: %s", code, stderr)
	}

	// load: the sample file again, under its file name.
	code, stderr := runFleetHook(t, python, append(env, "ARENAHOST_FLEET_MODELS=flux-sample-nf4.safetensors"), "load", "--wait", "30")
	if code != 0 {
		t.Fatalf("load: exit %d: %s", code, stderr)
	}
	models, err := h.client(t, "").Models(t.Context())
	h.must(t, "models", err)
	var names []string
	for _, m := range models {
		names = append(names, m.Name)
	}
	if !strings.Contains(strings.Join(names, ","), "flux-sample-nf4") {
		t.Fatalf("after load, models %v lack flux-sample-nf4", names)
	}
	for _, tt := range []struct {
		env  []string
		want string
	}{
		{[]string{"ARENAHOST_LISTEN=" + listen, "ARENAHOST_TOKEN=wrong", "ARENAHOST_FLEET_MODELS=flux-sample-nf4.safetensors"}, "HTTP 403"},
		{append(env, "ARENAHOST_FLEET_MODELS=missing.safetensors"), `load model 'missing.safetensors': HTTP 404`},
	} {
		if code, stderr := runFleetHook(t, python, tt.env, "load", "--wait", "30"); code != 1 || !strings.Contains(stderr, tt.want) {
			t.Errorf("load %v: exit %d: %s, want 1 and %q", tt.env, code, stderr, tt.want)
		}
	}

	// drain: nothing running returns at once.
	if code, stderr := runFleetHook(t, python, append(env, "ARENAHOST_FLEET_DRAIN_SECONDS=5"), "drain"); code != 0 {
		t.Fatalf("drain with no jobs: exit %d: %s", code, stderr)
	}
	if code, stderr := runFleetHook(t, python, append(env, "ARENAHOST_FLEET_DRAIN_SECONDS=soon"), "drain"); code != 1 || !strings.Contains(stderr, "ARENAHOST_FLEET_DRAIN_SECONDS='soon': want seconds") {
		t.Fatalf("drain with a bad bound: exit %d: %s", code, stderr)
	}
	// A long job: drain with a short bound names it, unless the job had
	// already finished; after the job is cancelled, drain returns.
	job, err := h.client(t, token).CreateJob(t.Context(), api.JobSpec{Pipeline: "reference-pipeline",
		Preview: api.PreviewSpec{Method: "none"}, Params: map[string]any{"steps": 1000, "width": 512, "height": 512}})
	h.must(t, "create job", err)
	code, stderr = runFleetHook(t, python, env, "drain", "--timeout", "0.5", "--interval", "0.1")
	snap, err := h.client(t, "").Job(t.Context(), job.ID)
	h.must(t, "job", err)
	switch {
	case code == 1 && strings.Contains(stderr, "still queued or running after 0.5s: "+job.ID):
		t.Logf("drain during job %s: %s", job.ID, strings.TrimSpace(stderr))
	case code == 0 && snap.State != "queued" && snap.State != "running":
		t.Logf("job %s finished (%s) before drain looked", job.ID, snap.State)
	default:
		t.Fatalf("drain during job %s (now %s): exit %d: %s", job.ID, snap.State, code, stderr)
	}
	_, err = h.client(t, token).CancelJob(t.Context(), job.ID)
	h.must(t, "cancel job", err)
	if code, stderr := runFleetHook(t, python, env, "drain", "--timeout", "30", "--interval", "0.1"); code != 0 {
		t.Fatalf("drain after cancel: exit %d: %s", code, stderr)
	}
}

// startServe starts `arenahost serve args...` for h (see startFleetHost).
func startServe(t *testing.T, h *fleetHost, bin string, args ...string) {
	t.Helper()
	startHostProcess(t, h, bin, "host", args)
}
