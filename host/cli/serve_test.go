package cli

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/arenahost/arenahost/sdk/client"
)

func TestServeRefusesUnsafeConfig(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"serve", "--listen", "0.0.0.0:0", "--data", t.TempDir()}, "set --token or ARENAHOST_TOKEN"},
		{[]string{"serve", "--arena-capacity", "lots"}, `--arena-capacity "lots": "lots" is not a size`},
		{[]string{"serve", "extra"}, `takes no positional arguments, got ["extra"]`},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			var stdout, stderr strings.Builder
			err := Run(context.Background(), tt.args, &stdout, &stderr)
			if err == nil || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("err = %v, want one line containing %q", err, tt.want)
			}
		})
	}
}

func TestServeHelpHasExample(t *testing.T) {
	var stdout, stderr strings.Builder
	if err := Run(context.Background(), []string{"serve", "--help"}, &stdout, &stderr); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Example:", "arenahost serve", "-token", "ARENAHOST_TOKEN", "docs/config.md"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("serve --help lacks %q:\n%s", want, stdout.String())
		}
	}
}

// TestServeRuns starts serve on 127.0.0.1:0 with a fresh data directory on
// each arena backend this build has without a GPU, reads the console URL it
// prints, calls the API (GET /v1/arena names the backend) and shuts it down.
func TestServeRuns(t *testing.T) {
	for _, backend := range []string{"cpu", "cuda-sim"} {
		t.Run(backend, func(t *testing.T) { testServeRuns(t, backend) })
	}
}

func testServeRuns(t *testing.T, backend string) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pr, pw := io.Pipe()
	errc := make(chan error, 1)
	go func() {
		errc <- Run(ctx, []string{"serve", "--listen", "127.0.0.1:0", "--data", t.TempDir(), "--plugins", "", "--arena-capacity", "256MiB",
			"--arena-backend", backend}, pw, io.Discard)
		pw.Close()
	}()
	urls := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			if u, ok := strings.CutPrefix(sc.Text(), "arenahost console: "); ok {
				urls <- u
			}
		}
	}()
	var url string
	select {
	case url = <-urls:
	case err := <-errc:
		t.Fatalf("serve exited: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("no console URL printed")
	}
	if !strings.HasPrefix(url, "http://127.0.0.1:") || !strings.HasSuffix(url, "/") {
		t.Fatalf("console URL %q", url)
	}
	c, err := client.New(url)
	if err != nil {
		t.Fatal(err)
	}
	models, err := c.Models(ctx)
	if err != nil || len(models) != 1 || models[0].Name != "sample" {
		t.Fatalf("GET /v1/models: %+v %v", models, err)
	}
	st, err := c.Arena(ctx)
	if err != nil || (backend != "cpu" && !strings.HasPrefix(st.Backend, backend)) {
		t.Fatalf("GET /v1/arena: %+v %v, want backend %s", st, err, backend)
	}
	// status reads the same host through sdk/client.
	var out, errOut strings.Builder
	if err := Run(ctx, []string{"status", "--host", url}, &out, &errOut); err != nil {
		t.Fatalf("status: %v\n%s", err, errOut.String())
	}
	for _, want := range []string{"host " + strings.TrimSuffix(url, "/"), "\narena ", "\nmodel sample: bnb-nf4", "jobs: 0 running, 0 queued"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status output lacks %q:\n%s", want, out.String())
		}
	}
	out.Reset()
	if err := Run(ctx, []string{"status", "--json", "--host", url}, &out, &errOut); err != nil {
		t.Fatalf("status --json: %v", err)
	}
	var status Status
	if err := json.Unmarshal([]byte(out.String()), &status); err != nil || len(status.Models) != 1 || status.Models[0].Name != "sample" || status.Arena.Capacity == 0 {
		t.Fatalf("status --json: %+v %v\n%s", status, err, out.String())
	}
	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("serve after cancel: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("serve did not stop")
	}
}

// status against a host that is not there fails with one line naming it.
func TestStatusWithoutHost(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	var out, errOut strings.Builder
	err = Run(context.Background(), []string{"status", "--host", "http://" + addr}, &out, &errOut)
	if err == nil || !strings.Contains(err.Error(), addr) || strings.Contains(err.Error(), "\n") || out.Len() != 0 {
		t.Fatalf("err = %v, stdout %q: want one line naming %s", err, out.String(), addr)
	}
}
