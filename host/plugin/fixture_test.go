package plugin

// The test binary doubles as the fixture plugins and as a host-like parent:
// TestMain re-executes it with "fixture MODE NAME" or "host DIR", the way
// go-plugin's own tests re-execute themselves.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	goplugin "github.com/hashicorp/go-plugin"
	"github.com/vmihailenco/msgpack/v5"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/shared/manifest"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/wire"
)

func TestMain(m *testing.M) {
	if len(os.Args) >= 4 && os.Args[1] == "fixture" {
		runFixture(os.Args[2], os.Args[3])
		os.Exit(0)
	}
	if len(os.Args) >= 3 && os.Args[1] == "host" {
		os.Exit(runHost(os.Args[2]))
	}
	testenv.Main(m)
}

// genReply is what the "gen" method answers: who served the call.
type genReply struct {
	Generation uint64 `msgpack:"generation"`
	PID        int    `msgpack:"pid"`
	Echo       string `msgpack:"echo"`
}

type fixture struct {
	pluginv1.UnimplementedPluginServer
	mode, name string
	gen        uint64

	mu     sync.Mutex
	broker *goplugin.GRPCBroker
	host   pluginv1.HostClient
}

func (f *fixture) setBroker(b *goplugin.GRPCBroker) {
	f.mu.Lock()
	f.broker = b
	f.mu.Unlock()
}

func (f *fixture) hostClient() pluginv1.HostClient {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.host
}

func (f *fixture) Describe(_ context.Context, req *pluginv1.DescribeRequest) (*pluginv1.DescribeResponse, error) {
	if id := req.GetHostBrokerId(); id != 0 {
		f.mu.Lock()
		b := f.broker
		f.mu.Unlock()
		conn, err := b.Dial(id)
		if err != nil {
			return nil, fmt.Errorf("dial host service: %w", err)
		}
		f.mu.Lock()
		f.host = pluginv1.NewHostClient(conn)
		f.mu.Unlock()
	}
	if f.mode == "exitafter" {
		// Crash soon after the host has accepted this generation.
		go func() {
			time.Sleep(200 * time.Millisecond)
			// Straight to fd 2, as the runtime writes a panic: go-plugin's
			// Serve swaps os.Stderr for a gRPC stdio pipe that an exit
			// would cut short.
			_, _ = syscall.Write(2, []byte("fatal: simulated crash\n"))
			os.Exit(3)
		}()
	}
	pv := uint32(wire.ProtocolVersion)
	if f.mode == "badproto" {
		pv = 2
	}
	methods := []*pluginv1.MethodInfo{
		{Name: "gen"}, {Name: "sleep"}, {Name: "hang"}, {Name: "alloc"}, {Name: "free"},
		{Name: "publish"}, {Name: "log"}, {Name: "spawn"}, {Name: "count", Streaming: true},
	}
	if f.mode == "warmfail" || f.mode == "echo" {
		methods = append(methods, &pluginv1.MethodInfo{Name: WarmupMethod})
	}
	return &pluginv1.DescribeResponse{
		Name: f.name, Version: "1.0." + strconv.FormatUint(f.gen, 10), ProtocolVersion: pv,
		Kind: "other", Methods: methods,
	}, nil
}

func (f *fixture) Invoke(ctx context.Context, req *pluginv1.InvokeRequest) (*pluginv1.InvokeResponse, error) {
	var args map[string]any
	if len(req.GetArgs()) > 0 {
		if err := msgpack.Unmarshal(req.GetArgs(), &args); err != nil {
			return nil, fmt.Errorf("args: %w", err)
		}
	}
	num := func(k string) uint64 {
		switch v := args[k].(type) {
		case int8, int16, int32, int64:
			return uint64(reflectInt(v))
		case uint8, uint16, uint32, uint64:
			return reflectUint(v)
		}
		return 0
	}
	reply := func(v any, ts ...*pluginv1.TensorDescriptor) (*pluginv1.InvokeResponse, error) {
		b, err := msgpack.Marshal(v)
		return &pluginv1.InvokeResponse{Result: b, Tensors: ts}, err
	}
	switch req.GetMethod() {
	case WarmupMethod:
		if f.mode == "warmfail" {
			_, _ = syscall.Write(2, []byte("warmup: cannot open model weights: no such file\n"))
			return nil, fmt.Errorf("warmup failed")
		}
		return reply(map[string]any{})
	case "gen":
		e, _ := args["echo"].(string)
		return reply(genReply{Generation: f.gen, PID: os.Getpid(), Echo: e})
	case "sleep":
		time.Sleep(time.Duration(num("ms")) * time.Millisecond)
		return reply(genReply{Generation: f.gen, PID: os.Getpid()})
	case "hang":
		fmt.Fprintln(os.Stderr, "hanging on purpose")
		time.Sleep(time.Hour)
		return nil, nil
	case "alloc":
		resp, err := f.hostClient().Allocate(ctx, &pluginv1.AllocateRequest{Name: "scratch", Dtype: pluginv1.DType_DTYPE_F32, Shape: []int64{int64(num("n"))}})
		if err != nil {
			return nil, err
		}
		return reply(map[string]any{}, resp.GetTensor())
	case "free":
		var regions []*pluginv1.Region
		for _, t := range req.GetTensors() {
			regions = append(regions, t.GetRegion())
		}
		_, err := f.hostClient().Free(ctx, &pluginv1.FreeRequest{Regions: regions})
		if err != nil {
			return nil, err
		}
		return reply(map[string]any{})
	case "publish":
		resp, err := f.hostClient().Publish(ctx, &pluginv1.PublishRequest{JobId: "job-1", Topic: "progress", Step: 3, Total: 10})
		if err != nil {
			return nil, err
		}
		return reply(map[string]any{"accepted": resp.GetAccepted()})
	case "log":
		_, err := f.hostClient().Log(ctx, &pluginv1.LogRequest{Level: "warn", Message: "hello from the plugin", Attrs: map[string]string{"k": "v"}})
		if err != nil {
			return nil, err
		}
		return reply(map[string]any{})
	case "spawn":
		cmd := exec.Command("sleep", "60")
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		go func() { _ = cmd.Wait() }()
		return reply(map[string]any{"pid": cmd.Process.Pid})
	}
	return nil, fmt.Errorf("unknown method %q", req.GetMethod())
}

func (f *fixture) InvokeStream(req *pluginv1.InvokeRequest, s pluginv1.Plugin_InvokeStreamServer) error {
	if req.GetMethod() != "count" {
		return fmt.Errorf("unknown streaming method %q", req.GetMethod())
	}
	for i := range 5 {
		b, _ := msgpack.Marshal(map[string]any{"i": i})
		if err := s.Send(&pluginv1.InvokeResponse{Result: b}); err != nil {
			return err
		}
	}
	return nil
}

func reflectInt(v any) int64 {
	switch x := v.(type) {
	case int8:
		return int64(x)
	case int16:
		return int64(x)
	case int32:
		return int64(x)
	case int64:
		return x
	}
	return 0
}

func reflectUint(v any) uint64 {
	switch x := v.(type) {
	case uint8:
		return uint64(x)
	case uint16:
		return uint64(x)
	case uint32:
		return uint64(x)
	case uint64:
		return x
	}
	return 0
}

func runFixture(mode, name string) {
	switch mode {
	case "nohandshake":
		fmt.Fprintln(os.Stderr, "loading something slow")
		time.Sleep(time.Hour)
		return
	case "garbage":
		fmt.Println("Hello! I am not a go-plugin handshake")
		fmt.Fprintln(os.Stderr, "printed garbage")
		time.Sleep(time.Hour)
		return
	}
	gen, _ := strconv.ParseUint(os.Getenv(wire.EnvGeneration), 10, 64)
	f := &fixture{mode: mode, name: name, gen: gen}
	hs := wire.Handshake
	if mode == "badhandshake" {
		hs.ProtocolVersion = 2
	}
	goplugin.Serve(&goplugin.ServeConfig{
		HandshakeConfig: hs,
		Plugins:         wire.PluginMap(f, f.setBroker),
		GRPCServer:      goplugin.DefaultGRPCServer,
	})
}

// runHost is a host-like parent: it loads the plugins under dir, prints
// {"pids": [...]} on stdout and waits to be killed.
func runHost(dir string) int {
	signal.Ignore(syscall.SIGHUP)
	m := NewManager(Config{Dir: dir, PollInterval: -1, StartTimeout: 10 * time.Second})
	if err := m.Load(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var pids []int
	for _, s := range m.Status() {
		pids = append(pids, s.PID)
	}
	_ = json.NewEncoder(os.Stdout).Encode(map[string]any{"pids": pids})
	time.Sleep(time.Hour)
	return 0
}

// writeFixture writes DIR/NAME/plugin.json running this test binary as the
// fixture MODE.
func writeFixture(t testing.TB, dir, name, mode string, edit func(*manifest.Manifest)) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	man := manifest.Manifest{
		Name: name, Version: "1.0.0", Kind: "other", Language: manifest.LanguageGo,
		Command: exe, Args: []string{"fixture", mode, name}, ProtocolVersion: wire.ProtocolVersion,
	}
	if edit != nil {
		edit(&man)
	}
	b, err := json.MarshalIndent(man, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	pdir := filepath.Join(dir, name)
	if err := os.MkdirAll(pdir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(pdir, manifest.File)
	// Write then rename, as a deploy would: the manifest never reads torn.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	return path
}
