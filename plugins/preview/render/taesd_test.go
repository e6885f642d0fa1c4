package render

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/shared/half"
)

func readF32File(t *testing.T, path string) []float32 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return toFloat32(b, Float32)
}

// The decoder, the packing rule and the patchify rule against torch: a copy
// of madebyollin/taesd's Decoder with random weights saved under the real
// key names, and diffusers' own _pack_latents / _patchify_latents.
func TestTorchOracle(t *testing.T) {
	python := testenv.TorchPython(t)
	dir := t.TempDir()
	testenv.RunPython(t, python, "testdata/torch_oracle.py", dir)
	var sz struct {
		C    int `json:"C"`
		H    int `json:"H"`
		W    int `json:"W"`
		h, w int
	}
	b, err := os.ReadFile(filepath.Join(dir, "shapes.json"))
	if err != nil {
		t.Fatal(err)
	}
	var grid struct {
		H int `json:"grid_h"`
		W int `json:"grid_w"`
	}
	if err := json.Unmarshal(b, &sz); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &grid); err != nil {
		t.Fatal(err)
	}
	sz.h, sz.w = grid.H, grid.W

	latent := readF32File(t, filepath.Join(dir, "latent.bin"))
	want := readF32File(t, filepath.Join(dir, "decoded.bin"))
	for _, file := range []string{"taesd_bare.safetensors", "taesd_diffusers.safetensors"} {
		t.Run(file, func(t *testing.T) {
			d, err := LoadDecoder(filepath.Join(dir, file))
			if err != nil {
				t.Fatal(err)
			}
			if d.LatentChannels() != sz.C || d.Name() != file {
				t.Fatalf("decoder %s: %d channels, want %d", d.Name(), d.LatentChannels(), sz.C)
			}
			got, err := d.Decode(Planes{C: sz.C, H: sz.H, W: sz.W, Data: latent})
			if err != nil {
				t.Fatal(err)
			}
			if got.C != 3 || got.H != 8*sz.H || got.W != 8*sz.W || len(got.Data) != len(want) {
				t.Fatalf("decoded %d×%d×%d, want 3×%d×%d", got.C, got.H, got.W, 8*sz.H, 8*sz.W)
			}
			var maxDiff float64
			for i, v := range want {
				maxDiff = max(maxDiff, math.Abs(float64(got.Data[i]-v)))
			}
			t.Logf("max |go − torch| = %.3g", maxDiff)
			if maxDiff > 1e-4 {
				t.Fatalf("max |go − torch| = %g, want ≤ 1e-4", maxDiff)
			}
			// The whole Render path: no shrink (the latent is within the
			// decoder side), nearest at exactly the decoder's size.
			l := Latent{Data: f32Bytes(latent), DType: Float32, Shape: []int{1, sz.C, sz.H, sz.W}}
			img, err := Render(l, Options{Family: FamilyFlux, Decoder: d, DecoderLatentSide: 8, MaxSide: 1000})
			if err != nil {
				t.Fatal(err)
			}
			hw := got.H * got.W
			for y := range got.H {
				for x := range got.W {
					px := pixel(img, x, y)
					for c := range 3 {
						v := math.Max(0, math.Min(1, float64(want[c*hw+y*got.W+x])))
						if math.Abs(float64(px[c])-v*255) > 1 {
							t.Fatalf("render (%d,%d) channel %d: %d, torch %.2f", x, y, c, px[c], v*255)
						}
					}
				}
			}
		})
	}

	t.Run("flux _pack_latents", func(t *testing.T) {
		src := readF32File(t, filepath.Join(dir, "unpacked.bin"))
		packed := readF32File(t, filepath.Join(dir, "packed.bin"))
		l := Latent{Data: f32Bytes(packed), DType: Float32, Shape: []int{1, sz.h * sz.w, 64}, Layout: TokenMajor, GridH: sz.h, GridW: sz.w}
		p, fam, err := Unpack(l, "")
		if err != nil {
			t.Fatal(err)
		}
		if fam != FamilyFlux || p.C != 16 || p.H != 2*sz.h || p.W != 2*sz.w || !slices.Equal(p.Data, src) {
			t.Fatalf("unpacking diffusers' packed latent does not give back the latent (%s %d×%d×%d)", fam, p.C, p.H, p.W)
		}
	})
	t.Run("flux2 _patchify_latents", func(t *testing.T) {
		src := readF32File(t, filepath.Join(dir, "unpacked32.bin"))
		patched := readF32File(t, filepath.Join(dir, "patched.bin"))
		l := Latent{Data: f32Bytes(patched), DType: Float32, Shape: []int{1, 128, sz.h, sz.w}}
		p, fam, err := Unpack(l, "")
		if err != nil {
			t.Fatal(err)
		}
		if fam != FamilyFlux2 || p.C != 32 || !slices.Equal(p.Data, src) {
			t.Fatalf("unpacking diffusers' patchified latent does not give back the latent (%s %d×%d×%d)", fam, p.C, p.H, p.W)
		}
	})
}

// stFile writes a safetensors file: tensors in name order, F32 or F16.
func stFile(tensors map[string]stTensor, dtype string) []byte {
	names := make([]string, 0, len(tensors))
	for n := range tensors {
		names = append(names, n)
	}
	sort.Strings(names)
	hdr := map[string]any{"__metadata__": map[string]string{"format": "pt"}}
	var data []byte
	for _, n := range names {
		t := tensors[n]
		start := len(data)
		for _, v := range t.data {
			if dtype == "F16" {
				data = binary.LittleEndian.AppendUint16(data, half.F32ToF16(v))
			} else {
				data = binary.LittleEndian.AppendUint32(data, math.Float32bits(v))
			}
		}
		hdr[n] = map[string]any{"dtype": dtype, "shape": t.shape, "data_offsets": []int{start, len(data)}}
	}
	h, _ := json.Marshal(hdr)
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(h)))
	return append(append(out, h...), data...)
}

// rawST is a safetensors file with a literal header and n zero data bytes.
func rawST(header string, n int) []byte {
	b := binary.LittleEndian.AppendUint64(nil, uint64(len(header)))
	return append(append(b, header...), make([]byte, n)...)
}

// randomDecoder returns a random decoder state dict under TAESD's keys.
func randomDecoder(r *rand.Rand, channels int) map[string]stTensor {
	m := map[string]stTensor{}
	add := func(name string, shape ...int) {
		n := 1
		for _, d := range shape {
			n *= d
		}
		d := make([]float32, n)
		for i := range d {
			d[i] = float32(r.NormFloat64() * 0.05)
		}
		m[name] = stTensor{shape: shape, data: d}
	}
	add("1.weight", 64, channels, 3, 3)
	add("1.bias", 64)
	for _, stage := range taesdStages {
		for _, idx := range stage {
			for _, c := range []int{0, 2, 4} {
				add(fmt.Sprintf("%d.conv.%d.weight", idx, c), 64, 64, 3, 3)
				add(fmt.Sprintf("%d.conv.%d.bias", idx, c), 64)
			}
		}
	}
	for _, idx := range taesdUpConvs {
		add(fmt.Sprintf("%d.weight", idx), 64, 64, 3, 3)
	}
	add("19.weight", 3, 64, 3, 3)
	add("19.bias", 3)
	return m
}

func TestParseDecoderRejectsBadFiles(t *testing.T) {
	r := rand.New(rand.NewPCG(31, 32))
	good := randomDecoder(r, 4)
	if d, err := ParseDecoder("good", stFile(good, "F32")); err != nil || d.LatentChannels() != 4 {
		t.Fatalf("good file: %v", err)
	}
	edit := func(f func(m map[string]stTensor)) []byte {
		m := map[string]stTensor{}
		for k, v := range good {
			m[k] = v
		}
		f(m)
		return stFile(m, "F32")
	}
	goodBytes := stFile(good, "F32")
	cases := []struct {
		name string
		b    []byte
		want string
	}{
		{"missing block conv", edit(func(m map[string]stTensor) { delete(m, "9.conv.2.bias") }), "tensor 9.conv.2.bias: not found"},
		{"wrong shape", edit(func(m map[string]stTensor) {
			m["12.weight"] = stTensor{shape: []int{64, 64, 1, 1}, data: make([]float32, 4096)}
		}), "tensor 12.weight: shape [64 64 1 1], want [64 64 3 3]"},
		{"taef2 pool", edit(func(m map[string]stTensor) {
			m["3.pool.0.weight"] = stTensor{shape: []int{256, 64, 1, 1}, data: make([]float32, 256*64)}
		}), "TAEF2-style GroupNorm pool"},
		{"first conv shape", edit(func(m map[string]stTensor) {
			m["1.weight"] = stTensor{shape: []int{32, 4, 3, 3}, data: make([]float32, 32*36)}
		}), "tensor 1.weight: shape [32 4 3 3], want [64 C 3 3]"},
		{"not a decoder", stFile(map[string]stTensor{"encoder.0.weight": {shape: []int{1}, data: []float32{1}}}, "F32"), "no TAESD decoder keys; file has encoder.0.weight"},
		{"truncated", goodBytes[:len(goodBytes)-10], "data_offsets"},
		{"short", goodBytes[:5], "header length: file has 5 bytes"},
		{"header too long", append(binary.LittleEndian.AppendUint64(nil, 1<<40), '{'), "header length"},
		{"bad json", append(binary.LittleEndian.AppendUint64(nil, 3), "{x}"...), "header:"},
		{"int tensor", rawST(`{"1.weight":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}`, 8), `tensor 1.weight: dtype "I64" unsupported`},
		{"offsets past data", rawST(`{"1.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}`, 8), "data_offsets [0 16] outside the 8 data bytes"},
		{"size mismatch", rawST(`{"1.weight":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}`, 8), "needs 12 bytes, data_offsets give 8"},
		{"negative dim", rawST(`{"1.weight":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}`, 8), "shape [-2] invalid"},
	}
	for _, c := range cases {
		if _, err := ParseDecoder("x", c.b); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err %v, want %q", c.name, err, c.want)
		}
	}
	if _, err := LoadDecoder(filepath.Join(t.TempDir(), "none.safetensors")); err == nil || !strings.Contains(err.Error(), "load decoder") {
		t.Errorf("missing file: %v", err)
	}
}

func TestDecoderInputChecks(t *testing.T) {
	r := rand.New(rand.NewPCG(33, 34))
	d, err := ParseDecoder("sd", stFile(randomDecoder(r, 4), "F32"))
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		p    Planes
		want string
	}{
		{Planes{C: 16, H: 2, W: 2, Data: make([]float32, 64)}, "latent has 16 channels, decoder takes 4"},
		{Planes{C: 4, H: 200, W: 2, Data: make([]float32, 1600)}, "outside 1..128"},
		{Planes{C: 4, H: 2, W: 2, Data: make([]float32, 3)}, "holds 3 values"},
	}
	for _, c := range cases {
		if _, err := d.Decode(c.p); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%d×%d×%d: err %v, want %q", c.p.C, c.p.H, c.p.W, err, c.want)
		}
	}
	l := oneHot(16, 2, 2, 0, 1)
	if _, err := Render(l, Options{Family: FamilyFlux, Decoder: d}); err == nil || !strings.Contains(err.Error(), "decoder takes 4") {
		t.Errorf("flux latent through an sd decoder: %v", err)
	}
	if _, err := Render(oneHot(4, 2, 2, 0, 1), Options{Family: FamilySD15, Decoder: d, DecoderLatentSide: 500}); err == nil || !strings.Contains(err.Error(), "options decoder latent side: 500") {
		t.Errorf("decoder side 500: %v", err)
	}
	// A shrunk latent renders at the output size.
	img, err := Render(oneHot(4, 40, 20, 1, 1), Options{Family: FamilySD15, Decoder: d, DecoderLatentSide: 10, Filter: Bilinear})
	if err != nil {
		t.Fatal(err)
	}
	if img.Rect.Dx() != 160 || img.Rect.Dy() != 320 {
		t.Fatalf("size %v, want 160×320", img.Rect)
	}
}

func TestShrinkAreaAverage(t *testing.T) {
	p := Planes{C: 1, H: 2, W: 4, Data: []float32{1, 3, 5, 7, 9, 11, 13, 15}}
	got := shrink(p, 2)
	if got.H != 1 || got.W != 2 || !slices.Equal(got.Data, []float32{6, 10}) {
		t.Fatalf("2×4 → %d×%d %v, want 1×2 [6 10]", got.H, got.W, got.Data)
	}
	// 3 → 2: windows [0,2) and [1,3).
	p = Planes{C: 1, H: 1, W: 3, Data: []float32{2, 4, 8}}
	got = shrink(p, 2)
	if got.W != 2 || !slices.Equal(got.Data, []float32{3, 6}) {
		t.Fatalf("1×3 → %v, want [3 6]", got.Data)
	}
	if got := shrink(p, 3); got.W != 3 {
		t.Fatalf("no shrink needed: %d", got.W)
	}
}
