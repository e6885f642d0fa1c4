package lora_test

import (
	"errors"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/arenahost/arenahost/host/lora"
	"github.com/arenahost/arenahost/host/registry"
	"github.com/arenahost/arenahost/host/server"
	"github.com/arenahost/arenahost/internal/teoracle"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/samples"
)

const bundleModel = "bundle"

// loadBundle writes the sample bundled single file (NF4 transformer, CLIP-L
// in F16, T5 in F8_E4M3) and its text-encoder LoRA, and loads the file as
// bundleModel.
func loadBundle(t *testing.T, s *server.Server) (bundle, teLoRA string) {
	t.Helper()
	dir := t.TempDir()
	bundle, teLoRA = filepath.Join(dir, samples.BundleFile), filepath.Join(dir, samples.BundleTELoRAFile)
	if err := samples.WriteBundle(bundle, 5); err != nil {
		t.Fatal(err)
	}
	if err := samples.WriteBundleTELoRA(teLoRA, 6); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Registry.Load(t.Context(), bundleModel, bundle); err != nil {
		t.Fatal(err)
	}
	return bundle, teLoRA
}

// teBytes copies the stored bytes of the bundle's encoder weights.
func teBytes(t *testing.T, s *server.Server) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for _, w := range samples.BundleTEWeights() {
		err := s.Registry.View(bundleModel, w, func(_ *registry.Tensor, b []byte) error {
			out[w] = append([]byte(nil), b...)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// A fused text-encoder LoRA on a bundled file's plain encoders (CLIP-L
// F16, T5 F8_E4M3) writes torch's (w.float() + delta).to(dtype) into them
// (≥ 99.9 % identical, the rest one step of the dtype away), journals them
// by reference into the file, and remove restores every byte. The
// transformer's NF4 bytes fused beside them are exactly those the
// transformer's LoRA alone fuses to. On a device arena (the simulated GPU)
// the 4-bit weights take the device kernels and the encoders' plain ones
// the CPU pass, downloaded and uploaded back.
func TestFusedTextEncoderLoRAOnBundle(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) { testFusedTextEncoderLoRAOnBundle(t, backend) })
	}
}

func testFusedTextEncoderLoRAOnBundle(t *testing.T, backend string) {
	s := newHostOn(t, backend)
	bundle, teLoRA := loadBundle(t, s)
	_, _, dir := fixtures(t)
	orig, origQ := teBytes(t, s), snapshotOf(t, s, bundleModel)
	f, err := safetensors.Open(bundle)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	oracle := teoracle.Run(t, bundle, teLoRA, 0.8, func(k string) []byte { b, _ := f.Data(k); return b })
	if len(oracle) != len(samples.BundleTEWeights()) {
		t.Fatalf("oracle covers %d weights of %d", len(oracle), len(samples.BundleTEWeights()))
	}

	// The transformer's LoRA alone: its fused NF4 bytes.
	kohya := entries(dir, kohyaOracle(1))[0]
	if _, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: bundleModel, LoRAs: []api.AppliedLoRA{kohya}, Mode: lora.ModeFuse}); err != nil {
		t.Fatal(err)
	}
	alone := snapshotOf(t, s, bundleModel)
	// With the text-encoder LoRA beside it.
	set := []api.AppliedLoRA{kohya, {Name: "te", Path: teLoRA, Strength: 0.8}}
	res, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: bundleModel, LoRAs: set, Mode: lora.ModeFuse, Strict: true})
	if err != nil {
		t.Fatal(err)
	}
	fused := map[string]bool{}
	for _, w := range res.Fused {
		fused[w] = true
	}
	for _, w := range samples.BundleTEWeights() {
		if !fused[w] {
			t.Errorf("%s not in the fused list", w)
		}
	}
	mixed := false
	for _, ph := range res.Report.Phases {
		mixed = mixed || strings.HasPrefix(ph.Name, "text encoders' plain weights")
	}
	if mixed != (backend == server.BackendCUDASim) {
		t.Errorf("%s: the device pass with the encoders through the CPU pass: %v (phases %v)", backend, mixed, res.Report.Phases)
	}
	if res.JournalFileBytes == 0 || res.JournalBytes != 0 {
		t.Errorf("journal: %d arena bytes, %d referenced in the file", res.JournalBytes, res.JournalFileBytes)
	}
	sameBytes(t, "transformer beside the text-encoder LoRA", alone, snapshotOf(t, s, bundleModel))
	got := teBytes(t, s)
	total, same := 0, 0
	for _, w := range samples.BundleTEWeights() {
		sm, n, err := teoracle.Compare(w, oracle[w], got[w])
		if err != nil {
			t.Error(err)
		}
		same, total = same+sm, total+n
		if string(got[w]) == string(orig[w]) {
			t.Errorf("%s: unchanged by the fuse", w)
		}
	}
	teoracle.Enough(t, "fused encoder weights", same, total)

	// Remove: every byte back, encoders and transformer.
	if _, err := s.LoRAs.Remove(t.Context(), bundleModel); err != nil {
		t.Fatal(err)
	}
	sameBytes(t, "encoders after remove", orig, teBytes(t, s))
	sameBytes(t, "transformer after remove", origQ, snapshotOf(t, s, bundleModel))

	// Side then fuse then side: the fused encoders are put back before
	// factors bind to them.
	if _, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: bundleModel, LoRAs: set[1:], Mode: lora.ModeFuse}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: bundleModel, LoRAs: set[1:], Mode: lora.ModeSide}); err != nil {
		t.Fatal(err)
	}
	sameBytes(t, "encoders in side mode after a fuse", orig, teBytes(t, s))
}

// A text-encoder LoRA whose merged F16 values overflow is refused as a bad
// LoRA naming the layer, with every weight as it was; so is the same after
// a fuse, which stays applied.
func TestFusedTextEncoderLoRANonFinite(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) { testFusedTextEncoderLoRANonFinite(t, backend) })
	}
}

func testFusedTextEncoderLoRANonFinite(t *testing.T, backend string) {
	s := newHostOn(t, backend)
	_, teLoRA := loadBundle(t, s)
	f, err := safetensors.Open(teLoRA)
	if err != nil {
		t.Fatal(err)
	}
	const mod = "lora_te1_text_model_encoder_layers_1_mlp_fc1"
	var ts []safetensors.WriteTensor
	for _, ti := range f.Tensors {
		b, _ := f.Data(ti.Name)
		b = append([]byte(nil), b...)
		if ti.Name == mod+".lora_up.weight" {
			v := make([]float32, len(b)/4)
			half.DecodeF32(v, b)
			for i := range v {
				v[i] *= 1e30 // finite in fp32, far beyond F16's 65504
			}
			half.EncodeF32(b, v)
		}
		ts = append(ts, safetensors.WriteTensor{Name: ti.Name, DType: ti.DType, Shape: ti.Shape, Data: b})
	}
	f.Close()
	huge := filepath.Join(t.TempDir(), "huge-te.safetensors")
	if err := safetensors.WriteFile(huge, nil, ts); err != nil {
		t.Fatal(err)
	}
	for _, over := range []bool{false, true} {
		if over {
			if _, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: bundleModel, LoRAs: []api.AppliedLoRA{{Name: "te", Path: teLoRA, Strength: 0.5}}, Mode: lora.ModeFuse}); err != nil {
				t.Fatal(err)
			}
		}
		before, beforeQ := teBytes(t, s), snapshotOf(t, s, bundleModel)
		st0, _ := s.LoRAs.State(bundleModel)
		_, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: bundleModel, LoRAs: []api.AppliedLoRA{{Name: "huge", Path: huge, Strength: 1}}, Mode: lora.ModeFuse})
		if !errors.Is(err, lora.ErrBadLoRA) || !strings.Contains(err.Error(), "text_model.encoder.layers.1.mlp.fc1") || !strings.Contains(err.Error(), "F16") {
			t.Fatalf("over a fuse %v: apply: %v, want a bad LoRA naming the layer and F16", over, err)
		}
		sameBytes(t, "encoders after the refused fuse", before, teBytes(t, s))
		sameBytes(t, "transformer after the refused fuse", beforeQ, snapshotOf(t, s, bundleModel))
		if st, _ := s.LoRAs.State(bundleModel); st.Mode != st0.Mode || len(st.LoRAs) != len(st0.LoRAs) {
			t.Errorf("state after the refused fuse: %+v, before %+v", st, st0)
		}
	}
}

// The plugin killed while it fuses the encoders: the host puts every
// encoder weight back, from the journal's references into the file (and
// re-fuses the previous set over a fused model).
func TestPluginKilledMidTextEncoderFuse(t *testing.T) {
	for _, over := range []bool{false, true} {
		t.Run(map[bool]string{false: "first fuse", true: "over a fuse"}[over], func(t *testing.T) {
			t.Setenv("LORA_NF4_LAYER_DELAY", "40ms")
			s := newHost(t)
			_, teLoRA := loadBundle(t, s)
			s.LoRAs.JournalMemory = 0 // restore from the file itself
			orig := teBytes(t, s)
			if over {
				if _, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: bundleModel, LoRAs: []api.AppliedLoRA{{Name: "te", Path: teLoRA, Strength: -0.5}}, Mode: lora.ModeFuse}); err != nil {
					t.Fatal(err)
				}
			}
			before := teBytes(t, s)
			st, err := s.Plugins.PluginStatus(lora.PluginName)
			if err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() {
				_, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: bundleModel, LoRAs: []api.AppliedLoRA{{Name: "te", Path: teLoRA, Strength: 1}}, Mode: lora.ModeFuse})
				done <- err
			}()
			// 26 encoder weights at 40 ms each: kill the pass half way.
			waitThenKill(t, st.PID, 500)
			if err := <-done; err == nil {
				t.Fatal("apply succeeded although the plugin was killed mid-pass")
			}
			sameBytes(t, "encoders after the kill", before, teBytes(t, s))
			if cur, _ := s.LoRAs.State(bundleModel); (cur.Mode == lora.ModeFuse) != over {
				t.Errorf("state after the failed apply: %+v", cur)
			}
			if _, err := s.LoRAs.Remove(t.Context(), bundleModel); err != nil {
				t.Fatal(err)
			}
			sameBytes(t, "encoders after remove", orig, teBytes(t, s))
		})
	}
}

// waitThenKill sleeps ms milliseconds and kills the process pid.
func waitThenKill(t *testing.T, pid, ms int) {
	t.Helper()
	time.Sleep(time.Duration(ms) * time.Millisecond)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
}
