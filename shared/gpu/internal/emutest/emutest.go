// Package emutest owns the test harness of the kernel emulator: it builds
// kernels/emu (kernels.cu compiled as host C++, a fiber per CUDA thread,
// barriers and warp shuffles at which fibers yield) once per test emuBin, and runs
// launches over an Image, emulated device memory whose pointers are
// offsets into it. shared/gpu's tests compare the kernels with the CPU
// references through it, and shared/gpu/gpusim's compare the simulator
// with the kernels. It does not import shared/gpu (whose in-package tests
// use it), so launches come as Launch values.
package emutest

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// Arg is one kernel argument: Kind 'p' (a pointer, an offset into the
// image), 'i' (an integer) or 'd' (float64 bits), as gpu.Arg.
type Arg struct {
	Kind byte
	V    uint64
}

// Launch is one kernel launch, as gpu.Call.
type Launch struct {
	Kernel              string
	Grid, Block, Shared int
	Args                []Arg
}

var (
	once   sync.Once
	emuBin string
	errBin error
)

// Emulator returns the emulator emuBin, building it on first use; it skips
// the test when no g++ is installed.
func Emulator(t testing.TB) string {
	t.Helper()
	cxx, err := exec.LookPath("g++")
	if err != nil {
		t.Skip("g++ not found: the kernel emulator needs a C++20 compiler")
	}
	once.Do(func() { emuBin, errBin = build(cxx) })
	if errBin != nil {
		t.Fatal(errBin)
	}
	return emuBin
}

// flags are the emulator's compiler flags: no FMA contraction, so the
// host compiler rounds every product and sum as the kernels' __fmul_rn and
// __fadd_rn do (the kernels' one fused operation, the LoRA delta's
// __fmaf_rn, is emu.h's exact float32 FMA).
var flags = []string{"-std=c++20", "-O1", "-pthread", "-ffp-contract=off"}

// build compiles kernels/emu/main.cc (which includes kernels.cu), or reuses
// the binary cached under the user cache directory for the same sources
// and flags.
func build(cxx string) (string, error) {
	_, self, _, ok := runtime.Caller(0)
	if !ok {
		return "", fmt.Errorf("build the kernel emulator: cannot locate the harness source")
	}
	dir := filepath.Join(filepath.Dir(self), "..", "..", "kernels")
	src := filepath.Join(dir, "emu", "main.cc")
	h := sha256.New()
	fmt.Fprintln(h, cxx, strings.Join(flags, " "))
	for _, f := range []string{src, filepath.Join(dir, "emu", "emu.h"), filepath.Join(dir, "emu", "kernels_table.h"), filepath.Join(dir, "emu", "emu_run.h"), filepath.Join(dir, "kernels.cu")} {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", fmt.Errorf("build the kernel emulator: %w", err)
		}
		fmt.Fprintf(h, "%s %d\n", filepath.Base(f), len(b))
		h.Write(b)
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	out := filepath.Join(cache, "arenahost", "nf4emu-"+hex.EncodeToString(h.Sum(nil))[:20], "emu")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", fmt.Errorf("build the kernel emulator: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(out), "emu-*")
	if err != nil {
		return "", fmt.Errorf("build the kernel emulator: %w", err)
	}
	tmp.Close()
	defer os.Remove(tmp.Name())
	if b, err := exec.Command(cxx, append(flags, "-o", tmp.Name(), src)...).CombinedOutput(); err != nil {
		return "", fmt.Errorf("build the kernel emulator from %s: %v\n%s", src, err, b)
	}
	// Rename is atomic: a concurrent test binary sees the whole file or none.
	if err := os.Rename(tmp.Name(), out); err != nil {
		return "", fmt.Errorf("build the kernel emulator: %w", err)
	}
	return out, nil
}

// Image is emulated device memory: pointers are offsets into Mem, and no
// pointer is 0.
type Image struct {
	Mem      []byte
	launches []Launch
}

// NewImage returns an empty image.
func NewImage() *Image { return &Image{Mem: make([]byte, 256)} }

// Alloc reserves n zero bytes (256-aligned) and returns their offset.
func (m *Image) Alloc(n int) uint64 {
	p := len(m.Mem)
	m.Mem = append(m.Mem, make([]byte, (n+255)&^255)...)
	return uint64(p)
}

// Put copies b into a new allocation.
func (m *Image) Put(b []byte) uint64 {
	p := m.Alloc(len(b))
	copy(m.Mem[p:], b)
	return p
}

// Get returns the n bytes at p.
func (m *Image) Get(p uint64, n int) []byte { return m.Mem[p : int(p)+n] }

// Add queues a launch.
func (m *Image) Add(l Launch) { m.launches = append(m.launches, l) }

// Run executes the queued launches in order in the emulator and reads the
// memory back; the queue is emptied either way.
func (m *Image) Run(t testing.TB) error {
	t.Helper()
	bin := Emulator(t)
	dir := t.TempDir()
	img, ls := filepath.Join(dir, "image"), filepath.Join(dir, "launches")
	var b strings.Builder
	for _, c := range m.launches {
		fmt.Fprintf(&b, "%s %d %d %d", c.Kernel, c.Grid, c.Block, c.Shared)
		for _, a := range c.Args {
			switch a.Kind {
			case 'p', 'i':
				fmt.Fprintf(&b, " %c%d", a.Kind, int64(a.V))
			case 'd':
				fmt.Fprintf(&b, " d%s", fmt.Sprint(math.Float64frombits(a.V)))
			}
		}
		b.WriteByte('\n')
	}
	m.launches = nil
	if err := os.WriteFile(img, m.Mem, 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(ls, []byte(b.String()), 0o600); err != nil {
		return err
	}
	if out, err := exec.Command(bin, img, ls).CombinedOutput(); err != nil {
		return fmt.Errorf("emulator: %v\n%s\nlaunches:\n%s", err, out, b.String())
	}
	got, err := os.ReadFile(img)
	if err != nil || len(got) != len(m.Mem) {
		return fmt.Errorf("emulator image: %d bytes, %v", len(got), err)
	}
	m.Mem = got
	return nil
}

// F32LE encodes float32s little-endian, as device memory holds them.
func F32LE(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

// U16LE encodes uint16s (bf16/f16 bits) little-endian.
func U16LE(v []uint16) []byte {
	b := make([]byte, 2*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint16(b[2*i:], x)
	}
	return b
}

// Weights returns n weight-like values in blocks of bs: each block of its
// own random scale, every fifth block all zeros (the kernels' zero-absmax
// path).
func Weights(rng *rand.Rand, n, bs int) []float32 {
	v := make([]float32, n)
	for b := 0; b*bs < n; b++ {
		scale := float32(math.Exp(rng.NormFloat64()))
		if b%5 == 2 {
			continue
		}
		for i := b * bs; i < min(n, (b+1)*bs); i++ {
			v[i] = float32(rng.NormFloat64()) * scale * 0.02
		}
	}
	return v
}
