package plugin

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/manifest"
)

// Four callers hammer the plugin for 5 s while it is swapped 10 times: no
// call fails, and every reply comes from a generation that was live, i.e.
// not yet retired, when the reply arrived.
func TestSwapUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("5 s load test")
	}
	m, _ := newTestManager(t, Config{})
	dir := t.TempDir()
	addFixture(t, m, dir, "echo", "echo", nil)

	var (
		mu      sync.Mutex
		pids    = map[uint64]int{1: mustStatus(t, m, "echo").PID}
		retired = map[uint64]time.Time{} // generation → when its Swap returned
	)
	// The callers run for at least 5 s and until the last swap is done.
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	minLoad := time.After(5 * time.Second)

	type seen struct {
		gen, pluginGen uint64
		pid            int
		at             time.Time
	}
	var (
		calls, failures atomic.Int64
		wg              sync.WaitGroup
		firstErr        atomic.Value
		replies         = make([][]seen, 4)
	)
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				g, r, err := callGen(context.Background(), m, "echo", "x")
				calls.Add(1)
				if err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err)
					continue
				}
				replies[w] = append(replies[w], seen{r.Generation, g.Generation, g.PID, time.Now()})
			}
		}()
	}
	var swaps []time.Duration
	for i := range 10 {
		time.Sleep(300 * time.Millisecond)
		before := mustStatus(t, m, "echo").Generation
		t0 := time.Now()
		if err := m.Swap(context.Background(), "echo"); err != nil {
			t.Fatalf("swap %d: %v", i, err)
		}
		swaps = append(swaps, time.Since(t0))
		st := mustStatus(t, m, "echo")
		mu.Lock()
		retired[before] = time.Now()
		pids[st.Generation] = st.PID
		mu.Unlock()
	}
	<-minLoad
	cancel()
	wg.Wait()

	if n := failures.Load(); n != 0 {
		t.Fatalf("%d of %d calls failed during swaps; first: %v", n, calls.Load(), firstErr.Load())
	}
	if st := mustStatus(t, m, "echo"); st.Generation != 11 {
		t.Fatalf("after 10 swaps the generation is %d, want 11", st.Generation)
	}
	total := 0
	gens := map[uint64]int{}
	for _, rs := range replies {
		total += len(rs)
		for _, s := range rs {
			gens[s.gen]++
			if s.pluginGen != s.gen {
				t.Fatalf("reply says generation %d but the manager routed it to %d", s.pluginGen, s.gen)
			}
			if pids[s.gen] != s.pid {
				t.Fatalf("generation %d replied from pid %d, manager knew pid %d", s.gen, s.pid, pids[s.gen])
			}
			if r, ok := retired[s.gen]; ok && s.at.After(r) {
				t.Fatalf("reply from generation %d at %v, after it was retired at %v", s.gen, s.at, r)
			}
		}
	}
	if len(gens) < 11 {
		t.Fatalf("replies came from only %d generations (%v); the swaps did not take traffic", len(gens), gens)
	}
	t.Logf("%d calls, 0 failed, across %d generations; swap times %v", total, len(gens), swaps)
}

// A plugin SIGKILLed in the middle of a call: the call fails at once with
// ErrPluginExited, the plugin serves again within 2 s, and the arena gets
// back every byte the dead generation leased.
//
// This test runs on the host's real arena (memfd segments) through ArenaOf.
func TestSIGKILLMidCall(t *testing.T) {
	ar := newRealArena(t)
	m, _ := newTestManager(t, Config{Arena: ArenaOf(ar), RestartBackoff: 50 * time.Millisecond})
	dir := t.TempDir()
	addFixture(t, m, dir, "echo", "echo", nil)
	// The host's own lease stays; only the plugin's go.
	if _, err := ar.Alloc(arena.HostOwner, "weights", 10000); err != nil {
		t.Fatal(err)
	}
	allocated := func() arena.ByteSize { return ar.Stats().Allocated }
	before := allocated()

	args, _ := msgpack.Marshal(map[string]any{"n": 4096})
	if _, err := m.Call(t.Context(), "echo", "alloc", args, nil); err != nil {
		t.Fatal(err)
	}
	if allocated() <= before || ar.Owned(arena.PluginOwner("echo", 1)) < 4*4096 {
		t.Fatalf("the plugin's allocation did not reach the arena: %v", ar.Stats())
	}
	st := mustStatus(t, m, "echo")

	errc := make(chan error, 1)
	go func() {
		_, err := m.Call(context.Background(), "echo", "hang", nil, nil)
		errc <- err
	}()
	waitFor(t, 2*time.Second, "hang call in flight", func() bool { return mustStatus(t, m, "echo").InFlight == 1 })
	killed := time.Now()
	if err := syscall.Kill(st.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		took := time.Since(killed)
		if !errors.Is(err, ErrPluginExited) || !strings.Contains(err.Error(), "signal: killed") {
			t.Fatalf("call error = %v, want ErrPluginExited naming the signal", err)
		}
		if took > time.Second {
			t.Fatalf("call failed %v after the kill, want < 1 s", took)
		}
		t.Logf("call failed after %v: %v", took, err)
	case <-time.After(2 * time.Second):
		t.Fatal("call still hanging 2 s after SIGKILL")
	}
	back := waitFor(t, 2*time.Second, "serving again", func() bool {
		s := mustStatus(t, m, "echo")
		return s.State == api.PluginServing && s.Generation == 2
	})
	t.Logf("serving again %v after the kill", back)
	s := mustStatus(t, m, "echo")
	if s.Restarts != 1 || !strings.Contains(s.LastError, "exited unexpectedly: signal: killed") {
		t.Fatalf("status after restart = %+v", s)
	}
	// The console shows when the error happened, the restart budget, and
	// the call the crash failed.
	if s.LastErrorAt.Before(killed) || time.Since(s.LastErrorAt) > time.Minute {
		t.Fatalf("last_error_at %v, killed at %v", s.LastErrorAt, killed)
	}
	if s.CrashLimit != DefaultCrashLimit || s.CrashWindowSeconds != DefaultCrashWindow.Seconds() {
		t.Fatalf("restart budget %d in %vs, want the defaults", s.CrashLimit, s.CrashWindowSeconds)
	}
	if !strings.Contains(s.LastCallError, "echo.hang") || !strings.Contains(s.LastCallError, "died mid-call") || s.LastCallErrorAt.Before(killed) {
		t.Fatalf("last call error %q at %v", s.LastCallError, s.LastCallErrorAt)
	}
	waitFor(t, time.Second, "leases reclaimed", func() bool { return allocated() == before })
	if n := ar.Owned(arena.PluginOwner("echo", 1)); n != 0 {
		t.Fatalf("the dead generation still owns %v", n)
	}
	if g, _, err := callGen(t.Context(), m, "echo", ""); err != nil || g.Generation != 2 {
		t.Fatalf("call after restart = %+v, %v", g, err)
	}
}

// A call that fails while the plugin keeps serving shows in its status as
// the last call error; a call its caller cancels does not.
func TestFailedCallShownInStatus(t *testing.T) {
	m, _ := newTestManager(t, Config{})
	addFixture(t, m, t.TempDir(), "echo", "echo", nil)
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	if _, err := m.Call(ctx, "echo", "hang", nil, nil); err == nil {
		t.Fatal("hang call returned no error after its context ended")
	}
	if s := mustStatus(t, m, "echo"); s.LastCallError != "" || !s.LastCallErrorAt.IsZero() {
		t.Fatalf("a cancelled call was recorded as a failure: %+v", s)
	}
	before := time.Now()
	if _, err := m.Call(t.Context(), "echo", "nosuch", nil, nil); err == nil {
		t.Fatal("unknown method answered no error")
	}
	s := mustStatus(t, m, "echo")
	if s.State != api.PluginServing || s.LastError != "" {
		t.Fatalf("status after a failed call = %+v, want serving with no lifecycle error", s)
	}
	if !strings.Contains(s.LastCallError, `unknown method "nosuch"`) || s.LastCallErrorAt.Before(before) {
		t.Fatalf("last call error %q at %v", s.LastCallError, s.LastCallErrorAt)
	}
}

// A plugin that keeps crashing is marked failed after CrashLimit crashes in
// the window, instead of restarting forever.
func TestCrashLoopMarksFailed(t *testing.T) {
	m, _ := newTestManager(t, Config{RestartBackoff: 20 * time.Millisecond, CrashLimit: 3, CrashWindow: time.Minute})
	dir := t.TempDir()
	addFixture(t, m, dir, "crashy", "exitafter", nil)
	waitFor(t, 10*time.Second, "marked failed", func() bool { return mustStatus(t, m, "crashy").State == api.PluginFailed })
	s := mustStatus(t, m, "crashy")
	if s.Crashes != 3 || !strings.Contains(s.LastError, "3 crashes within 1m0s") || !strings.Contains(s.LastError, "simulated crash") {
		t.Fatalf("failed status = %+v", s)
	}
	if s.CrashLimit != 3 || s.CrashWindowSeconds != 60 || s.LastErrorAt.IsZero() {
		t.Fatalf("failed status: budget %d in %vs, last error at %v", s.CrashLimit, s.CrashWindowSeconds, s.LastErrorAt)
	}
	_, err := m.Call(t.Context(), "crashy", "gen", nil, nil)
	if !errors.Is(err, ErrNotServing) || !strings.Contains(err.Error(), "is failed") {
		t.Fatalf("call to a failed plugin = %v", err)
	}
	time.Sleep(200 * time.Millisecond)
	if s2 := mustStatus(t, m, "crashy"); s2.Generation != 0 || s2.State != api.PluginFailed {
		t.Fatalf("failed plugin restarted anyway: %+v", s2)
	}
}

// Each broken build is refused with a clear error while the serving
// generation keeps serving.
func TestBrokenPluginsRefused(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	wrong := sha256.Sum256([]byte("not the binary"))
	cases := []struct {
		name string
		mode string
		edit func(*manifest.Manifest)
		want []string
	}{
		{"no handshake", "nohandshake", nil, []string{"handshake", "timeout while waiting for plugin to start", "loading something slow"}},
		{"garbage handshake", "garbage", nil, []string{"handshake", "Unrecognized remote plugin message: Hello! I am not a go-plugin handshake"}},
		{"wrong protocol version", "badproto", nil, []string{"describe", "protocol_version 2 but this host speaks 1"}},
		{"wrong handshake version", "badhandshake", nil, []string{"handshake", "plugin protocol version mismatch: this host speaks protocol 1", "Plugin version: 2"}},
		{"checksum mismatch", "echo", func(m *manifest.Manifest) { m.SHA256 = hex.EncodeToString(wrong[:]) }, []string{"handshake", "sha256 does not match", exe}},
		{"warm-up fails", "warmfail", nil, []string{"warmup", "warmup failed", "cannot open model weights"}},
		{"manifest invalid", "echo", func(m *manifest.Manifest) { m.Kind = "Not A Kind" }, []string{"field kind"}},
	}
	m, _ := newTestManager(t, Config{StartTimeout: 1 * time.Second})
	dir := t.TempDir()
	addFixture(t, m, dir, "svc", "echo", nil)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := mustStatus(t, m, "svc")
			writeFixture(t, dir, "svc", tc.mode, tc.edit)
			err := m.Swap(t.Context(), "svc")
			if err == nil {
				t.Fatal("swap to a broken build succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("swap error %q\nlacks %q", err, w)
				}
			}
			if (tc.mode == "badproto" || tc.mode == "badhandshake") && !errors.Is(err, ErrProtocolMismatch) {
				t.Errorf("error is not ErrProtocolMismatch: %v", err)
			}
			after := mustStatus(t, m, "svc")
			if after.State != api.PluginServing || after.Generation != before.Generation || after.PID != before.PID {
				t.Fatalf("status after refused swap = %+v, want generation %d still serving", after, before.Generation)
			}
			if after.LastError != err.Error() {
				t.Errorf("status last_error = %q, want the swap error", after.LastError)
			}
			if g, _, err := callGen(t.Context(), m, "svc", ""); err != nil || g.Generation != before.Generation {
				t.Fatalf("call after refused swap = %+v, %v", g, err)
			}
			writeFixture(t, dir, "svc", "echo", nil) // restore for the next case
		})
	}
	// The right checksum passes.
	bin, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	right := sha256.Sum256(bin)
	writeFixture(t, dir, "svc", "echo", func(m *manifest.Manifest) { m.SHA256 = hex.EncodeToString(right[:]) })
	if err := m.Swap(t.Context(), "svc"); err != nil {
		t.Fatalf("swap with the right sha256: %v", err)
	}

	// A broken plugin added fresh is registered as failed, with the cause.
	man := writeFixture(t, dir, "dead", "garbage", nil)
	pm, err := manifest.Parse(man)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Add(t.Context(), pm); err == nil {
		t.Fatal("Add of a broken plugin succeeded")
	}
	if s := mustStatus(t, m, "dead"); s.State != api.PluginFailed || !strings.Contains(s.LastError, "Unrecognized remote plugin message") {
		t.Fatalf("status of broken plugin = %+v", s)
	}
}

// A changed executable is hot-swapped in by the watcher.
func TestWatcherSwapsOnChange(t *testing.T) {
	m, _ := newTestManager(t, Config{PollInterval: 30 * time.Millisecond})
	dir := t.TempDir()
	path := writeFixture(t, dir, "echo", "echo", nil)
	man, err := manifest.Parse(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Add(t.Context(), man); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if g := mustStatus(t, m, "echo").Generation; g != 1 {
		t.Fatalf("watcher swapped without a change: generation %d", g)
	}
	// A new manifest (version bump) is a change.
	writeFixture(t, dir, "echo", "echo", func(m *manifest.Manifest) { m.Version = "1.0.1" })
	waitFor(t, 5*time.Second, "watcher swap", func() bool { return mustStatus(t, m, "echo").Generation == 2 })
	// A broken manifest is refused once, not retried on every poll.
	writeFixture(t, dir, "echo", "badproto", nil)
	waitFor(t, 5*time.Second, "refused swap recorded", func() bool {
		return strings.Contains(mustStatus(t, m, "echo").LastError, "protocol_version 2")
	})
	time.Sleep(200 * time.Millisecond)
	if s := mustStatus(t, m, "echo"); s.State != api.PluginServing || s.Generation != 2 {
		t.Fatalf("after a refused watcher swap: %+v", s)
	}
}

// Close leaves no plugin process behind: not the plugins, not their
// children (process-group kill).
func TestCloseLeavesNoProcesses(t *testing.T) {
	m, _ := newTestManager(t, Config{KillGrace: 500 * time.Millisecond})
	dir := t.TempDir()
	addFixture(t, m, dir, "a", "echo", nil)
	addFixture(t, m, dir, "b", "echo", nil)
	r, err := m.Call(t.Context(), "a", "spawn", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	var sp struct {
		PID int `msgpack:"pid"`
	}
	if err := msgpack.Unmarshal(r.Result, &sp); err != nil {
		t.Fatal(err)
	}
	pids := []int{sp.PID}
	for _, s := range m.Status() {
		pids = append(pids, s.PID)
	}
	for _, p := range pids {
		if !alive(p) {
			t.Fatalf("pid %d not alive before Close", p)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // teardown must not depend on the caller's ctx
	if err := m.Close(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, "all gone", func() bool {
		for _, p := range pids {
			if alive(p) {
				return false
			}
		}
		return true
	})
	if _, err := m.Call(t.Context(), "a", "gen", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("call after Close = %v, want ErrClosed", err)
	}
}

// SIGKILL a host-like parent process: its plugin dies with it (Pdeathsig).
func TestHostKilledLeavesNoPlugins(t *testing.T) {
	dir := t.TempDir()
	writeFixture(t, dir, "a", "echo", nil)
	writeFixture(t, dir, "b", "echo", nil)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	host := exec.Command(exe, "host", dir)
	host.Stderr = os.Stderr
	out, err := host.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := host.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = host.Process.Kill(); _ = host.Wait() }()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("read host output: %v", err)
	}
	var got struct{ PIDs []int }
	if err := json.Unmarshal([]byte(line), &got); err != nil || len(got.PIDs) != 2 {
		t.Fatalf("host said %q (%v)", line, err)
	}
	for _, p := range got.PIDs {
		if !alive(p) {
			t.Fatalf("plugin pid %d not running", p)
		}
	}
	if err := host.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = host.Wait()
	took := waitFor(t, 2*time.Second, "plugins gone after host SIGKILL", func() bool {
		return !alive(got.PIDs[0]) && !alive(got.PIDs[1])
	})
	t.Logf("plugins gone %v after the host was killed", took)
}
