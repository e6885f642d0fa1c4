package registry

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/shared/nf4"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// testArena is a CPU arena in /dev/shm-style mode under a temporary
// directory, so tests can see its segment files.
type testArena struct {
	*arena.Arena
	dir string // the backend's own directory holding the segment files
}

func newTestArena(tb testing.TB, capacity, segment uint64) *testArena {
	tb.Helper()
	b, err := arena.NewCPUBackend(arena.CPUConfig{Mode: arena.CPUShmDir, Dir: tb.TempDir(), Logger: quiet()})
	if err != nil {
		tb.Fatal(err)
	}
	a, err := arena.New(context.Background(), b, arena.Config{Capacity: capacity, SegmentSize: segment, Logger: quiet()})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { a.Close() })
	return &testArena{Arena: a, dir: b.Dir()}
}

// files lists the segment files of the arena.
func (a *testArena) files(tb testing.TB) []string {
	tb.Helper()
	ents, err := os.ReadDir(a.dir)
	if err != nil {
		tb.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// checkpointSpec describes a generated bnb-layout checkpoint.
type checkpointSpec struct {
	rows, cols int  // logical shape of each quantized weight
	weights    int  // how many 4-bit weights
	blocksize  int  // 4-bit blocksize
	nested     bool // compress_statistics
	seed       uint64
	prefix     string // key prefix ("model.diffusion_model.")
}

// writeCheckpoint writes a Flux-BFL-named bnb checkpoint: real NF4 encodings
// (shared/nf4) of one random bf16-valued weight, stored under each layer
// name with a bf16 bias, plus a norm scale. Returns the bytes written.
func writeCheckpoint(tb testing.TB, path string, s checkpointSpec) int64 {
	tb.Helper()
	r := rand.New(rand.NewPCG(s.seed, 7))
	src := make([]float32, s.rows*s.cols)
	for i := range src {
		// bf16-representable values: keep the top 16 bits of a normal sample.
		f := float32(r.NormFloat64() * 0.02)
		src[i] = math.Float32frombits(math.Float32bits(f) &^ 0xffff)
	}
	enc, err := nf4.Encode(src, []int64{int64(s.rows), int64(s.cols)}, "bfloat16", s.blocksize, s.nested)
	if err != nil {
		tb.Fatal(err)
	}
	bias := make([]byte, 2*s.rows)
	for i := range bias {
		bias[i] = byte(r.Uint32())
	}
	var infos []safetensors.TensorInfo
	data := map[string][]byte{}
	add := func(name string, d safetensors.DType, shape []int64, b []byte) {
		infos = append(infos, safetensors.TensorInfo{Name: name, DType: d, Shape: shape})
		data[name] = b
	}
	for i := range s.weights {
		layer := fmt.Sprintf("%sdouble_blocks.%d.img_attn.qkv", s.prefix, i)
		if i%2 == 1 {
			layer = fmt.Sprintf("%ssingle_blocks.%d.linear1", s.prefix, i)
		}
		for _, e := range enc.Entries(layer + ".weight") {
			add(e.Key, safetensors.DType(e.DType), e.Shape, e.Data)
		}
		add(layer+".bias", safetensors.BF16, []int64{int64(s.rows)}, bias)
	}
	norm := make([]byte, 4*128)
	for i := 0; i < 128; i++ {
		binary.LittleEndian.PutUint32(norm[4*i:], math.Float32bits(1))
	}
	add(s.prefix+"double_blocks.0.img_attn.norm.key_norm.scale", safetensors.F32, []int64{128}, norm)

	fw, err := safetensors.Create(path, nil, infos)
	if err != nil {
		tb.Fatal(err)
	}
	for _, t := range fw.Layout() {
		if err := fw.WriteTensor(t.Name, data[t.Name]); err != nil {
			tb.Fatal(err)
		}
	}
	if err := fw.Commit(); err != nil {
		tb.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		tb.Fatal(err)
	}
	return st.Size()
}

// rewrite copies the safetensors file src to dst, letting edit change,
// drop (return false) or keep each tensor. The header and layout are
// recomputed, so the result is a valid safetensors file.
func rewrite(tb testing.TB, src, dst string, edit func(t *safetensors.WriteTensor) bool) {
	tb.Helper()
	f, err := safetensors.Open(src)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	var out []safetensors.WriteTensor
	for _, t := range f.Tensors {
		d, err := f.Data(t.Name)
		if err != nil {
			tb.Fatal(err)
		}
		w := safetensors.WriteTensor{Name: t.Name, DType: t.DType, Shape: slices.Clone(t.Shape), Data: slices.Clone(d)}
		if edit(&w) {
			out = append(out, w)
		}
	}
	if err := safetensors.WriteFile(dst, f.Metadata, out); err != nil {
		tb.Fatal(err)
	}
}
