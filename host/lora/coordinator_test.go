package lora_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/arenahost/arenahost/host/lora"
	"github.com/arenahost/arenahost/host/registry"
	"github.com/arenahost/arenahost/host/server"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/nf4"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/samples"
)

func entries(dir string, set ...oracleLoRA) []api.AppliedLoRA {
	var out []api.AppliedLoRA
	for _, l := range set {
		out = append(out, api.AppliedLoRA{Name: l.file, Path: filepath.Join(dir, l.file), Strength: l.strength})
	}
	return out
}

func TestSideMatchesOracle(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) { testSideMatchesOracle(t, backend) })
	}
}

func testSideMatchesOracle(t *testing.T, backend string) {
	s := newHostOn(t, backend)
	_, _, dir := fixtures(t)
	orig := snapshot(t, s)
	set := []oracleLoRA{kohyaOracle(0.8), peftOracle(1.3)}
	res, err := s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: entries(dir, set...)})
	if err != nil {
		t.Fatal(err)
	}
	if res.Mode != lora.ModeSide || res.Report == nil || len(res.Report.LoRAs) != 2 {
		t.Fatalf("result %+v", res)
	}
	for _, lr := range res.Report.LoRAs {
		if lr.Matched == 0 || len(lr.Unmatched) != 0 {
			t.Errorf("%s: matched %d, unmatched %v", lr.File, lr.Matched, lr.Unmatched)
		}
	}
	checkSide(t, s, dir, set)
	sameBytes(t, "side mode", orig, snapshot(t, s)) // the NF4 bytes are never rewritten
	if backend != server.BackendCPU {
		// The plugin got descriptors on the device slabs: the backend
		// knows its generation holds them.
		qw, _ := s.Registry.Weight(server.DefaultModelName, oracleWeights[0])
		if hs := s.Slabs.Holders(qw.Packed.Region.Segment); len(hs) == 0 || !strings.HasPrefix(string(hs[0]), "plugin:lora-nf4#") {
			t.Errorf("holders of the slab of %s: %v, want the lora-nf4 generation", qw.Name, hs)
		}
	}

	// Same set, same strengths: a no-op that keeps the binding.
	_, _, _, gen := boundFactors(t, s, oracleWeights[0])
	again, err := s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: entries(dir, set...)})
	if err != nil || !again.NoOp {
		t.Fatalf("re-apply: %+v, %v; want a no-op", again, err)
	}
	if _, _, _, g := boundFactors(t, s, oracleWeights[0]); g != gen {
		t.Errorf("no-op changed the binding generation %d → %d", gen, g)
	}

	// A strength change rewrites only that LoRA's columns of B_cat.
	w := oracleWeights[0]
	a0, b0, rank, _ := boundFactors(t, s, w)
	set[0].strength = 0.4
	res, err = s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: entries(dir, set...)})
	if err != nil {
		t.Fatal(err)
	}
	if res.Path != "set_strengths" {
		t.Errorf("strength change ran %q, want set_strengths", res.Path)
	}
	a1, b1, rank1, gen1 := boundFactors(t, s, w)
	if rank1 != rank || gen1 == gen {
		t.Fatalf("rank %d→%d, generation %d→%d", rank, rank1, gen, gen1)
	}
	for i := range a0 {
		if a0[i] != a1[i] {
			t.Fatalf("A_cat[%d] changed on a strength change", i)
		}
	}
	const kohyaRank = 8 // LoRA 0 owns columns [0, 8) of the qkv's B_cat
	out := len(b0) / rank
	for i := 0; i < out; i++ {
		for k := 0; k < rank; k++ {
			o, n := b0[i*rank+k], b1[i*rank+k]
			if k < kohyaRank && n != o/2 {
				t.Fatalf("B_cat[%d,%d] = %v, want half of %v", i, k, n, o)
			}
			if k >= kohyaRank && n != o {
				t.Fatalf("B_cat[%d,%d] of the other LoRA changed: %v → %v", i, k, o, n)
			}
		}
	}
	checkSide(t, s, dir, set)

	// Remove frees every factor.
	level := s.Arena.Stats().Allocated
	if _, err := s.LoRAs.Remove(t.Context(), ""); err != nil {
		t.Fatal(err)
	}
	if st := s.Arena.Stats().Allocated; st >= level {
		t.Errorf("arena at %d after remove, %d before: factors not freed", st, level)
	}
	if g, fs := s.Bindings.Current(server.DefaultModelName); g != 0 || fs != nil {
		t.Errorf("binding left after remove: %d %v", g, fs)
	}
}

func TestFuseRemoveByteExact(t *testing.T) {
	for _, backend := range backends {
		for _, model := range []string{server.DefaultModelName, nestedModel} {
			t.Run(backend+"/"+model, func(t *testing.T) { testFuseRemoveByteExact(t, backend, model) })
		}
	}
}

// testFuseRemoveByteExact fuses into model (the sample, or its nested-absmax
// twin), checks the codes against quantize(W_ref), then fuses again and
// removes: byte-exact. A nested weight keeps its nested_quant_map and
// quant-state JSON (nested_offset) and re-encodes absmax around them.
func testFuseRemoveByteExact(t *testing.T, backend, model string) {
	s := newHostOn(t, backend)
	_, _, dir := fixtures(t)
	if model == nestedModel {
		loadNested(t, s)
	}
	orig := snapshotOf(t, s, model)
	level := s.Arena.Stats().Allocated
	set := []oracleLoRA{kohyaOracle(1), peftOracle(0.7)}
	w := oracleWeights[0]
	ref, _, outN, in := wRefOf(t, s, model, dir, w, set) // before the fuse: W_ref is on the original dq(W)
	res, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: model, LoRAs: entries(dir, set...), Mode: lora.ModeFuse})
	if err != nil {
		t.Fatal(err)
	}
	qw, _ := s.Registry.Weight(model, w)
	// The sample model was loaded from a file: the journal references it
	// and holds nothing in the arena.
	if res.Report.Retention <= 0 || res.Report.PeakScratchBytes <= 0 || len(res.Fused) == 0 || res.JournalFileBytes == 0 || res.JournalBytes != 0 {
		t.Errorf("fuse report: retention %v scratch %d fused %d journal %d in the arena, %d in the file", res.Report.Retention, res.Report.PeakScratchBytes, len(res.Fused), res.JournalBytes, res.JournalFileBytes)
	}
	// The host's steps around the plugin's (which differ by backend), in
	// order.
	var phases []string
	for _, ph := range res.Report.Phases {
		phases = append(phases, ph.Name)
	}
	head := []string{"host: plan call (the plugin parses and maps the set)", "host: journal and restore", "parse and plan"}
	if len(phases) < len(head)+2 || !slices.Equal(phases[:len(head)], head) || phases[len(phases)-1] != "host: apply call (the plugin's phases above)" {
		t.Errorf("phases %q: want %q, the plugin's pass, then the host's apply call", phases, head)
	}
	if qw.State.Nested && res.JournalFileBytes%(qw.Packed.NBytes+qw.Absmax.NBytes+qw.NestedAbsmax.NBytes) != 0 {
		t.Errorf("journal of %d file bytes does not hold packed, absmax and nested_absmax of each weight", res.JournalFileBytes)
	}
	// At least 99.9% of the codes are quantize(W_ref) by the bnb rule,
	// the rest one code away.
	f32 := make([]float32, len(ref))
	for i, v := range ref {
		f32[i] = float32(v)
	}
	want := make([]byte, nf4.PackedLen(len(ref)))
	wantAbsmax := make([]float32, nf4.Blocks(len(ref), qw.State.Blocksize))
	nf4.Quantize(want, wantAbsmax, f32, qw.State.Blocksize, nf4.QuantNF4)
	now := snapshotOf(t, s, model)
	got := now[qw.Packed.Name]
	var same, off1, n int
	for i := 0; i < outN*in; i++ {
		g, wv := int(got[i/2]>>(4*(1-i%2))&15), int(want[i/2]>>(4*(1-i%2))&15)
		n++
		switch {
		case g == wv:
			same++
		case g-wv == 1 || wv-g == 1:
			off1++
		}
	}
	if float64(same) < 0.999*float64(n) || same+off1 != n {
		t.Errorf("%s: %d of %d codes equal quantize(W_ref), %d off by one", w, same, n, off1)
	}
	if string(got) == string(orig[qw.Packed.Name]) {
		t.Fatalf("%s unchanged by fuse", w)
	}
	if qw.State.Nested {
		// Absmax decodes, with the stored map and offset, to quantize(W_ref)'s
		// within the nested 8-bit step; map and JSON are untouched.
		for _, tn := range []*registry.Tensor{qw.NestedQuantMap, qw.StateJSON} {
			if string(now[tn.Name]) != string(orig[tn.Name]) {
				t.Errorf("fuse changed %s", tn.Name)
			}
		}
		nabs, code := f32le(now[qw.NestedAbsmax.Name]), f32le(now[qw.NestedQuantMap.Name])
		dec := make([]float32, len(wantAbsmax))
		nf4.DequantizeNested(dec, now[qw.Absmax.Name], nabs, (*[256]float32)(code), float32(qw.State.NestedOffset), nf4.NestedBlocksize)
		for b, v := range dec {
			if d := math.Abs(float64(v - wantAbsmax[b])); d > 0.02*float64(nabs[b/nf4.NestedBlocksize])+1e-3*float64(wantAbsmax[b]) {
				t.Fatalf("%s: absmax block %d decodes to %v, quantize(W_ref) has %v", w, b, v, wantAbsmax[b])
			}
		}
		if string(now[qw.Absmax.Name]) == string(orig[qw.Absmax.Name]) || string(now[qw.NestedAbsmax.Name]) == string(orig[qw.NestedAbsmax.Name]) {
			t.Errorf("%s: nested absmax not re-encoded", w)
		}
	}
	// Fuse after fuse starts from the originals; then remove is exact.
	if _, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: model, LoRAs: entries(dir, kohyaOracle(0.3)), Mode: lora.ModeFuse}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.LoRAs.Remove(t.Context(), model); err != nil {
		t.Fatal(err)
	}
	sameBytes(t, "remove after fuse", orig, snapshotOf(t, s, model))
	if a := s.Arena.Stats().Allocated; a != level {
		t.Errorf("arena at %d after remove, %d before apply", a, level)
	}
}

// f32le decodes little-endian float32s.
func f32le(b []byte) []float32 {
	v := make([]float32, len(b)/4)
	for i := range v {
		v[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return v
}

// TestRandomCycles runs random apply / strength change / mode switch /
// remove cycles; every remove must give the original bytes back.
func TestRandomCycles(t *testing.T) {
	s := newHost(t)
	_, _, dir := fixtures(t)
	orig := snapshot(t, s)
	level := s.Arena.Stats().Allocated
	rng := rand.New(rand.NewPCG(3, 4))
	cycles := 24
	if testing.Short() {
		cycles = 6
	}
	for c := 0; c < cycles; c++ {
		var set []oracleLoRA
		if rng.IntN(2) == 0 {
			set = append(set, kohyaOracle(float64(rng.IntN(5))*0.25))
		}
		if rng.IntN(2) == 0 || len(set) == 0 {
			set = append(set, peftOracle(float64(rng.IntN(5))*0.5-1))
		}
		mode := lora.ModeSide
		if rng.IntN(3) == 0 {
			mode = lora.ModeFuse
		}
		if _, err := s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: entries(dir, set...), Mode: mode}); err != nil {
			t.Fatalf("cycle %d: apply %s: %v", c, mode, err)
		}
		if rng.IntN(3) == 0 {
			if _, err := s.LoRAs.Remove(t.Context(), ""); err != nil {
				t.Fatal(err)
			}
			sameBytes(t, "remove", orig, snapshot(t, s))
		}
	}
	if _, err := s.LoRAs.Remove(t.Context(), ""); err != nil {
		t.Fatal(err)
	}
	sameBytes(t, "final remove", orig, snapshot(t, s))
	if a := s.Arena.Stats().Allocated; a != level {
		t.Errorf("arena at %d after the cycles, %d before", a, level)
	}
}

// badLoRAs writes the malformed corpus into dir and returns file → the key
// (or text) its error must name.
func badLoRAs(t *testing.T, src, dir string) map[string]string {
	t.Helper()
	good, err := os.ReadFile(filepath.Join(src, samples.KohyaLoRAFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bad-truncated.safetensors"), good[:len(good)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	f32 := func(vals []float32) []byte {
		b := make([]byte, 2*len(vals))
		half.EncodeBF16(b, vals)
		return b
	}
	mk := func(n int, v float32) []float32 {
		out := make([]float32, n)
		for i := range out {
			out[i] = v
		}
		return out
	}
	const key = "lora_unet_double_blocks_0_img_attn_qkv"
	write := func(name string, ts ...safetensors.WriteTensor) {
		if err := safetensors.WriteFile(filepath.Join(dir, name), nil, ts); err != nil {
			t.Fatal(err)
		}
	}
	bt := func(name string, shape []int64, vals []float32) safetensors.WriteTensor {
		return safetensors.WriteTensor{Name: name, DType: safetensors.BF16, Shape: shape, Data: f32(vals)}
	}
	write("bad-rank.safetensors", bt(key+".lora_down.weight", []int64{8, 256}, mk(8*256, 0.01)), bt(key+".lora_up.weight", []int64{768, 4}, mk(768*4, 0.01)))
	write("bad-infeatures.safetensors", bt(key+".lora_down.weight", []int64{8, 100}, mk(800, 0.01)), bt(key+".lora_up.weight", []int64{768, 8}, mk(768*8, 0.01)))
	write("bad-alpha.safetensors", bt(key+".lora_down.weight", []int64{8, 256}, mk(8*256, 0.01)), bt(key+".lora_up.weight", []int64{768, 8}, mk(768*8, 0.01)),
		bt(key+".alpha", []int64{2}, []float32{4, 4}))
	nan := mk(8*256, 0.01)
	nan[77] = float32(math.NaN())
	write("bad-nan.safetensors", bt(key+".lora_down.weight", []int64{8, 256}, nan), bt(key+".lora_up.weight", []int64{768, 8}, mk(768*8, 0.01)))
	return map[string]string{
		"bad-truncated.safetensors":  "bad-truncated.safetensors",
		"bad-rank.safetensors":       key,
		"bad-infeatures.safetensors": key,
		"bad-alpha.safetensors":      key,
		"bad-nan.safetensors":        key,
	}
}

func TestBadLoRAsLeaveModelUnchanged(t *testing.T) {
	s := newHost(t)
	_, _, dir := fixtures(t)
	bad := t.TempDir()
	corpus := badLoRAs(t, dir, bad)
	orig := snapshot(t, s)
	for _, prior := range []string{"", lora.ModeSide, lora.ModeFuse} {
		if prior != "" {
			if _, err := s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: entries(dir, kohyaOracle(1)), Mode: prior}); err != nil {
				t.Fatal(err)
			}
		}
		before, level := snapshot(t, s), s.Arena.Stats().Allocated
		st0, _ := s.LoRAs.State("")
		g0, _ := s.Bindings.Current(server.DefaultModelName)
		for file, key := range corpus {
			for _, mode := range []string{lora.ModeSide, lora.ModeFuse} {
				set := append(entries(dir, peftOracle(1)), api.AppliedLoRA{Path: filepath.Join(bad, file), Strength: 1})
				_, err := s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: set, Mode: mode})
				if !errors.Is(err, lora.ErrBadLoRA) {
					t.Fatalf("prior %q, %s %s: err %v, want ErrBadLoRA", prior, mode, file, err)
				}
				if !contains(err.Error(), file, key) {
					t.Errorf("%s %s: error %q does not name the file and key %s", mode, file, err, key)
				}
				sameBytes(t, file, before, snapshot(t, s))
				if a := s.Arena.Stats().Allocated; a != level {
					t.Errorf("prior %q, %s %s: arena at %d, %d before", prior, mode, file, a, level)
				}
				st, _ := s.LoRAs.State("")
				g, _ := s.Bindings.Current(server.DefaultModelName)
				if st.Mode != st0.Mode || len(st.LoRAs) != len(st0.LoRAs) || g != g0 {
					t.Errorf("prior %q, %s %s: state %+v gen %d, want %+v gen %d", prior, mode, file, st, g, st0, g0)
				}
			}
		}
	}
	// Strict refuses a set with unmatched keys, naming one.
	extra := filepath.Join(bad, "unmatched.safetensors")
	b := make([]byte, 2*8*64)
	if err := safetensors.WriteFile(extra, nil, []safetensors.WriteTensor{
		{Name: "lora_unet_no_such_layer.lora_down.weight", DType: safetensors.BF16, Shape: []int64{8, 64}, Data: b},
		{Name: "lora_unet_no_such_layer.lora_up.weight", DType: safetensors.BF16, Shape: []int64{64, 8}, Data: b},
	}); err != nil {
		t.Fatal(err)
	}
	_, err := s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: []api.AppliedLoRA{{Path: extra, Strength: 1}}, Strict: true})
	if !errors.Is(err, lora.ErrBadLoRA) || !contains(err.Error(), "unmatched.safetensors", "lora_unet_no_such_layer") {
		t.Errorf("strict with an unmatched key: %v", err)
	}
	if _, err := s.LoRAs.Remove(t.Context(), ""); err != nil {
		t.Fatal(err)
	}
	sameBytes(t, "after the corpus", orig, snapshot(t, s))
}

func TestConcurrentAppliesSerialized(t *testing.T) {
	s := newHost(t)
	_, _, dir := fixtures(t)
	var wg sync.WaitGroup
	errs := make([]error, 6)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			set := []oracleLoRA{kohyaOracle(0.25 * float64(i+1)), peftOracle(1)}
			_, errs[i] = s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: entries(dir, set...)})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("apply %d: %v", i, err)
		}
	}
	st, err := s.LoRAs.State("")
	if err != nil {
		t.Fatal(err)
	}
	// Whichever ran last, the bound factors are exactly its set.
	checkSide(t, s, dir, []oracleLoRA{kohyaOracle(st.LoRAs[0].Strength), peftOracle(1)})
}

// TestPluginKilledMidFuseRollsBack kills the plugin mid-pass, with the
// journal referencing the model file (with the originals also copied in
// host memory: "file"; with none: "file-only"; with a budget that copies
// some weights only: "file-partial") and with it in the arena (the model's
// source detached), on a fused model (snapshots roll back) and a clean one.
func TestPluginKilledMidFuseRollsBack(t *testing.T) {
	for _, c := range []struct {
		backend, kind string
		over          bool
	}{
		{server.BackendCPU, "file", false}, {server.BackendCPU, "file", true},
		{server.BackendCPU, "file-only", false}, {server.BackendCPU, "file-only", true},
		{server.BackendCPU, "file-partial", true}, {server.BackendCPU, "file-arena", false}, {server.BackendCPU, "file-arena", true},
		{server.BackendCPU, "arena", false}, {server.BackendCPU, "arena", true},
		{server.BackendCUDASim, "file", true}, {server.BackendCUDASim, "file-only", true}, {server.BackendCUDASim, "file-arena", true},
		{server.BackendCUDASim, "arena", false},
	} {
		t.Run(fmt.Sprintf("%s, %s journal, over a fuse %v", c.backend, c.kind, c.over), func(t *testing.T) { testPluginKilledMidFuse(t, c.backend, c.kind, c.over) })
	}
}

func testPluginKilledMidFuse(t *testing.T, backend, kind string, over bool) {
	t.Setenv("LORA_NF4_LAYER_DELAY", "40ms")
	s := newHostOn(t, backend)
	_, _, dir := fixtures(t)
	switch kind {
	case "arena":
		if err := s.Registry.DetachSource(server.DefaultModelName); err != nil {
			t.Fatal(err)
		}
	case "file-only":
		s.LoRAs.JournalMemory = 0
	case "file-partial":
		s.LoRAs.JournalMemory = 300 << 10 // a few of the sample's weights
	case "file-arena":
		s.LoRAs.JournalArena = 1 << 30
	}
	var inArena uint64
	if over {
		if _, err := s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: entries(dir, peftOracle(0.5)), Mode: lora.ModeFuse}); err != nil {
			t.Fatal(err)
		}
		if err := s.LoRAs.WaitJournalCopies(t.Context(), ""); err != nil {
			t.Fatal(err)
		}
		res, err := s.LoRAs.State("")
		if err != nil {
			t.Fatal(err)
		}
		if (kind == "arena") != (res.JournalFileBytes == 0) || (kind == "arena" || kind == "file-arena") != (res.JournalBytes > 0) ||
			(kind == "file-arena" && res.JournalBytes != res.JournalFileBytes) {
			t.Fatalf("%s journal: %d bytes in the arena, %d in the file", kind, res.JournalBytes, res.JournalFileBytes)
		}
		switch mem := res.JournalMemoryBytes; {
		case kind == "file" && mem != res.JournalFileBytes,
			kind == "file-partial" && (mem == 0 || mem >= res.JournalFileBytes || mem > 300<<10),
			(kind == "file-only" || kind == "arena" || kind == "file-arena") && mem != 0:
			t.Fatalf("%s journal: %d of %d referenced bytes copied in memory", kind, mem, res.JournalFileBytes)
		}
		inArena = res.JournalBytes
	}
	orig := snapshot(t, s)
	level := s.Arena.Stats().Allocated
	if err := killMidFuse(t, s, entries(dir, kohyaOracle(1))); err == nil {
		t.Fatal("apply succeeded although the plugin was killed mid-pass")
	}
	sameBytes(t, "after the kill", orig, snapshot(t, s))
	if cur, _ := s.LoRAs.State(""); (cur.Mode == lora.ModeFuse) != over || cur.JournalBytes != inArena {
		t.Errorf("state after the failed apply: %+v", cur)
	}
	// The dead generation's leases are reclaimed; the journal is freed.
	deadline := time.Now().Add(5 * time.Second)
	for s.Arena.Stats().Allocated != level && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if a := s.Arena.Stats().Allocated; a != level {
		t.Errorf("arena at %d after the kill, %d before", a, level)
	}
	if n := s.LoRAs.MemoryHeld(); !over && n != 0 {
		t.Errorf("%d bytes of in-memory copies held after a failed first fuse", n)
	}
	_ = registry.ErrNotFound
}

// TestFailedRefuseLeavesOriginals: the rollback of a failed fuse over a
// fused model fuses the previous set again; when that fails too (its file
// was deleted), the model gets its original bytes back, holds no LoRA, and
// the error says so.
func TestFailedReFuseLeavesOriginals(t *testing.T) {
	t.Setenv("LORA_NF4_LAYER_DELAY", "40ms")
	s := newHost(t)
	_, _, dir := fixtures(t)
	orig := snapshot(t, s)
	level := s.Arena.Stats().Allocated
	raw, err := os.ReadFile(filepath.Join(dir, samples.PEFTLoRAFile))
	if err != nil {
		t.Fatal(err)
	}
	gone := filepath.Join(dir, "refuse-gone.safetensors")
	if err := os.WriteFile(gone, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(gone)
	if _, err := s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: []api.AppliedLoRA{{Name: "refuse-gone.safetensors", Path: gone, Strength: 0.5}}, Mode: lora.ModeFuse}); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(gone); err != nil {
		t.Fatal(err)
	}
	if err := killMidFuse(t, s, entries(dir, kohyaOracle(1))); err == nil ||
		!contains(err.Error(), "fuse the previous set again", "refuse-gone.safetensors", "the model now holds its original weights and no LoRA") {
		t.Fatalf("apply: %v", err)
	}
	sameBytes(t, "after the failed rollback", orig, snapshot(t, s))
	if cur, _ := s.LoRAs.State(""); cur.Mode != "" || len(cur.LoRAs) != 0 {
		t.Errorf("state after the failed rollback: %+v", cur)
	}
	if a := s.Arena.Stats().Allocated; a != level {
		t.Errorf("arena at %d after the failed rollback, %d before the first apply", a, level)
	}
}

// killMidFuse starts a fused apply of set on the default model (with
// LORA_NF4_LAYER_DELAY set, so that the pass is slow), kills the plugin
// once the pass has written some layers, and returns the apply's error.
func killMidFuse(t *testing.T, s *server.Server, set []api.AppliedLoRA) error {
	t.Helper()
	st, err := s.Plugins.PluginStatus(lora.PluginName)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: set, Mode: lora.ModeFuse})
		done <- err
	}()
	time.Sleep(600 * time.Millisecond)
	if err := syscall.Kill(st.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		return err
	case <-time.After(60 * time.Second):
		t.Fatal("apply did not return after the plugin was killed")
		return nil
	}
}

// A model unloaded and loaded again starts with nothing applied; the old
// journal and factors are freed, never written into the new bytes.
func TestReloadedModelStartsClean(t *testing.T) {
	s := newHost(t)
	_, _, dir := fixtures(t)
	start := s.Arena.Stats().Allocated
	if _, err := s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: entries(dir, kohyaOracle(1)), Mode: lora.ModeFuse}); err != nil {
		t.Fatal(err)
	}
	m, _ := s.Registry.Model(server.DefaultModelName)
	src := m.Source
	if err := s.Registry.Unload(server.DefaultModelName); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Registry.Load(t.Context(), server.DefaultModelName, src); err != nil {
		t.Fatal(err)
	}
	orig := snapshot(t, s)
	st, err := s.LoRAs.State("")
	if err != nil || st.Mode != "" {
		t.Fatalf("state after reload: %+v, %v", st, err)
	}
	level := s.Arena.Stats().Allocated
	if level != start {
		t.Errorf("arena at %d after the reload, %d with the first load: the old journal was not freed", level, start)
	}
	if _, err := s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: entries(dir, peftOracle(1))}); err != nil {
		t.Fatal(err)
	}
	checkSide(t, s, dir, []oracleLoRA{peftOracle(1)})
	if _, err := s.LoRAs.Remove(t.Context(), ""); err != nil {
		t.Fatal(err)
	}
	sameBytes(t, "after reload", orig, snapshot(t, s))
	if a := s.Arena.Stats().Allocated; a != level {
		t.Errorf("arena at %d, %d before: the old journal or factors leaked", a, level)
	}
}

// A full-diff module (no low-rank form) travels as extra rows of A with
// identity columns of B: y = x·dq(W)ᵀ + (x·Aᵀ)·Bᵀ is still exact, and a
// strength change rescales those rows.
func TestSideDenseDelta(t *testing.T) {
	s := newHost(t)
	const w, n = "double_blocks.0.img_attn.proj.weight", hidden
	diff := make([]float32, n*n)
	rng := rand.New(rand.NewPCG(9, 9))
	for i := range diff {
		diff[i] = float32(rng.NormFloat64() * 0.02)
	}
	b := make([]byte, 2*len(diff))
	half.EncodeBF16(b, diff)
	half.DecodeBF16(diff, b) // what the file holds
	path := filepath.Join(t.TempDir(), "full-diff.safetensors")
	if err := safetensors.WriteFile(path, nil, []safetensors.WriteTensor{
		{Name: "lycoris_double_blocks_0_img_attn_proj.diff", DType: safetensors.BF16, Shape: []int64{n, n}, Data: b},
	}); err != nil {
		t.Fatal(err)
	}
	for _, strength := range []float64{1, -0.5} {
		res, err := s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: []api.AppliedLoRA{{Path: path, Strength: strength}}})
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Report.LoRAs[0].Dense) != 1 {
			t.Errorf("report %+v does not list the dense key", res.Report.LoRAs[0])
		}
		base, _, _ := dq(t, s, w)
		a, bb, rank, _ := boundFactors(t, s, w)
		if rank != n {
			t.Fatalf("bound rank %d, want %d dense rows", rank, n)
		}
		x := make([]float64, n)
		for j := range x {
			x[j] = rng.NormFloat64()
		}
		var maxErr, maxY float64
		xa := make([]float64, rank)
		for k := 0; k < rank; k++ {
			for j := 0; j < n; j++ {
				xa[k] += x[j] * float64(a[k*n+j])
			}
		}
		for i := 0; i < n; i++ {
			var y, ref float64
			for j := 0; j < n; j++ {
				y += x[j] * base[i*n+j]
				ref += x[j] * (base[i*n+j] + strength*float64(diff[i*n+j]))
			}
			for k := 0; k < rank; k++ {
				y += xa[k] * float64(bb[i*rank+k])
			}
			maxErr, maxY = math.Max(maxErr, math.Abs(y-ref)), math.Max(maxY, math.Abs(ref))
		}
		if maxErr > 1e-4*maxY {
			t.Errorf("strength %v: dense side output off by %.3g (|y| %.3g)", strength, maxErr, maxY)
		}
	}

	// bf16 factors: a strength change rewrites the dense rows of A'
	// (set_strengths) as an f32 apply at that strength rounds them.
	apply := func(strength float64, dt, want string) {
		t.Helper()
		res, err := s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: []api.AppliedLoRA{{Path: path, Strength: strength}}, FactorDType: dt})
		if err != nil || res.Path != want {
			t.Fatalf("strength %v, factor dtype %q: %+v %v, want path %s", strength, dt, res, err, want)
		}
	}
	apply(-0.5, lora.FactorBF16, "apply")
	apply(1, "", "set_strengths")
	_, ab, bb := boundLayer(t, s, w)
	apply(1, lora.FactorF32, "apply")
	_, fa, fb := boundLayer(t, s, w)
	if !bytes.Equal(ab, asBF16(t, fa)) || !bytes.Equal(bb, asBF16(t, fb)) {
		t.Error("bf16 dense factors after a strength change differ from the f32 factors at that strength, rounded")
	}
}

// TestPrepare: the plugin opens a device model's slabs when asked (the
// host asks after a load) and has nothing to open for a CPU model; an
// unknown model is an error naming it.
func TestPrepare(t *testing.T) {
	for _, c := range []struct {
		backend string
		slabs   bool
	}{{server.BackendCPU, false}, {server.BackendCUDASim, true}} {
		t.Run(c.backend, func(t *testing.T) {
			s := newHostOn(t, c.backend)
			n, err := s.LoRAs.Prepare(t.Context(), server.DefaultModelName)
			if err != nil {
				t.Fatal(err)
			}
			if (n > 0) != c.slabs {
				t.Fatalf("%d slabs open, want some: %v", n, c.slabs)
			}
			if _, err := s.LoRAs.Prepare(t.Context(), "no-such-model"); err == nil || !strings.Contains(err.Error(), "no-such-model") {
				t.Fatalf("unknown model: %v", err)
			}
		})
	}
}

// TestServerPreparesLoadedModel: after a model is loaded into a device
// arena, Server.Prepare (which the API's load calls) has the plugin look
// the model up and open its slabs, with no apply: the plugin becomes a
// holder of the segments the model's weights lie in.
func TestServerPreparesLoadedModel(t *testing.T) {
	// No sample model: nothing is looked up, or prepared, at start.
	s := newHostWith(t, server.BackendCUDASim, false)
	loadNested(t, s)
	qw, err := s.Registry.Weight(nestedModel, oracleWeights[0])
	if err != nil {
		t.Fatal(err)
	}
	seg := qw.Packed.Region.Segment
	if h := s.Slabs.Holders(seg); len(h) != 0 {
		t.Fatalf("segment %d held by %v before any plugin looked the model up", seg, h)
	}
	s.Prepare(nestedModel)
	deadline := time.Now().Add(30 * time.Second)
	for len(s.Slabs.Holders(seg)) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("segment %d: no holder 30 s after Prepare", seg)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
