package sdk_test

import (
	"bufio"
	"context"
	"fmt"
	"github.com/vmihailenco/msgpack/v5"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"

	"github.com/arenahost/arenahost/sdk"
	"github.com/arenahost/arenahost/sdk/plugintest"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
	"github.com/arenahost/arenahost/shared/wire"
)

// The test binary re-executes itself as a plugin (envRole=plugin) or as a
// minimal go-plugin host (envRole=host), as go-plugin's own tests do.
const envRole = "ARENAHOST_SDK_TEST_ROLE"

func TestMain(m *testing.M) {
	switch os.Getenv(envRole) {
	case "plugin":
		sdk.Serve(benchPlugin())
	case "host":
		os.Exit(runHost())
	}
	os.Exit(m.Run())
}

// chunkArgs carries raw tensor bytes inside msgpack: the baseline that
// sends bytes over the socket instead of a descriptor.
type chunkArgs struct {
	Data []byte `msgpack:"data"`
}

type sumResult struct {
	Sum   float64 `msgpack:"sum"`
	Count int64   `msgpack:"count"`
}

func benchPlugin() *sdk.Plugin {
	p := sdk.New("sdk-test", "0.0.1", "other")
	sdk.Method(p, "bench.sum_bytes", func(_ context.Context, _ *sdk.Call, a chunkArgs) (sumResult, error) {
		xs, err := tensor.Float32s(a.Data)
		if err != nil {
			return sumResult{}, fmt.Errorf("field \"data\": %w", err)
		}
		var s float64
		for _, x := range xs {
			s += float64(x)
		}
		return sumResult{Sum: s, Count: int64(len(xs))}, nil
	})
	return p
}

func self(t testing.TB) []string {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return []string{exe}
}

func TestConformanceBroker(t *testing.T) {
	plugintest.Run(t, plugintest.Config{Cmd: self(t), Env: []string{envRole + "=plugin"}, WantName: "sdk-test"})
}

// TestConformanceHostAddr runs the suite with the Host service reached
// through ARENAHOST_HOST_ADDR and the token, as non-Go plugins do.
func TestConformanceHostAddr(t *testing.T) {
	plugintest.Run(t, plugintest.Config{Cmd: self(t), Env: []string{envRole + "=plugin"}, HostViaEnv: true})
}

// runHost starts the plugin through go-plugin, prints its pid and waits to
// be killed.
func runHost() int {
	exe, _ := os.Executable()
	// go-plugin appends the host's own environment after cmd.Env, so the
	// role must change in this process's environment.
	os.Setenv(envRole, "plugin")
	cmd := exec.Command(exe)
	c := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig: wire.Handshake, Plugins: wire.PluginMap(nil, nil), Cmd: cmd,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC}, AutoMTLS: true,
		Logger: hclog.NewNullLogger(),
	})
	if _, err := c.Client(); err != nil {
		fmt.Println("error", err)
		return 1
	}
	fmt.Println("pid", cmd.Process.Pid)
	time.Sleep(time.Minute)
	return 0
}

// TestPluginExitsWhenHostDies: go-plugin's server keeps serving after its
// host dies; sdk.Serve notices the re-parenting and stops.
func TestPluginExitsWhenHostDies(t *testing.T) {
	host := exec.Command(self(t)[0])
	// The plugin's socket goes into a directory removed with the test (the
	// plugin dies without closing it).
	sockDir, err := os.MkdirTemp("", "sdk-sock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	host.Env = append(os.Environ(), envRole+"=host", plugin.EnvUnixSocketDir+"="+sockDir)
	out, err := host.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := host.Start(); err != nil {
		t.Fatal(err)
	}
	defer host.Process.Kill()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "pid ") {
		t.Fatalf("host said %q, %v", line, err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "pid ")))
	defer syscall.Kill(pid, syscall.SIGKILL)
	if !running(pid) {
		t.Fatalf("plugin %d not running while its host lives", pid)
	}
	if err := host.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = host.Wait()
	start := time.Now()
	for running(pid) && time.Since(start) < 5*time.Second {
		time.Sleep(20 * time.Millisecond)
	}
	if running(pid) {
		t.Fatalf("plugin %d still running 5 s after its host was killed", pid)
	}
	t.Logf("plugin exited %v after its host was killed", time.Since(start).Round(time.Millisecond))
}

// running reports whether pid exists and is not a zombie (an orphan is
// reaped by whatever init the machine has, possibly never).
func running(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

// TestLateFirstHostCall: a plugin's first Host call may come long after
// Describe (a LoRA apply minutes after start). go-plugin's broker drops
// connection info nobody picked up within 5 s, so the SDK must connect when
// the broker id arrives, not on first use.
func TestLateFirstHostCall(t *testing.T) {
	if testing.Short() {
		t.Skip("waits past go-plugin's 5 s broker timeout")
	}
	p := plugintest.Start(t, plugintest.Config{Cmd: self(t), Env: []string{envRole + "=plugin"}})
	time.Sleep(6 * time.Second)
	args, err := msgpack.Marshal(map[string]any{"name": "late", "count": 16, "start": 1.0, "step": 1.0})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := p.Client.Invoke(ctx, &pluginv1.InvokeRequest{Method: sdk.ConformanceFill, Args: args}); err != nil {
		t.Fatalf("host call 6 s after start: %v", err)
	}
	if n := len(p.Host.Allocated()); n != 1 {
		t.Fatalf("host saw %d allocations, want 1", n)
	}
}
