package sdk

import (
	"context"
	"errors"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/arenahost/arenahost/sdk/plugintest"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/wire"
)

// hostFromEnv builds a Host the way a plugin outside the broker gets one:
// from ARENAHOST_HOST_ADDR and ARENAHOST_HOST_TOKEN.
func hostFromEnv(t *testing.T, fh *plugintest.FakeHost, tokenOverride string) *Host {
	t.Helper()
	h := &Host{}
	for _, kv := range fh.ServeUnix(t, t.TempDir()) {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case wire.EnvHostAddr:
			h.addr = v
		case wire.EnvHostToken:
			h.token = v
		}
	}
	if tokenOverride != "" {
		h.token = tokenOverride
	}
	t.Cleanup(h.close)
	return h
}

func TestHostClient(t *testing.T) {
	fh := plugintest.NewFakeHost(t, 1<<20)
	w := fh.Put(t, "blocks.0.weight", pluginv1.DType_DTYPE_F32, []int64{2}, make([]byte, 8), pluginv1.Access_ACCESS_READ_ONLY)
	h := hostFromEnv(t, fh, "")
	ctx := context.Background()

	d, err := h.Allocate(ctx, "out", pluginv1.DType_DTYPE_BF16, []int64{3, 5})
	if err != nil {
		t.Fatalf("Allocate: %v", err)
	}
	if d.GetNbytes() != 30 || d.GetAccess() != pluginv1.Access_ACCESS_READ_WRITE {
		t.Errorf("Allocate gave %d bytes, access %v; want 30, read-write", d.GetNbytes(), d.GetAccess())
	}
	if _, err := h.AllocateBytes(ctx, "scratch", 100); err != nil {
		t.Fatalf("AllocateBytes: %v", err)
	}
	if got := len(fh.Allocated()); got != 2 {
		t.Errorf("fake host saw %d allocations, want 2", got)
	}
	if err := h.Free(ctx, d.GetRegion()); err != nil || len(fh.Freed()) != 1 {
		t.Errorf("Free: %v; host saw %d frees", err, len(fh.Freed()))
	}
	resp, err := h.LookupTensors(ctx, &pluginv1.LookupTensorsRequest{Names: []string{"blocks.0.weight"}})
	if err != nil || len(resp.GetTensors()) != 1 || resp.GetTensors()[0].GetRegion().GetOffset() != w.GetRegion().GetOffset() {
		t.Errorf("LookupTensors = %v, %v", resp, err)
	}
	_, err = h.LookupTensors(ctx, &pluginv1.LookupTensorsRequest{Names: []string{"nope"}})
	if Code(err) != codes.NotFound || !strings.Contains(err.Error(), "nope") {
		t.Errorf("LookupTensors(nope) = %v (code %v), want NotFound naming it", err, Code(err))
	}
	if ok, err := h.Publish(ctx, &pluginv1.PublishRequest{JobId: "j1", Topic: "progress", Step: 1, Total: 4}); !ok || err != nil {
		t.Errorf("Publish = %v, %v", ok, err)
	}
	if err := h.Log(ctx, "info", "hello", map[string]string{"k": "v"}); err != nil || len(fh.Logs()) != 1 {
		t.Errorf("Log: %v; host saw %d lines", err, len(fh.Logs()))
	}
	if _, err := h.Allocate(ctx, "bad", pluginv1.DType_DTYPE_F32, []int64{-1}); err == nil {
		t.Error("Allocate with a negative dimension succeeded")
	}
}

func TestHostClientErrors(t *testing.T) {
	fh := plugintest.NewFakeHost(t, 4096)
	ctx := context.Background()

	bad := hostFromEnv(t, fh, "not-the-token")
	_, err := bad.Allocate(ctx, "x", pluginv1.DType_DTYPE_U8, []int64{8})
	if Code(err) != codes.Unauthenticated {
		t.Errorf("wrong token: %v (code %v), want Unauthenticated", err, Code(err))
	}

	h := hostFromEnv(t, fh, "")
	_, err = h.Allocate(ctx, "huge", pluginv1.DType_DTYPE_U8, []int64{1 << 20})
	if Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), `"huge"`) {
		t.Errorf("over-allocation: %v (code %v), want ResourceExhausted naming the region", err, Code(err))
	}

	none := &Host{}
	if _, err := none.Allocate(ctx, "x", pluginv1.DType_DTYPE_U8, []int64{8}); !errors.Is(err, wire.ErrNoHost) || Code(err) != codes.FailedPrecondition {
		t.Errorf("no host: %v, want wire.ErrNoHost (FailedPrecondition)", err)
	}
}
