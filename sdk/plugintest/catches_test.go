package plugintest_test

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/hashicorp/go-plugin"
	"github.com/vmihailenco/msgpack/v5"
	"google.golang.org/grpc"

	"github.com/arenahost/arenahost/sdk"
	"github.com/arenahost/arenahost/sdk/plugintest"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/wire"
)

// The test binary re-executes itself as a plugin that breaks the contract
// (envRole=liar), and as an inner test that runs the suite on it.
const (
	envRole  = "PLUGINTEST_TEST_ROLE"
	envInner = "PLUGINTEST_INNER"
)

func TestMain(m *testing.M) {
	if os.Getenv(envRole) == "liar" {
		serveLiar()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// liar answers like an SDK plugin except that it accepts unknown methods
// and gets conformance.sum wrong by one.
type liar struct {
	pluginv1.PluginServer
}

func (l liar) Invoke(ctx context.Context, req *pluginv1.InvokeRequest) (*pluginv1.InvokeResponse, error) {
	switch req.GetMethod() {
	case "plugintest.no-such-method":
		return &pluginv1.InvokeResponse{}, nil
	case sdk.ConformanceSum:
		resp, err := l.PluginServer.Invoke(ctx, req)
		if err != nil {
			return nil, err
		}
		var r map[string]any
		_ = msgpack.Unmarshal(resp.Result, &r)
		r["sum"] = r["sum"].(float64) + 1
		resp.Result, _ = msgpack.Marshal(r)
		return resp, nil
	}
	return l.PluginServer.Invoke(ctx, req)
}

func serveLiar() {
	p := sdk.New("liar", "0.0.1", "other")
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: wire.Handshake,
		Plugins:         wire.PluginMap(liar{p.Server()}, nil),
		GRPCServer:      func(opts []grpc.ServerOption) *grpc.Server { return grpc.NewServer(opts...) },
	})
}

// TestInnerLiar is the suite run on the liar; it only runs when
// TestSuiteCatchesLiar starts it, and must fail.
func TestInnerLiar(t *testing.T) {
	if os.Getenv(envInner) != "1" {
		t.Skip("run by TestSuiteCatchesLiar")
	}
	exe, _ := os.Executable()
	plugintest.Run(t, plugintest.Config{Cmd: []string{exe}, Env: []string{envRole + "=liar"}})
}

func TestSuiteCatchesLiar(t *testing.T) {
	exe, _ := os.Executable()
	cmd := exec.Command(exe, "-test.run=^TestInnerLiar$", "-test.v")
	cmd.Env = append(os.Environ(), envInner+"=1")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("the suite passed a plugin that breaks the contract:\n%s", out)
	}
	for _, want := range []string{
		"--- FAIL: TestInnerLiar/unknown_method",
		"invoke plugintest.no-such-method: succeeded",
		"--- FAIL: TestInnerLiar/input_tensor_read_in_place",
		"--- PASS: TestInnerLiar/echo",
		"--- PASS: TestInnerLiar/kill",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("suite output lacks %q:\n%s", want, out)
		}
	}
}
