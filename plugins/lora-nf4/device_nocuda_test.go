//go:build !cuda

package main

import (
	"bytes"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/arenahost/arenahost/shared/gpu"
	"github.com/arenahost/arenahost/shared/lora/lorawire"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// TestRealDeviceWithoutCUDA: descriptors on a real driver's slab (a handle
// that is not gpusim's) get a clear error from the default build, in fuse
// and in side mode, and nothing is written.
func TestRealDeviceWithoutCUDA(t *testing.T) {
	loras := testLoRAs(t)
	var handle [gpu.HandleSize]byte
	copy(handle[:], "\x01\x02cuIpcMemHandle bytes")
	for _, mode := range []string{lorawire.ModeFuse, lorawire.ModeSide} {
		t.Run(mode, func(t *testing.T) {
			h := newTestHost(t, true)
			h.handle = &handle
			ws := h.putModel(t, modelOpts{dtype: pluginv1.DType_DTYPE_BF16, quant: "nf4"})
			p := startPlugin(t, h)
			set := []lorawire.LoRASpec{{Path: loras[1], Strength: 1}}
			var tensors []*pluginv1.TensorDescriptor
			if mode == lorawire.ModeFuse {
				tensors = h.fuseTensors(t, ws, []string{"double_blocks.0.img_attn.proj.weight", "double_blocks.0.img_attn.qkv.weight"})
			}
			_, err := call(t, p, "apply", lorawire.ApplyArgs{Model: "m", LoRAs: set, Mode: mode}, tensors, nil)
			want := "is in CUDA device memory but this lora-nf4 was built without CUDA; build it with make cuda"
			if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), want) {
				t.Fatalf("%v, want FailedPrecondition containing %q", err, want)
			}
			t.Log(status.Convert(err).Message())
			for w, sw := range ws {
				if !bytes.Equal(h.weightBytes(t, sw), append(bytes.Clone(sw.packed), sw.absmax...)) {
					t.Errorf("%s changed", w)
				}
			}
			h.mu.Lock()
			freed, allocs := h.freed, h.allocs
			h.mu.Unlock()
			// Layers are written by several workers: each may have
			// allocated its A and B before the first failed; all are freed.
			if mode == lorawire.ModeSide && (freed != allocs || freed < 2) {
				t.Errorf("side: %d regions freed after the error, %d allocated (want all, at least A and B)", freed, allocs)
			}
		})
	}
}
