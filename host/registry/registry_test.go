package registry

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/shared/nf4"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/tensor"
)

// bnbFixtures are state dicts of nf4 Linear4bit layers written by
// bitsandbytes 0.50.2 on CPU and safetensors.torch.save_file
// (testdata/bnb_linear4bit.py; TestBnbFixturesFresh re-runs it).
var bnbFixtures = []struct {
	file   string
	format Format
}{
	{"nested.safetensors", FormatBnbNF4Nested},
	{"plain.safetensors", FormatBnbNF4},
}

func TestLoadSaveBnbFixtures(t *testing.T) {
	for _, fx := range bnbFixtures {
		t.Run(fx.file, func(t *testing.T) {
			checkBnbRoundTrip(t, filepath.Join("testdata", "bnb", fx.file), fx.format)
		})
	}
}

// TestBnbFixturesFresh writes the fixtures again with bitsandbytes itself
// and runs the same checks on the fresh files, so the committed ones cannot
// drift from what the pinned bitsandbytes writes.
func TestBnbFixturesFresh(t *testing.T) {
	if testing.Short() {
		t.Skip("runs torch (about 15 s)")
	}
	py := testenv.TorchPython(t)
	dir := t.TempDir()
	testenv.RunPython(t, py, filepath.Join("testdata", "bnb_linear4bit.py"), dir)
	for _, fx := range bnbFixtures {
		t.Run(fx.file, func(t *testing.T) {
			fresh := filepath.Join(dir, fx.file)
			checkBnbRoundTrip(t, fresh, fx.format)
			got := readFile(t, fresh)
			// torch's DEFAULT kernels compute bitsandbytes' nested map
			// without fused multiply-add (nf4.TorchDynamicMap); the
			// committed fixture holds the fused variant, which AVX2 and
			// AVX512 kernels write. Compare modulo exactly that variant.
			if unfused := mapBytes(nf4.TorchDynamicMap(false)); bytes.Contains(got, unfused) {
				t.Logf("torch wrote the unfused (DEFAULT kernels) nested_quant_map; comparing with the fused variant in its place")
				got = bytes.ReplaceAll(got, unfused, mapBytes(nf4.TorchDynamicMap(true)))
			}
			if !bytes.Equal(got, readFile(t, filepath.Join("testdata", "bnb", fx.file))) {
				t.Errorf("bitsandbytes now writes a different %s than the committed fixture: regenerate testdata/bnb with testdata/bnb_linear4bit.py", fx.file)
			}
		})
	}
}

// checkBnbRoundTrip loads a bitsandbytes checkpoint, checks the registry's
// view of it against the file, saves it back (byte for byte) and unloads it.
func checkBnbRoundTrip(t *testing.T, path string, format Format) {
	a := newTestArena(t, 64<<20, 1<<20)
	reg := New(a, quiet())
	ctx := context.Background()
	m, err := reg.Load(ctx, "m", path)
	if err != nil {
		t.Fatal(err)
	}
	if m.Format != format || m.Source != path {
		t.Errorf("format %q source %q, want %q %q", m.Format, m.Source, format, path)
	}
	f, err := safetensors.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if len(m.Tensors) != len(f.Tensors) {
		t.Fatalf("%d tensors registered, file has %d", len(m.Tensors), len(f.Tensors))
	}
	for _, info := range f.Tensors {
		want, _ := f.Data(info.Name)
		err := reg.View("m", info.Name, func(tt *Tensor, got []byte) error {
			if tt.DType != info.DType || !slices.Equal(tt.Shape, info.Shape) || !bytes.Equal(got, want) {
				t.Errorf("tensor %s: %s %v %d bytes, file %s %v %d bytes (equal %v)", info.Name, tt.DType, tt.Shape, len(got), info.DType, info.Shape, len(want), bytes.Equal(got, want))
			}
			if c := crc32.Checksum(want, castagnoli); tt.LoadCRC() != c {
				t.Errorf("tensor %s: load CRC-32C %08x, the file's bytes %08x", info.Name, tt.LoadCRC(), c)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	// Three 4-bit layers: qkv [96,64] bs 64, fc1 [33,48] bs 64, proj [7,37] bs 128.
	wantWeights := map[string][]int64{
		"blocks.0.attn.qkv.weight": {96, 64},
		"blocks.0.mlp.fc1.weight":  {33, 48},
		"blocks.1.proj.weight":     {7, 37},
	}
	if len(m.Weights) != len(wantWeights) {
		t.Fatalf("%d 4-bit weights, want %d", len(m.Weights), len(wantWeights))
	}
	nested := format == FormatBnbNF4Nested
	for _, w := range m.Weights {
		if !slices.Equal(w.State.Shape, wantWeights[w.Name]) || w.State.QuantType != nf4.QuantNF4 ||
			w.State.DType != nf4.BFloat16 || w.State.Nested != nested {
			t.Errorf("weight %s: state %+v", w.Name, w.State)
		}
		if w.Packed.Quant != w || w.Absmax.QuantOf != w.Name || w.QuantMap.QuantOf != w.Name || w.StateJSON.QuantOf != w.Name {
			t.Errorf("weight %s: tensors not linked to it", w.Name)
		}
		if (w.NestedAbsmax != nil) != nested || (w.NestedQuantMap != nil) != nested {
			t.Errorf("weight %s: nested tensors %v %v for nested=%v", w.Name, w.NestedAbsmax, w.NestedQuantMap, nested)
		}
		// The registered bytes decode: the absmax the quant state implies.
		var data nf4.WeightData
		for _, p := range []struct {
			t   *Tensor
			dst *[]byte
		}{{w.Packed, &data.Packed}, {w.Absmax, &data.Absmax}, {w.QuantMap, &data.QuantMap}, {w.NestedAbsmax, &data.NestedAbsmax}, {w.NestedQuantMap, &data.NestedQuantMap}} {
			if p.t == nil {
				continue
			}
			b, err := a.Bytes(p.t.Region)
			if err != nil {
				t.Fatal(err)
			}
			*p.dst = b
		}
		out := make([]float32, w.State.Numel())
		if err := nf4.DequantizeWeight(out, w.State, data); err != nil {
			t.Errorf("weight %s: dequantize registered bytes: %v", w.Name, err)
		}
	}
	if got := m.Params(); got != 96*64+96+33*48+7*37+7+16+16 {
		t.Errorf("Params() = %d", got)
	}

	out := filepath.Join(t.TempDir(), "saved.safetensors")
	if err := reg.Save(ctx, "m", out); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readFile(t, out), readFile(t, path)) {
		t.Errorf("load then save of %s is not byte-identical", path)
	}
	if err := reg.Unload("m"); err != nil {
		t.Fatal(err)
	}
	if s := a.Stats(); s.Allocated != 0 || s.Regions != 0 {
		t.Errorf("after Unload: %d bytes in %d regions still allocated", s.Allocated, s.Regions)
	}
}

func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// badLoad is a file the loader must reject.
type badLoad struct {
	name string
	make func(t *testing.T, dir string) string // returns the file's path
	key  string                                // the key the error must name ("" for file-level errors)
	msg  string
}

func fromFixture(file string, edit func(t *safetensors.WriteTensor) bool) func(*testing.T, string) string {
	return func(t *testing.T, dir string) string {
		dst := filepath.Join(dir, "bad-"+file)
		rewrite(t, filepath.Join("testdata", "bnb", file), dst, edit)
		return dst
	}
}

func TestLoadRejectsBadBnb(t *testing.T) {
	const fc1 = "blocks.0.mlp.fc1.weight"
	tests := []badLoad{
		{
			name: "missing absmax",
			make: fromFixture("plain.safetensors", func(w *safetensors.WriteTensor) bool { return w.Name != fc1+".absmax" }),
			key:  fc1 + ".absmax", msg: "missing (needed by 4-bit weight " + fc1 + ")",
		},
		{
			name: "missing nested_absmax",
			make: fromFixture("nested.safetensors", func(w *safetensors.WriteTensor) bool { return w.Name != fc1+".nested_absmax" }),
			key:  fc1 + ".nested_absmax", msg: "missing",
		},
		{
			name: "json shape disagrees with the packed bytes",
			make: fromFixture("plain.safetensors", func(w *safetensors.WriteTensor) bool {
				if w.Name == fc1+nf4.SuffixQuantStateNF4 {
					w.Data = bytes.Replace(w.Data, []byte("[33, 48]"), []byte("[34, 48]"), 1)
					w.Shape = []int64{int64(len(w.Data))}
				}
				return true
			}),
			key: fc1, msg: "U8 [792 1] holds 792 bytes but quant state shape [34 48] needs 816",
		},
		{
			name: "NaN in quant_map",
			make: fromFixture("nested.safetensors", func(w *safetensors.WriteTensor) bool {
				if w.Name == fc1+".quant_map" {
					binary.LittleEndian.PutUint32(w.Data[4*3:], math.Float32bits(float32(math.NaN())))
				}
				return true
			}),
			key: fc1 + ".quant_map", msg: "NaN at index 3",
		},
		{
			name: "NaN in nested_quant_map",
			make: fromFixture("nested.safetensors", func(w *safetensors.WriteTensor) bool {
				if w.Name == fc1+".nested_quant_map" {
					binary.LittleEndian.PutUint32(w.Data[4*200:], 0x7fc00001)
				}
				return true
			}),
			key: fc1 + ".nested_quant_map", msg: "NaN at index 200",
		},
		{
			name: "bad quant-state JSON",
			make: fromFixture("plain.safetensors", func(w *safetensors.WriteTensor) bool {
				if w.Name == fc1+nf4.SuffixQuantStateNF4 {
					w.Data = w.Data[:len(w.Data)-1]
					w.Shape = []int64{int64(len(w.Data))}
				}
				return true
			}),
			key: fc1 + nf4.SuffixQuantStateNF4, msg: "",
		},
		{
			name: "dtype the protocol cannot describe",
			make: fromFixture("plain.safetensors", func(w *safetensors.WriteTensor) bool {
				if w.Name == "norm.weight" {
					w.DType = safetensors.C64
					w.Shape = []int64{8}
				}
				return true
			}),
			key: "norm.weight", msg: "dtype C64 cannot be held in the registry",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := tc.make(t, t.TempDir())
			checkRejected(t, path, tc.key, tc.msg)
		})
	}
}

// TestLoadRejectsBadSafetensors runs the safetensors bad-input corpus through
// the loader.
func TestLoadRejectsBadSafetensors(t *testing.T) {
	corpus := filepath.Join(testenv.RepoRoot(t), "shared", "safetensors", "testdata", "bad")
	ents, err := os.ReadDir(corpus)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) < 9 {
		t.Fatalf("safetensors corpus has %d files", len(ents))
	}
	keys := map[string]string{
		"truncated.safetensors": "w", "overlap.safetensors": "b", "size_mismatch.safetensors": "w",
		"unknown_dtype.safetensors": "w", "duplicate_key.safetensors": "w",
		"non_string_metadata.safetensors": "__metadata__",
	}
	for _, e := range ents {
		t.Run(e.Name(), func(t *testing.T) {
			path := filepath.Join(corpus, e.Name())
			err := checkRejected(t, path, "", "")
			var se *safetensors.Error
			if !errors.As(err, &se) || se.File != path || se.Key != keys[e.Name()] && keys[e.Name()] != "" {
				t.Errorf("error %v: want a *safetensors.Error for %s key %q", err, path, keys[e.Name()])
			}
		})
	}
}

// checkRejected loads path into a fresh arena and checks the load failed
// with an error naming the file (and key), that nothing was registered, that
// no bytes stay allocated and that no segment file was left behind.
func checkRejected(t *testing.T, path, key, msg string) error {
	t.Helper()
	a := newTestArena(t, 64<<20, 1<<20)
	before := a.files(t)
	reg := New(a, quiet())
	m, err := reg.Load(context.Background(), "bad", path)
	if err == nil {
		t.Fatalf("Load accepted %s: %+v", path, m)
	}
	t.Logf("rejected: %v", err)
	s := err.Error()
	if !strings.Contains(s, path) || !strings.Contains(s, `model "bad"`) {
		t.Errorf("error %q does not name the model and file %s", s, path)
	}
	if key != "" && !strings.Contains(s, key) {
		t.Errorf("error %q does not name key %q", s, key)
	}
	if msg != "" && !strings.Contains(s, msg) {
		t.Errorf("error %q lacks %q", s, msg)
	}
	checkClean(t, a, reg, before)
	return err
}

// checkClean asserts the arena holds nothing and has the same segment files
// as before the load, and that the registry is empty.
func checkClean(t *testing.T, a *testArena, reg *Registry, before []string) {
	t.Helper()
	if st := a.Stats(); st.Allocated != 0 || st.Regions != 0 {
		t.Errorf("after the failed load: %v in %d regions still allocated", st.Allocated, st.Regions)
	}
	if after := a.files(t); !slices.Equal(before, after) {
		t.Errorf("segment files %v before the load, %v after", before, after)
	}
	if ms := reg.Models(); len(ms) != 0 {
		t.Errorf("failed load registered %v", ms)
	}
}

// failingMemory lets the n-th Alloc fail, or cancels a context on it.
type failingMemory struct {
	Memory
	mu     sync.Mutex
	allocs int
	at     int
	fail   error
	cancel context.CancelFunc
}

func (f *failingMemory) Alloc(o arena.Owner, name string, n uint64) (arena.Region, error) {
	f.mu.Lock()
	f.allocs++
	hit := f.allocs == f.at
	f.mu.Unlock()
	if hit && f.fail != nil {
		return arena.Region{}, f.fail
	}
	if hit && f.cancel != nil {
		f.cancel()
	}
	return f.Memory.Alloc(o, name, n)
}

func TestLoadRollsBack(t *testing.T) {
	dir := t.TempDir()
	// 8 weights of [512, 256]: the packed tensors are 64 KiB each, larger
	// than the 32 KiB segments, so the arena grows while loading.
	path := filepath.Join(dir, "ckpt.safetensors")
	writeCheckpoint(t, path, checkpointSpec{rows: 512, cols: 256, weights: 8, blocksize: 64, nested: true, seed: 3})

	t.Run("arena full", func(t *testing.T) {
		a := newTestArena(t, 300<<10, 32<<10)
		before := a.files(t)
		reg := New(a, quiet())
		_, err := reg.Load(context.Background(), "m", path)
		if !errors.Is(err, arena.ErrCapacity) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "tensor ") {
			t.Fatalf("Load into a full arena: %v", err)
		}
		checkClean(t, a, reg, before)
	})
	t.Run("cancelled mid-load", func(t *testing.T) {
		a := newTestArena(t, 64<<20, 32<<10)
		before := a.files(t)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		reg := New(&failingMemory{Memory: a, at: 5, cancel: cancel}, quiet())
		_, err := reg.Load(ctx, "m", path)
		if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), path) {
			t.Fatalf("cancelled Load: %v", err)
		}
		checkClean(t, a, reg, before)
	})
	t.Run("cancelled before start", func(t *testing.T) {
		a := newTestArena(t, 64<<20, 32<<10)
		before := a.files(t)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		reg := New(a, quiet())
		if _, err := reg.Load(ctx, "m", path); !errors.Is(err, context.Canceled) {
			t.Fatalf("Load with a cancelled context: %v", err)
		}
		checkClean(t, a, reg, before)
	})
	t.Run("alloc fails late", func(t *testing.T) {
		a := newTestArena(t, 64<<20, 32<<10)
		before := a.files(t)
		boom := errors.New("boom")
		reg := New(&failingMemory{Memory: a, at: 30, fail: boom}, quiet())
		if _, err := reg.Load(context.Background(), "m", path); !errors.Is(err, boom) {
			t.Fatalf("Load with a failing alloc: %v", err)
		}
		checkClean(t, a, reg, before)
	})
	t.Run("file removed under a loaded model", func(t *testing.T) {
		a := newTestArena(t, 64<<20, 32<<10)
		reg := New(a, quiet())
		p2 := filepath.Join(t.TempDir(), "copy.safetensors")
		if err := os.WriteFile(p2, readFile(t, path), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := reg.Load(context.Background(), "m", p2); err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(p2); err != nil {
			t.Fatal(err)
		}
		out := filepath.Join(t.TempDir(), "saved.safetensors")
		if err := reg.Save(context.Background(), "m", out); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(readFile(t, out), readFile(t, path)) {
			t.Error("the arena copy does not reproduce the removed file")
		}
	})
}

func TestLoadNameConflicts(t *testing.T) {
	a := newTestArena(t, 64<<20, 1<<20)
	reg := New(a, quiet())
	path := filepath.Join("testdata", "bnb", "plain.safetensors")
	if _, err := reg.Load(context.Background(), "m", path); err != nil {
		t.Fatal(err)
	}
	alloc := a.Stats().Allocated
	if _, err := reg.Load(context.Background(), "m", path); !errors.Is(err, ErrExists) {
		t.Errorf("second Load under the same name: %v", err)
	}
	if got := a.Stats().Allocated; got != alloc {
		t.Errorf("refused Load changed the allocation from %v to %v", alloc, got)
	}
	if _, err := reg.Load(context.Background(), "", path); err == nil {
		t.Error("Load with an empty name succeeded")
	}
	if err := reg.Unload("nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Unload of an unknown model: %v", err)
	}
}

func TestLookups(t *testing.T) {
	a := newTestArena(t, 64<<20, 1<<20)
	reg := New(a, quiet())
	ctx := context.Background()
	for _, name := range []string{"b", "a"} {
		if _, err := reg.Load(ctx, name, filepath.Join("testdata", "bnb", "nested.safetensors")); err != nil {
			t.Fatal(err)
		}
	}
	ms := reg.Models()
	if len(ms) != 2 || ms[0].Name != "a" || ms[1].Name != "b" {
		t.Fatalf("Models() = %v", ms)
	}
	if m, ok := reg.Model("a"); !ok || m != ms[0] {
		t.Error("Model(a) differs from Models()[0]")
	}
	ts, err := reg.Tensors("a", "blocks.0.mlp.fc1.")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tt := range ts {
		names = append(names, tt.Name)
	}
	want := []string{
		"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.weight.absmax", "blocks.0.mlp.fc1.weight.nested_absmax",
		"blocks.0.mlp.fc1.weight.nested_quant_map", "blocks.0.mlp.fc1.weight.quant_map",
		"blocks.0.mlp.fc1.weight.quant_state.bitsandbytes__nf4",
	}
	if !reflect.DeepEqual(names, want) {
		t.Errorf("Tensors(prefix) = %v, want %v", names, want)
	}
	if all, _ := reg.Tensors("a", ""); len(all) != 22 {
		t.Errorf("Tensors(all) = %d tensors, want 22", len(all))
	}
	if tt, err := reg.Tensor("a", "norm.weight"); err != nil || tt.DType != safetensors.F32 || tt.Quant != nil {
		t.Errorf("Tensor(norm.weight) = %+v, %v", tt, err)
	}
	if _, err := reg.Tensor("a", "nope"); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("Tensor(nope): %v", err)
	}
	if _, err := reg.Tensor("zz", "norm.weight"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Tensor of an unknown model: %v", err)
	}
	if w, err := reg.Weight("a", "blocks.1.proj.weight"); err != nil || w.State.Blocksize != 128 {
		t.Errorf("Weight(proj) = %+v, %v", w, err)
	}
	// The two models have separate regions.
	ta, _ := reg.Tensor("a", "norm.weight")
	tb, _ := reg.Tensor("b", "norm.weight")
	if ta.Region == tb.Region {
		t.Error("two models share a region")
	}
}

// TestDescriptors maps the descriptors' segments the way a plugin does
// (shared/tensor.Mapper) and reads the tensors' bytes through them.
func TestDescriptors(t *testing.T) {
	a := newTestArena(t, 64<<20, 1<<20)
	reg := New(a, quiet())
	path := filepath.Join("testdata", "bnb", "nested.safetensors")
	if _, err := reg.Load(context.Background(), "m", path); err != nil {
		t.Fatal(err)
	}
	f, err := safetensors.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mapper := tensor.NewMapper()
	defer mapper.Close()

	const w = "blocks.0.attn.qkv.weight"
	d, err := reg.Descriptor(a, "m", w, pluginv1.Access_ACCESS_READ_ONLY)
	if err != nil {
		t.Fatal(err)
	}
	if err := tensor.Check(d); err != nil {
		t.Fatalf("descriptor fails shared/tensor's check: %v", err)
	}
	if d.Model != "m" || d.Name != w || d.Dtype != pluginv1.DType_DTYPE_U8 || !slices.Equal(d.Shape, []int64{3072, 1}) || d.Nbytes != 3072 {
		t.Errorf("descriptor %v", d)
	}
	got, err := mapper.Bytes(d)
	if err != nil {
		t.Fatal(err)
	}
	if want, _ := f.Data(w); !bytes.Equal(got, want) {
		t.Error("mapped packed bytes differ from the file")
	}
	q := d.Quant
	if q == nil || q.QuantType != "nf4" || q.Blocksize != 64 || q.Dtype != pluginv1.DType_DTYPE_BF16 ||
		!slices.Equal(q.Shape, []int64{96, 64}) || !q.Nested || q.NestedBlocksize != 256 ||
		q.StorageDtype != pluginv1.DType_DTYPE_U8 {
		t.Fatalf("quant info %v", q)
	}
	wq, _ := reg.Weight("m", w)
	if q.NestedOffset != wq.State.NestedOffset || q.NestedOffset == 0 {
		t.Errorf("nested offset %v, state %v", q.NestedOffset, wq.State.NestedOffset)
	}
	for key, ref := range map[string]*pluginv1.TensorRef{
		".absmax": q.Absmax, ".quant_map": q.QuantMap, ".nested_absmax": q.NestedAbsmax, ".nested_quant_map": q.NestedQuantMap,
	} {
		want, _ := f.Data(w + key)
		b, err := mapper.Region(ref.Region, uint64(len(want)), false)
		if err != nil {
			t.Fatalf("%s: %v", key, err)
		}
		if !bytes.Equal(b, want) {
			t.Errorf("%s: mapped bytes differ from the file", key)
		}
	}
	// A plain tensor has no quant info; after Unload the regions are stale.
	pd, err := reg.Descriptor(a, "m", "norm.weight", pluginv1.Access_ACCESS_READ_ONLY)
	if err != nil || pd.Quant != nil || pd.Dtype != pluginv1.DType_DTYPE_F32 {
		t.Fatalf("plain descriptor %v, %v", pd, err)
	}
	tt, _ := reg.Tensor("m", "norm.weight")
	if err := reg.Unload("m"); err != nil {
		t.Fatal(err)
	}
	if err := a.Check(tt.Region); !errors.Is(err, arena.ErrStale) {
		t.Errorf("region of an unloaded model: %v, want ErrStale", err)
	}
	if _, err := reg.Descriptor(a, "m", w, pluginv1.Access_ACCESS_READ_ONLY); !errors.Is(err, ErrNotFound) {
		t.Errorf("descriptor after Unload: %v", err)
	}
}

func TestLayoutDetected(t *testing.T) {
	path := filepath.Join(t.TempDir(), "forge.safetensors")
	writeCheckpoint(t, path, checkpointSpec{rows: 64, cols: 64, weights: 2, blocksize: 64, nested: true, seed: 1, prefix: "model.diffusion_model."})
	a := newTestArena(t, 64<<20, 1<<20)
	reg := New(a, quiet())
	m, err := reg.Load(context.Background(), "flux", path)
	if err != nil {
		t.Fatal(err)
	}
	if m.Layout != "flux-bfl" || m.LayoutPrefix != "model.diffusion_model." || m.Format != FormatBnbNF4Nested {
		t.Errorf("layout %q prefix %q format %q", m.Layout, m.LayoutPrefix, m.Format)
	}
	// A file of unknown layout still loads.
	m2, err := reg.Load(context.Background(), "other", filepath.Join("testdata", "bnb", "plain.safetensors"))
	if err != nil || m2.Layout != "" {
		t.Errorf("unknown layout: %q, %v", m2.Layout, err)
	}
}

// TestUnloadWaitsForReaders checks Unload does not free regions a View is
// reading.
func TestUnloadWaitsForReaders(t *testing.T) {
	a := newTestArena(t, 64<<20, 1<<20)
	reg := New(a, quiet())
	if _, err := reg.Load(context.Background(), "m", filepath.Join("testdata", "bnb", "plain.safetensors")); err != nil {
		t.Fatal(err)
	}
	inView := make(chan struct{})
	release := make(chan struct{})
	viewDone := make(chan error)
	go func() {
		viewDone <- reg.View("m", "norm.weight", func(tt *Tensor, b []byte) error {
			close(inView)
			<-release
			if err := a.Check(tt.Region); err != nil {
				return err
			}
			return nil
		})
	}()
	<-inView
	unloaded := make(chan error)
	go func() { unloaded <- reg.Unload("m") }()
	select {
	case err := <-unloaded:
		t.Fatalf("Unload returned (%v) while a View was reading", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	if err := <-viewDone; err != nil {
		t.Errorf("View saw a freed region: %v", err)
	}
	if err := <-unloaded; err != nil {
		t.Fatal(err)
	}
	if err := reg.View("m", "norm.weight", func(*Tensor, []byte) error { return nil }); !errors.Is(err, ErrNotFound) {
		t.Errorf("View after Unload: %v", err)
	}
}

func TestSaveErrors(t *testing.T) {
	a := newTestArena(t, 64<<20, 1<<20)
	reg := New(a, quiet())
	if err := reg.Save(context.Background(), "nope", filepath.Join(t.TempDir(), "x")); !errors.Is(err, ErrNotFound) {
		t.Errorf("Save of an unknown model: %v", err)
	}
	if _, err := reg.Load(context.Background(), "m", filepath.Join("testdata", "bnb", "plain.safetensors")); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := reg.Save(ctx, "m", filepath.Join(dir, "x.safetensors")); !errors.Is(err, context.Canceled) {
		t.Errorf("Save with a cancelled context: %v", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("cancelled Save left %v", ents)
	}
}

// TestPlainSafetensorsWithEmptyTensors loads a file with an empty and a 0-d
// tensor and metadata: the empty tensor takes no region, Save reproduces it.
func TestPlainSafetensorsWithEmptyTensors(t *testing.T) {
	path := filepath.Join(t.TempDir(), "plain.safetensors")
	err := safetensors.WriteFile(path, map[string]string{"format": "pt"}, []safetensors.WriteTensor{
		{Name: "empty", DType: safetensors.F32, Shape: []int64{0, 4}},
		{Name: "scalar", DType: safetensors.BF16, Shape: []int64{}, Data: []byte{1, 2}},
		{Name: "w", DType: safetensors.I64, Shape: []int64{2}, Data: make([]byte, 16)},
	})
	if err != nil {
		t.Fatal(err)
	}
	a := newTestArena(t, 64<<20, 1<<20)
	reg := New(a, quiet())
	m, err := reg.Load(context.Background(), "p", path)
	if err != nil {
		t.Fatal(err)
	}
	if m.Format != FormatSafetensors || len(m.Weights) != 0 || m.Metadata["format"] != "pt" || m.Bytes != 18 {
		t.Errorf("model %+v", m)
	}
	if st := a.Stats(); st.Regions != 2 {
		t.Errorf("%d regions, want 2 (the empty tensor needs none)", st.Regions)
	}
	if _, err := reg.Descriptor(a, "p", "empty", pluginv1.Access_ACCESS_READ_ONLY); err == nil || !strings.Contains(err.Error(), "no region") {
		t.Errorf("descriptor of an empty tensor: %v", err)
	}
	out := filepath.Join(t.TempDir(), "out.safetensors")
	if err := reg.Save(context.Background(), "p", out); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readFile(t, out), readFile(t, path)) {
		t.Error("Save does not reproduce the file")
	}
}

func TestFormatOf(t *testing.T) {
	w := func(qt nf4.QuantType, nested bool) nf4.Weight {
		return nf4.Weight{State: nf4.QuantState{QuantType: qt, Nested: nested}}
	}
	tests := []struct {
		weights []nf4.Weight
		want    Format
	}{
		{nil, FormatSafetensors},
		{[]nf4.Weight{w(nf4.QuantNF4, true), w(nf4.QuantNF4, true)}, FormatBnbNF4Nested},
		{[]nf4.Weight{w(nf4.QuantNF4, false)}, FormatBnbNF4},
		{[]nf4.Weight{w(nf4.QuantFP4, true)}, FormatBnbFP4Nested},
		{[]nf4.Weight{w(nf4.QuantFP4, false)}, FormatBnbFP4},
		{[]nf4.Weight{w(nf4.QuantNF4, true), w(nf4.QuantNF4, false)}, "bnb-nf4 partly nested"},
		{[]nf4.Weight{w(nf4.QuantNF4, false), w(nf4.QuantFP4, false)}, "bnb-nf4+fp4"},
	}
	for _, tc := range tests {
		if got := formatOf(tc.weights); got != tc.want {
			t.Errorf("formatOf(%v) = %q, want %q", tc.weights, got, tc.want)
		}
	}
}

// mapBytes is a 256-entry float32 map as safetensors stores it.
func mapBytes(m [256]float32) []byte {
	b := make([]byte, 4*len(m))
	for i, v := range m {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return b
}
