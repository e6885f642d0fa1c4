package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/host/inspect"
	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// The Flux family, FLUX.2, SDXL's UNet and SD3.5 in every diffusers
// container, against the real stack:
// testdata/flux_family.py builds each model from its diffusers class (tiny
// config, seeded weights), quantizes it with BitsAndBytesConfig, writes it
// with save_pretrained as one file, as shards and inside a pipeline folder,
// makes a PEFT LoRA on every Linear and merges it with PEFT's merge() on
// the bnb model. arenahost inspects each folder, merges the same LoRA
// into a sharded folder, and the codes must agree with PEFT's on ≥ 99.9 %;
// diffusers loads the merged folder as it is, every Linear4bit holding the
// bytes arenahost wrote.
func TestFluxFamilyFolders(t *testing.T) {
	py := testenv.TorchPython(t)
	dir := t.TempDir()
	testenv.RunPython(t, py, filepath.Join("testdata", "flux_family.py"), "make", dir)
	type load struct {
		dir, class string
		weights    int
	}
	var loads []load
	for _, fam := range []struct {
		name, layout, variant, class string
	}{
		{"flux-dev", "flux-diffusers", "flux.1-dev (", "FluxTransformer2DModel"},
		{"flux-schnell-pruned", "flux-diffusers", "flux.1-schnell (1 double + 2 single blocks", "FluxTransformer2DModel"},
		{"flux-fill", "flux-diffusers", "flux.1-fill-dev (", "FluxTransformer2DModel"},
		{"chroma", "flux-diffusers", "chroma (", "ChromaTransformer2DModel"},
		{"flux2", "flux2", "", "Flux2Transformer2DModel"},
		{"sdxl", "sdxl", "", "UNet2DConditionModel"},
		{"sd35", "sd3", "", "SD3Transformer2DModel"},
	} {
		for _, c := range []struct {
			dir       string
			container safetensors.Container
			sharded   bool
		}{
			{"nf4", safetensors.ContainerModelFolder, false},
			{"nf4-sharded", safetensors.ContainerModelFolder, true},
			{"pipeline", safetensors.ContainerPipelineFolder, true},
		} {
			t.Run(fam.name+"/"+c.dir, func(t *testing.T) {
				model := filepath.Join(dir, fam.name, c.dir)
				r, err := inspect.File(model)
				if err != nil {
					t.Fatal(err)
				}
				m := r.Model
				if !strings.HasPrefix(m.Variant, fam.variant) || (fam.variant == "") != (m.Variant == "") || m.Container != string(c.container) ||
					(m.Shards > 1) != c.sharded || m.Class != fam.class || m.Layout != fam.layout || len(m.Warnings) != 0 {
					t.Errorf("inspect: variant %q container %s shards %d class %s layout %s warnings %v", m.Variant, m.Container, m.Shards, m.Class, m.Layout, m.Warnings)
				}
				out := filepath.Join(dir, fam.name, "merged-"+c.dir) // outlives the subtest: loaded below
				loras := map[string]string{"peft": filepath.Join(dir, fam.name, "lora.safetensors")}
				if fam.name == "sdxl" { // the same LoRA with kohya's LDM keys (lora_unet_input_blocks_…)
					loras["kohya"] = kohyaSDXL(t, loras["peft"], filepath.Join(t.TempDir(), "kohya.safetensors"))
				}
				if fam.name == "sd35" { // the same LoRA with kohya's SAI keys (lora_unet_joint_blocks_…, fused qkv)
					loras["kohya"] = kohyaSD3(t, loras["peft"], filepath.Join(t.TempDir(), "kohya.safetensors"))
				}
				for format, lf := range loras {
					o := out
					if format != "peft" {
						o = filepath.Join(t.TempDir(), "merged-"+format)
					}
					rep, err := Merge(context.Background(), MergeOptions{Model: model, Out: o, As: "nf4", Strict: true, MaxShardSize: 150_000,
						LoRAs: []MergeLoRA{{Path: lf, Strength: 1}}})
					if err != nil {
						t.Fatal(err)
					}
					if n := len(rep.Report.Layers); n != m.Weights {
						t.Errorf("%s: merged %d layers of %d 4-bit weights", format, n, m.Weights)
					}
					agree, total := compareCodes(t, o, filepath.Join(dir, fam.name, "peft-merged.safetensors"))
					frac := float64(agree) / float64(total)
					t.Logf("%s %s, %s keys: fused codes vs PEFT merge on the bnb model: %d/%d agree (%.5f%%)", fam.name, c.dir, format, agree, total, 100*frac)
					if frac < 0.999 {
						t.Errorf("%s: only %.4f%% of codes agree with PEFT's merge", format, 100*frac)
					}
				}
				if c.dir == "nf4" { // diffusers' loading is checked once per family, all in one run
					loads = append(loads, load{out, fam.class, m.Weights})
				}
			})
		}
	}
	// A folder --out that exists with files in it is refused, untouched.
	t.Run("out-not-empty", func(t *testing.T) {
		out := filepath.Join(dir, "flux-dev", "merged-nf4") // written above
		before, _ := os.ReadDir(out)
		_, err := Merge(context.Background(), MergeOptions{Model: filepath.Join(dir, "flux-dev", "nf4"), Out: out, As: "nf4",
			LoRAs: []MergeLoRA{{Path: filepath.Join(dir, "flux-dev", "lora.safetensors"), Strength: 1}}})
		after, _ := os.ReadDir(out)
		if err == nil || !strings.Contains(err.Error(), "exists and is not an empty folder") || len(before) == 0 || len(after) != len(before) {
			t.Errorf("err %v; %d entries before, %d after", err, len(before), len(after))
		}
	})
	// Chroma and FLUX.1-dev in BFL layout, converted from the same weights.
	t.Run("chroma/bfl", func(t *testing.T) { checkBFL(t, dir, "chroma", "chroma (") })
	t.Run("flux-dev/bfl", func(t *testing.T) { checkBFL(t, dir, "flux-dev", "flux.1-dev (") })
	args := []string{filepath.Join("testdata", "flux_family.py"), "load"}
	for _, l := range loads {
		args = append(args, l.dir+":"+l.class)
	}
	text := testenv.RunPython(t, py, args...)
	got := map[string]struct {
		Class      string `json:"class"`
		Linear4bit int    `json:"linear4bit"`
		CodesEqual int    `json:"codes_equal"`
	}{}
	for _, line := range strings.Split(string(text), "\n") {
		var g struct {
			Dir        string `json:"dir"`
			Class      string `json:"class"`
			Linear4bit int    `json:"linear4bit"`
			CodesEqual int    `json:"codes_equal"`
		}
		if json.Unmarshal([]byte(line), &g) == nil && g.Dir != "" {
			got[g.Dir] = struct {
				Class      string `json:"class"`
				Linear4bit int    `json:"linear4bit"`
				CodesEqual int    `json:"codes_equal"`
			}{g.Class, g.Linear4bit, g.CodesEqual}
		}
	}
	for _, l := range loads {
		g := got[l.dir]
		if g.Class != l.class || g.Linear4bit != l.weights || g.CodesEqual != l.weights {
			t.Errorf("diffusers loaded %s as %+v; want %s with %d Linear4bit holding arenahost's codes\n%s", l.dir, g, l.class, l.weights, text)
		}
	}
}

// kohyaSDXL rewrites a diffusers PEFT SDXL UNet LoRA (unet.down_blocks…
// .lora_A.weight, lora_alpha/r from its adapter metadata) with kohya's
// keys: lora_unet_ + the LDM module path flattened, lora_down/lora_up and
// an alpha per module.
func kohyaSDXL(t *testing.T, peft, out string) string {
	t.Helper()
	f, err := safetensors.Open(peft)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// diffusers writes the UNet's PEFT config with "unet."-prefixed keys.
	var meta map[string]any
	if err := json.Unmarshal([]byte(f.Metadata["lora_adapter_metadata"]), &meta); err != nil {
		t.Fatalf("adapter metadata: %v", err)
	}
	alpha, ok := meta["unet.lora_alpha"].(float64)
	if !ok {
		t.Fatalf("adapter metadata without unet.lora_alpha: %v", meta)
	}
	var ts []safetensors.WriteTensor
	for _, ti := range f.Tensors {
		mod, suffix, ok := strings.Cut(strings.TrimPrefix(ti.Name, "unet."), ".lora_")
		if !ok {
			t.Fatalf("key %s", ti.Name)
		}
		ldm, ok := layout.UNetToLDM(layout.SDXL, mod)
		if !ok {
			t.Fatalf("no LDM name for %s", mod)
		}
		key := layout.KohyaName("lora_unet_", ldm)
		b, _ := f.Data(ti.Name)
		switch suffix {
		case "A.weight":
			ts = append(ts, safetensors.WriteTensor{Name: key + ".lora_down.weight", DType: ti.DType, Shape: ti.Shape, Data: b},
				safetensors.WriteTensor{Name: key + ".alpha", DType: safetensors.F32, Shape: []int64{}, Data: f32le([]float32{float32(alpha)})})
		case "B.weight":
			ts = append(ts, safetensors.WriteTensor{Name: key + ".lora_up.weight", DType: ti.DType, Shape: ti.Shape, Data: b})
		default:
			t.Fatalf("key %s", ti.Name)
		}
	}
	if err := safetensors.WriteFile(out, nil, ts); err != nil {
		t.Fatal(err)
	}
	return out
}

// kohyaSD3 rewrites a diffusers PEFT SD3 LoRA with kohya's SAI keys: one
// module per SAI layer, the parts of a fused layer (to_q/to_k/to_v →
// attn.qkv) stacked in A and block-diagonal in B, the swapped adaLN halves
// moved by rows, alpha = (lora_alpha/r)·rank so the product is unchanged.
func kohyaSD3(t *testing.T, peft, out string) string {
	t.Helper()
	f, err := safetensors.Open(peft)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var meta map[string]any
	if err := json.Unmarshal([]byte(f.Metadata["lora_adapter_metadata"]), &meta); err != nil {
		t.Fatalf("adapter metadata: %v", err)
	}
	alpha, _ := meta["transformer.lora_alpha"].(float64)
	r, _ := meta["transformer.r"].(float64)
	if alpha == 0 || r == 0 {
		alpha, _ = meta["lora_alpha"].(float64)
		r, _ = meta["r"].(float64)
	}
	if alpha == 0 || r == 0 {
		t.Fatalf("adapter metadata without lora_alpha/r: %v", meta)
	}
	scale := alpha / r
	type ab struct {
		a, b     []float32
		rank, in int
	}
	mods := map[string]*ab{}
	for _, ti := range f.Tensors {
		mod, suffix, _ := strings.Cut(strings.TrimPrefix(ti.Name, "transformer."), ".lora_")
		b, _ := f.Data(ti.Name)
		v := make([]float32, len(b)/4)
		half.DecodeF32(v, b)
		if mods[mod] == nil {
			mods[mod] = &ab{}
		}
		if suffix == "A.weight" {
			mods[mod].a, mods[mod].rank, mods[mod].in = v, int(ti.Shape[0]), int(ti.Shape[1])
		} else {
			mods[mod].b = v
		}
	}
	blocks := 0
	for m := range mods {
		if rest, ok := strings.CutPrefix(m, "transformer_blocks."); ok {
			var i int
			fmt.Sscanf(rest, "%d", &i)
			blocks = max(blocks, i+1)
		}
	}
	maps := layout.SD3RowMaps(blocks, func(d string) (int, bool) {
		m, ok := mods[d]
		if !ok {
			return 0, false
		}
		return len(m.b) / m.rank, true
	})
	bySAI := map[string][]layout.RowMap{}
	var order []string
	covered := map[string]bool{}
	for _, m := range maps {
		if bySAI[m.BFL] == nil {
			order = append(order, m.BFL)
		}
		bySAI[m.BFL] = append(bySAI[m.BFL], m)
		covered[m.Diffusers] = true
	}
	for m := range mods {
		if !covered[m] {
			t.Fatalf("PEFT module %s has no SAI name in the row maps", m)
		}
	}
	var ts []safetensors.WriteTensor
	for _, sai := range order {
		parts := bySAI[sai]
		r0, in := mods[parts[0].Diffusers].rank, mods[parts[0].Diffusers].in
		R, rows := r0*len(parts), 0
		for _, p := range parts {
			rows = max(rows, p.BFLRow+p.Rows)
		}
		down, up := make([]float32, 0, R*in), make([]float32, rows*R)
		for k, p := range parts {
			m := mods[p.Diffusers]
			down = append(down, m.a...)
			for i := 0; i < p.Rows; i++ {
				for j := 0; j < r0; j++ {
					up[(p.BFLRow+i)*R+k*r0+j] = m.b[(p.DiffRow+i)*r0+j]
				}
			}
		}
		key := layout.KohyaName("lora_unet_", sai)
		ts = append(ts,
			safetensors.WriteTensor{Name: key + ".lora_down.weight", DType: safetensors.F32, Shape: []int64{int64(R), int64(in)}, Data: f32le(down)},
			safetensors.WriteTensor{Name: key + ".lora_up.weight", DType: safetensors.F32, Shape: []int64{int64(rows), int64(R)}, Data: f32le(up)},
			safetensors.WriteTensor{Name: key + ".alpha", DType: safetensors.F32, Shape: []int64{}, Data: f32le([]float32{float32(scale * float64(R))})})
	}
	if err := safetensors.WriteFile(out, nil, ts); err != nil {
		t.Fatal(err)
	}
	return out
}

// compareCodes counts the 4-bit codes of want's packed weights that the
// model at got holds too.
func compareCodes(t *testing.T, got, want string) (agree, total int) {
	t.Helper()
	g, err := safetensors.OpenSet(got)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	w, err := safetensors.Open(want)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for _, ti := range w.Tensors {
		a, err := w.Data(ti.Name)
		if err != nil {
			t.Fatal(err)
		}
		b, err := g.Data(ti.Name)
		if err != nil {
			t.Fatalf("merged model lacks %s: %v", ti.Name, err)
		}
		if len(a) != len(b) {
			t.Fatalf("%s: %d bytes, PEFT's %d", ti.Name, len(b), len(a))
		}
		for i := range a {
			if a[i]>>4 == b[i]>>4 {
				agree++
			}
			if a[i]&15 == b[i]&15 {
				agree++
			}
			total += 2
		}
	}
	return agree, total
}
