package cli

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/host/inspect"
	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/nf4"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// bflFromDiffusers converts a diffusers-named, non-nested NF4 Flux-family
// folder to a Forge-style BFL file ("model.diffusion_model." prefix, fused
// qkv and linear1, adaLN halves swapped) by the layout's row maps, moving
// packed codes and absmax row ranges as they are: with blocksize 64 and
// input widths that are multiples of 64, every part starts on a block. It
// does the same to PEFT's merged codes (want: {diffusers weight: packed})
// and returns the BFL file and the expected BFL codes. Only the 4-bit
// weights are written.
func bflFromDiffusers(t *testing.T, folder string, want map[string][]byte, out string) map[string][]byte {
	t.Helper()
	set, err := safetensors.OpenSet(folder)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	meta := map[string]nf4.TensorMeta{}
	for _, ti := range set.Tensors {
		meta[ti.Name] = nf4.TensorMeta{DType: string(ti.DType), Shape: ti.Shape}
	}
	weights, _, err := nf4.GroupWeights(folder, meta, set.Data)
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]nf4.Weight{}
	shapes := map[string][]int{}
	for _, w := range weights {
		byName[w.Name] = w
		shapes[w.Name] = []int{int(w.State.Shape[0]), int(w.State.Shape[1])}
	}
	cfg, _, err := layout.DeriveFlux(layout.FluxDiffusers, shapes)
	if err != nil {
		t.Fatal(err)
	}
	maps, err := cfg.RowMaps()
	if err != nil {
		t.Fatal(err)
	}
	parts := map[string][]layout.RowMap{}
	for _, m := range maps {
		if _, ok := byName[m.Diffusers+".weight"]; ok {
			parts[m.BFL] = append(parts[m.BFL], m)
		}
	}
	var ts []safetensors.WriteTensor
	expect := map[string][]byte{}
	const pre = "model.diffusion_model."
	var names []string
	for b := range parts {
		names = append(names, b)
	}
	sort.Strings(names)
	for _, b := range names {
		ps := parts[b]
		first := byName[ps[0].Diffusers+".weight"]
		in := int(first.State.Shape[1])
		rows := 0
		for _, p := range ps {
			rows = max(rows, p.BFLRow+p.Rows)
		}
		packed, absmax, exp := make([]byte, rows*in/2), make([]byte, 4*rows*in/64), make([]byte, rows*in/2)
		for _, p := range ps {
			w := byName[p.Diffusers+".weight"]
			if w.State.Nested || w.State.Blocksize != 64 || in%64 != 0 {
				t.Fatalf("%s: the conversion wants plain blocksize-64 weights with in %% 64 == 0", w.Name)
			}
			pk, _ := set.Data(w.Keys.Weight)
			am, _ := set.Data(w.Keys.Absmax)
			src, dst, n := p.DiffRow*in/2, p.BFLRow*in/2, p.Rows*in/2
			copy(packed[dst:dst+n], pk[src:src+n])
			copy(exp[dst:dst+n], want[w.Name][src:src+n])
			src, dst, n = 4*p.DiffRow*in/64, 4*p.BFLRow*in/64, 4*p.Rows*in/64
			copy(absmax[dst:dst+n], am[src:src+n])
		}
		st := first.State
		st.Shape = []int64{int64(rows), int64(in)}
		js := st.MarshalPython()
		qm, _ := set.Data(first.Keys.QuantMap)
		name := pre + b + ".weight"
		ts = append(ts,
			safetensors.WriteTensor{Name: name, DType: safetensors.U8, Shape: []int64{int64(len(packed)), 1}, Data: packed},
			safetensors.WriteTensor{Name: name + ".absmax", DType: safetensors.F32, Shape: []int64{int64(len(absmax) / 4)}, Data: absmax},
			safetensors.WriteTensor{Name: name + ".quant_map", DType: safetensors.F32, Shape: []int64{16}, Data: qm},
			safetensors.WriteTensor{Name: name + ".quant_state.bitsandbytes__" + string(st.QuantType), DType: safetensors.U8, Shape: []int64{int64(len(js))}, Data: js})
		expect[name] = exp
	}
	if err := safetensors.WriteFile(out, nil, ts); err != nil {
		t.Fatal(err)
	}
	return expect
}

// checkBFL converts fam's diffusers folder to a BFL single file and merges
// the same diffusers-keyed PEFT LoRA into it: inspect names the variant in
// BFL layout, every key maps onto the fused layers, and the fused codes
// equal PEFT's merge of the split layers, row range by row range.
func checkBFL(t *testing.T, dir, fam, variant string) {
	t.Helper()
	want := map[string][]byte{}
	pf, err := safetensors.Open(filepath.Join(dir, fam, "peft-merged.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	for _, ti := range pf.Tensors {
		b, _ := pf.Data(ti.Name)
		want[ti.Name] = append([]byte(nil), b...)
	}
	pf.Close()
	tmp := t.TempDir()
	bfl := filepath.Join(tmp, fam+"-bfl.safetensors")
	expect := bflFromDiffusers(t, filepath.Join(dir, fam, "nf4"), want, bfl)
	r, err := inspect.File(bfl)
	if err != nil {
		t.Fatal(err)
	}
	if r.Model.Layout != "flux-bfl" || r.Model.Prefix != "model.diffusion_model." || !strings.HasPrefix(r.Model.Variant, variant) {
		t.Errorf("inspect BFL: layout %s prefix %q variant %q", r.Model.Layout, r.Model.Prefix, r.Model.Variant)
	}
	out := filepath.Join(tmp, "merged.safetensors")
	if _, err := Merge(context.Background(), MergeOptions{Model: bfl, Out: out, As: "nf4", Strict: true,
		LoRAs: []MergeLoRA{{Path: filepath.Join(dir, fam, "lora.safetensors"), Strength: 1}}}); err != nil {
		t.Fatal(err)
	}
	got, err := safetensors.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	agree, total := 0, 0
	for name, exp := range expect {
		b, err := got.Data(name)
		if err != nil || len(b) != len(exp) {
			t.Fatalf("%s: %d bytes, %v", name, len(b), err)
		}
		for i := range exp {
			if exp[i]>>4 == b[i]>>4 {
				agree++
			}
			if exp[i]&15 == b[i]&15 {
				agree++
			}
			total += 2
		}
	}
	frac := float64(agree) / float64(total)
	t.Logf("%s in BFL layout (%d fused layers), diffusers PEFT LoRA: fused codes vs PEFT merge of the split layers: %d/%d (%.5f%%)", fam, len(expect), agree, total, 100*frac)
	if frac < 0.999 {
		t.Errorf("%s BFL: only %s of codes agree", fam, fmt.Sprintf("%.4f%%", 100*frac))
	}
}
