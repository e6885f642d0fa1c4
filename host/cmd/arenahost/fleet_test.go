package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/sdk/client"
)

// fleetHost is one real `arenahost serve` process of TestTwoHostsOneMachine.
type fleetHost struct {
	url  string // http://127.0.0.1:PORT/
	data string
	cmd  *exec.Cmd
	logs *bytes.Buffer
}

// startFleetHost runs `arenahost serve` on cuda-sim device dev, on a port
// of its own (127.0.0.1:0), with its own data directory, and the shared
// plugins directory.
func startFleetHost(t *testing.T, bin, plugins, python string, dev int) *fleetHost {
	t.Helper()
	h := &fleetHost{data: t.TempDir(), logs: &bytes.Buffer{}}
	args := []string{"--listen", "127.0.0.1:0", "--data", h.data, "--plugins", plugins,
		"--arena-backend", "cuda-sim", "--arena-device", strconv.Itoa(dev), "--arena-capacity", "256MiB", "--shm", shmMode()}
	if python != "" {
		args = append(args, "--python", python)
	}
	startHostProcess(t, h, bin, fmt.Sprintf("host on device %d", dev), args)
	return h
}

// shmMode is shm (files under /dev/shm, named by the host's pid) where
// /dev/shm exists, so the test sees each host's shared memory by name.
func shmMode() string {
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		return "shm"
	}
	return "memfd"
}

// startHostProcess runs `arenahost serve args...`, sets h.url from the
// console URL it prints, and stops it with SIGTERM when the test ends.
func startHostProcess(t *testing.T, h *fleetHost, bin, label string, args []string) {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"serve"}, args...)...)
	cmd.Stderr = h.logs
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h.cmd = cmd
	exited := make(chan error, 1)
	// SIGTERM is how an orchestrator stops a host: it must exit 0.
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("%s after SIGTERM: %v\n%s", label, err, h.logs)
			}
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			t.Errorf("%s did not stop within 30s of SIGTERM\n%s", label, h.logs)
		}
	})
	urls := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if u, ok := strings.CutPrefix(sc.Text(), "arenahost console: "); ok {
				urls <- u
			}
		}
		exited <- cmd.Wait()
	}()
	select {
	case h.url = <-urls:
	case <-time.After(60 * time.Second):
		t.Fatalf("%s printed no console URL:\n%s", label, h.logs)
	}
}

// client returns an sdk/client of h sending token ("" for none).
func (h *fleetHost) client(t *testing.T, token string) *client.Client {
	t.Helper()
	c, err := client.New(h.url, client.WithToken(token))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// must fails the test, with the host's log, when err is set.
func (h *fleetHost) must(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v\nhost log:\n%s", what, err, h.logs)
	}
}

func (h *fleetHost) digest(t *testing.T) string {
	t.Helper()
	d, err := h.client(t, "").ModelDigest(t.Context(), "sample", client.DigestQuery{})
	h.must(t, "digest", err)
	if d.SHA256 == "" {
		t.Fatal("digest without sha256")
	}
	return d.SHA256
}

// pluginEnv reads the environment of h's serving plugin name from /proc.
func (h *fleetHost) pluginEnv(t *testing.T, name string) map[string]string {
	t.Helper()
	ps, err := h.client(t, "").Plugins(t.Context())
	h.must(t, "plugins", err)
	for _, p := range ps {
		if p.Name != name {
			continue
		}
		if p.State != "serving" || p.PID <= 0 {
			t.Fatalf("plugin %s: state %q pid %d\n%s", name, p.State, p.PID, h.logs)
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", p.PID))
		if err != nil {
			t.Skipf("plugin environment not readable: %v", err)
		}
		env := map[string]string{}
		for _, kv := range strings.Split(string(b), "\x00") {
			if k, v, ok := strings.Cut(kv, "="); ok {
				env[k] = v
			}
		}
		return env
	}
	t.Fatalf("plugin %s not listed: %+v", name, ps)
	return nil
}

// TestTwoHostsOneMachine is one host per device: two real `arenahost
// serve` processes on cuda-sim devices 0 and 1, on two ports, with two data
// directories, sharing only the plugin binaries. Each plugin process is
// told its host's device, and a fused LoRA apply on one host (the
// lora-nf4 plugin rewriting the weights through the device's IPC handles)
// leaves the other host's model digest unchanged.
func TestTwoHostsOneMachine(t *testing.T) {
	if _, err := os.Stat("/proc/self/environ"); err != nil {
		t.Skip("needs /proc (Linux)")
	}
	bin := testenv.GoBinary(t, "./host/cmd/arenahost")
	plugins := t.TempDir()
	manifest, err := os.ReadFile(filepath.Join(testenv.RepoRoot(t), "plugins", "lora-nf4", "plugin.json"))
	if err != nil {
		t.Fatal(err)
	}
	testenv.InstallPlugin(t, plugins, "lora-nf4", "./plugins/lora-nf4", string(manifest))

	// With the core Python (make test sets ARENAHOST_PYTHON), the Python
	// reference pipeline runs beside lora-nf4 and is checked the same way.
	python := os.Getenv("ARENAHOST_PYTHON")
	checked := []string{"lora-nf4"}
	if python != "" {
		if err := os.CopyFS(filepath.Join(plugins, "reference_pipeline"), os.DirFS(filepath.Join(testenv.RepoRoot(t), "sdk", "python", "examples", "reference_pipeline"))); err != nil {
			t.Fatal(err)
		}
		checked = append(checked, "reference-pipeline")
	}
	hosts := []*fleetHost{startFleetHost(t, bin, plugins, python, 0), startFleetHost(t, bin, plugins, python, 1)}
	if hosts[0].url == hosts[1].url {
		t.Fatalf("both hosts on %s", hosts[0].url)
	}
	before := make([]string, 2)
	for i, h := range hosts {
		arena, err := h.client(t, "").Arena(t.Context())
		h.must(t, "arena", err)
		if !strings.Contains(arena.Backend, "cuda-sim") {
			t.Fatalf("host %d: arena backend %q, want cuda-sim", i, arena.Backend)
		}
		want := map[string]string{"ARENAHOST_ARENA_BACKEND": "cuda-sim", "ARENAHOST_DEVICE": strconv.Itoa(i), "ARENAHOST_TORCH_DEVICE": "cpu"}
		for _, name := range checked {
			env := h.pluginEnv(t, name)
			for k, v := range want {
				if env[k] != v {
					t.Errorf("host %d: plugin %s has %s=%q, want %q", i, name, k, env[k], v)
				}
			}
		}
		before[i] = h.digest(t)
	}
	if before[0] != before[1] {
		t.Fatalf("the two hosts' sample models differ before any apply: %s vs %s", before[0], before[1])
	}

	loras, err := hosts[1].client(t, "").LoRAs(t.Context())
	hosts[1].must(t, "loras", err)
	if len(loras) == 0 {
		t.Fatal("host 1 lists no LoRA (the sample LoRA is missing)")
	}
	_, err = hosts[1].client(t, "").ApplyLoRAs(t.Context(), api.ApplyRequest{Model: "sample", Mode: api.ModeFuse,
		LoRAs: []api.ApplyLoRA{{Name: loras[0].Name}}})
	hosts[1].must(t, "apply", err)

	after := []string{hosts[0].digest(t), hosts[1].digest(t)}
	if after[1] == before[1] {
		t.Fatalf("host 1: digest unchanged by a fused apply (%s)", after[1])
	}
	if after[0] != before[0] {
		t.Fatalf("host 0: digest changed from %s to %s by an apply on host 1", before[0], after[0])
	}
	if hosts[0].data == hosts[1].data {
		t.Fatal("shared data directory")
	}
	// Shared memory: each host's /dev/shm directory carries its own pid.
	if shmMode() == "shm" {
		for i, h := range hosts {
			dirs, _ := filepath.Glob(fmt.Sprintf("/dev/shm/arenahost-%d-*", h.cmd.Process.Pid))
			if len(dirs) != 1 {
				t.Errorf("host %d (pid %d): shared-memory directories %v, want exactly one of its own", i, h.cmd.Process.Pid, dirs)
			}
		}
	}
}
