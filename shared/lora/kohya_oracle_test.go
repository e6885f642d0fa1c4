package lora

import (
	"encoding/json"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/shared/layout"
)

// kohyaOracle runs testdata/kohya_key_oracle.py with a JSON input and
// decodes its JSON output into out.
func kohyaOracle(t *testing.T, py, cmd string, in, out any) {
	t.Helper()
	dir := t.TempDir()
	inPath, outPath := filepath.Join(dir, "in.json"), filepath.Join(dir, "out.json")
	args := []string{filepath.Join("testdata", "kohya_key_oracle.py"), cmd}
	if in != nil {
		b, _ := json.Marshal(in)
		if err := os.WriteFile(inPath, b, 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, inPath)
	}
	testenv.RunPython(t, py, append(args, outPath)...)
	b, err := os.ReadFile(outPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, out); err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
}

// oracleModel builds the mapping model of one of the oracle's diffusers
// models from its Linear layers.
func oracleModel(t *testing.T, l layout.Layout, rows [][3]any) *Model {
	t.Helper()
	var layers []Layer
	for _, r := range rows {
		layers = append(layers, Layer{Name: r[0].(string), Out: int(r[1].(float64)), In: int(r[2].(float64))})
	}
	m, err := NewModel(layout.Info{Layout: l, Naming: layout.NamingDiffusers}, layers)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// kohya's SD3 keys (Stability's module names, fused qkv, swapped adaLN
// halves) against diffusers' own single-file converter: every Stability
// Linear that arenahost's mapping knows gets, row by row, the id of the
// diffusers (layer, row) that Map places it on; diffusers'
// convert_sd3_transformer_checkpoint_to_diffusers must need no Stability key
// arenahost lacks, leave none unread, and put every id back on its own row
// of every Linear of the real SD3Transformer2DModel (weights and biases).
// SDXL: every Linear of a real SDXL-structured UNet, named the way kohya
// names it (lora_unet_ + LDM path), must land on the same module when
// diffusers' kohya converter (as StableDiffusionXLLoraLoaderMixin runs it)
// reads the key, and arenahost's Map must place the key on that module.
func TestKohyaKeysAgainstDiffusersConverters(t *testing.T) {
	py := testenv.TorchPython(t)
	var layers struct {
		SD3  [][3]any `json:"sd3"`
		SDXL [][3]any `json:"sdxl"`
	}
	kohyaOracle(t, py, "layers", nil, &layers)

	t.Run("sd3", func(t *testing.T) {
		m := oracleModel(t, layout.SD3, layers.SD3)
		blocks := countPrefix(m.layers, "transformer_blocks.")
		saiRows := map[string]int{}
		var saiIn = map[string]int{}
		for _, r := range layout.SD3RowMaps(blocks, func(d string) (int, bool) { l, ok := m.layers[d]; return l.Out, ok }) {
			saiRows[r.BFL] = max(saiRows[r.BFL], r.BFLRow+r.Rows)
			saiIn[r.BFL] = m.layers[r.Diffusers].In
		}
		f := &File{Path: "sd3-kohya.safetensors", Format: FormatKohya}
		for sai, rows := range saiRows {
			key := layout.KohyaName("lora_unet_", sai)
			f.Modules = append(f.Modules, &Module{Key: key, Type: TypeLoRA, Out: rows, In: saiIn[sai], keys: []string{key}})
		}
		mp, err := m.Map(f)
		if err != nil {
			t.Fatal(err)
		}
		if len(mp.Unmatched) != 0 || len(mp.Targets) != len(saiRows) {
			t.Fatalf("%d of %d kohya modules placed; unmatched %v", len(mp.Targets), len(saiRows), mp.Unmatched)
		}
		type piece struct {
			SAI     string `json:"sai"`
			SAIRow  int    `json:"sai_row"`
			Diff    string `json:"diff"`
			DiffRow int    `json:"diff_row"`
			Rows    int    `json:"rows"`
		}
		var in struct {
			Pieces []piece `json:"pieces"`
		}
		bySAIKey := map[string]string{}
		for sai := range saiRows {
			bySAIKey[layout.KohyaName("lora_unet_", sai)] = sai
		}
		covered := map[string]int{}
		for _, tg := range mp.Targets {
			for _, p := range tg.Pieces {
				in.Pieces = append(in.Pieces, piece{SAI: bySAIKey[tg.Module.Key], SAIRow: p.SrcRow, Diff: p.Layer, DiffRow: p.DstRow, Rows: p.Rows})
				covered[p.Layer] += p.Rows
			}
		}
		for _, n := range m.names {
			if covered[n] != m.layers[n].Out {
				t.Errorf("diffusers layer %s: %d of %d rows reached from kohya keys", n, covered[n], m.layers[n].Out)
			}
		}
		var got struct {
			Missing     []string         `json:"missing"`
			Leftover    []string         `json:"leftover"`
			Extra       []string         `json:"extra"`
			Unconverted []string         `json:"unconverted"`
			Wrong       []map[string]any `json:"wrong"`
			Linears     int              `json:"linears"`
			Rows        int              `json:"rows"`
		}
		kohyaOracle(t, py, "sd3", in, &got)
		t.Logf("sd3: %d Stability modules → %d diffusers Linears, %d rows checked against diffusers' converter", len(saiRows), got.Linears, got.Rows)
		if len(got.Missing)+len(got.Leftover)+len(got.Extra)+len(got.Unconverted)+len(got.Wrong) != 0 || got.Linears != len(m.names) {
			t.Errorf("diffusers' converter disagrees: missing %v, leftover %v, extra %v, unconverted %v, wrong rows %v; %d of %d Linears checked",
				got.Missing, got.Leftover, got.Extra, got.Unconverted, got.Wrong, got.Linears, len(m.names))
		}
	})

	t.Run("sdxl", func(t *testing.T) {
		m := oracleModel(t, layout.SDXL, layers.SDXL)
		keys := map[string]string{}
		f := &File{Path: "sdxl-kohya.safetensors", Format: FormatKohya}
		for _, n := range m.names {
			ldm, ok := layout.UNetToLDM(layout.SDXL, n)
			if !ok {
				t.Errorf("no LDM name for %s", n)
				continue
			}
			key := layout.KohyaName("lora_unet_", ldm)
			keys[n] = key
			l := m.layers[n]
			f.Modules = append(f.Modules, &Module{Key: key, Type: TypeLoRA, Out: l.Out, In: l.In, keys: []string{key}})
		}
		mp, err := m.Map(f)
		if err != nil {
			t.Fatal(err)
		}
		placed := map[string]string{}
		for _, tg := range mp.Targets {
			if len(tg.Pieces) != 1 || tg.Pieces[0].Rows != tg.Module.Out {
				t.Errorf("%s placed as %+v", tg.Module.Key, tg.Pieces)
				continue
			}
			placed[tg.Module.Key] = tg.Pieces[0].Layer
		}
		var conv map[string]string
		kohyaOracle(t, py, "sdxl", keys, &conv)
		var names []string
		for n := range keys {
			names = append(names, n)
		}
		sort.Strings(names)
		agree, diffErr := 0, 0
		for _, n := range names {
			key := keys[n]
			if placed[key] != n {
				t.Errorf("arenahost placed %s on %q, want %s", key, placed[key], n)
			}
			switch d := conv[key]; {
			case d == n:
				agree++
			case strings.HasPrefix(d, "error:"):
				diffErr++
				t.Errorf("diffusers cannot convert %s (%s): %s", key, n, d)
			default:
				t.Errorf("diffusers puts %s on %s; arenahost on %s", key, d, n)
			}
		}
		t.Logf("sdxl: %d/%d kohya keys land on the same Linear in diffusers' converter and arenahost's Map (%d diffusers could not convert)", agree, len(names), diffErr)
	})
}
