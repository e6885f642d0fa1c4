package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/nf4"
	"github.com/arenahost/arenahost/shared/safetensors"
)

func init() {
	register(&command{
		name:    "merge",
		summary: "merge LoRAs into an NF4 model offline, streaming layer by layer (out: nf4, bf16 or one concatenated LoRA)",
		usage:   "arenahost merge --model IN --lora FILE[:STRENGTH] ... --out OUT --as nf4|bf16|lora [--report FILE.json]",
		example: "arenahost merge --model flux-nf4.safetensors --lora style.safetensors:0.8 --lora detail.safetensors --out merged.safetensors --as nf4 --report merged.json",
		run:     runMerge,
	})
}

// MergeLoRA is one LoRA of a merge.
type MergeLoRA struct {
	Path     string  `json:"path"`
	Strength float64 `json:"strength"`
}

// MergeOptions says what Merge writes.
type MergeOptions struct {
	Model  string
	LoRAs  []MergeLoRA
	Out    string
	As     string // "nf4", "bf16" or "lora"
	Strict bool
	// TileElems bounds the fused pass's tile (nf4; 0: shared/lora's default).
	TileElems int
}

// MergeReport is what a merge did (--report writes it as JSON).
type MergeReport struct {
	Model string      `json:"model"`
	Out   string      `json:"out"`
	As    string      `json:"as"`
	LoRAs []MergeLoRA `json:"loras"`
	// Identity says the output is a byte copy of the input (nf4 with no
	// LoRA or all strengths 0).
	Identity bool          `json:"identity,omitempty"`
	Report   *lora.Report  `json:"report,omitempty"`
	Elapsed  time.Duration `json:"elapsed_ns"`
	Bytes    int64         `json:"bytes"`
}

// loraFlags collects repeated --lora FILE[:STRENGTH] flags.
type loraFlags []MergeLoRA

func (l *loraFlags) String() string { return fmt.Sprint(*l) }

func (l *loraFlags) Set(v string) error {
	path, s := v, 1.0
	if i := strings.LastIndexByte(v, ':'); i > 0 {
		if f, err := strconv.ParseFloat(v[i+1:], 64); err == nil {
			path, s = v[:i], f
		}
	}
	if path == "" {
		return errors.New("empty LoRA path")
	}
	*l = append(*l, MergeLoRA{Path: path, Strength: s})
	return nil
}

var _ flag.Value = (*loraFlags)(nil)

func runMerge(ctx context.Context, env *Env, args []string) error {
	fs := newFlags(commands["merge"], env)
	var o MergeOptions
	var ls loraFlags
	fs.StringVar(&o.Model, "model", "", "input bitsandbytes 4-bit safetensors model")
	fs.Var(&ls, "lora", "a LoRA file, optionally :STRENGTH (default 1); repeat for several")
	fs.StringVar(&o.Out, "out", "", "output safetensors file")
	fs.StringVar(&o.As, "as", "nf4", "output: nf4 (the input's layout, re-quantized), bf16 (dense merged weights) or lora (one concatenated LoRA)")
	fs.BoolVar(&o.Strict, "strict", false, "fail when a LoRA has keys that match no layer")
	report := fs.String("report", "", "write the merge report (matched/unmatched keys, retention) as JSON to this file")
	if done, err := parse(fs, args); done {
		return err
	}
	if o.Model == "" || o.Out == "" || fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("merge needs --model IN and --out OUT (and no positional arguments): %w", ErrUsage)
	}
	o.LoRAs = ls
	rep, err := Merge(ctx, o)
	if err != nil {
		return err
	}
	if *report != "" {
		b, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(*report, append(b, '\n'), 0o644); err != nil {
			return fmt.Errorf("merge: write report: %w", err)
		}
	}
	fmt.Fprintf(env.Stdout, "wrote %s (%s, %d LoRAs, %s)\n", o.Out, o.As, len(o.LoRAs), rep.Elapsed.Round(time.Millisecond))
	if rep.Report != nil {
		for _, w := range rep.Report.Warnings {
			fmt.Fprintf(env.Stderr, "warning: %s\n", w)
		}
		for _, l := range rep.Report.LoRAs {
			if len(l.Unmatched) > 0 {
				fmt.Fprintf(env.Stderr, "warning: %s: %d keys matched no layer (first: %s)\n", l.File, len(l.Unmatched), l.Unmatched[0].Key)
			}
		}
	}
	return nil
}

// mergeInput is the opened model.
type mergeInput struct {
	f       *safetensors.File
	weights []nf4.Weight
	byName  map[string]*nf4.Weight
	model   *lora.Model
}

func (in *mergeInput) read(key string) ([]byte, error) { return in.f.Data(key) }

func openMergeInput(path string) (*mergeInput, error) {
	f, err := safetensors.Open(path)
	if err != nil {
		return nil, fmt.Errorf("merge: %w", err)
	}
	in := &mergeInput{f: f, byName: map[string]*nf4.Weight{}}
	meta := map[string]nf4.TensorMeta{}
	var names []string
	for _, t := range f.Tensors {
		meta[t.Name] = nf4.TensorMeta{DType: string(t.DType), Shape: t.Shape}
		names = append(names, t.Name)
	}
	in.weights, _, err = nf4.GroupWeights(path, meta, in.read)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("merge: %w", err)
	}
	var layers []lora.Layer
	for i := range in.weights {
		w := &in.weights[i]
		in.byName[w.Name] = w
		if len(w.State.Shape) == 2 && strings.HasSuffix(w.Name, ".weight") {
			layers = append(layers, lora.Layer{Name: strings.TrimSuffix(w.Name, ".weight"), Out: int(w.State.Shape[0]), In: int(w.State.Shape[1])})
		}
	}
	if len(layers) == 0 {
		f.Close()
		return nil, fmt.Errorf("merge: %s: no 2-D bitsandbytes 4-bit weights", path)
	}
	info, err := layout.DetectInfo(names)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("merge: %s: %w", path, err)
	}
	if in.model, err = lora.NewModel(info, layers); err != nil {
		f.Close()
		return nil, fmt.Errorf("merge: %s: %w", path, err)
	}
	return in, nil
}

// Merge merges o.LoRAs into o.Model and writes o.Out, one layer at a time.
func Merge(ctx context.Context, o MergeOptions) (*MergeReport, error) {
	start := time.Now()
	// The merge's garbage is a few large pointer-free buffers per layer:
	// collecting at half the live heap instead of all of it keeps the peak
	// near the live set for almost no marking work.
	defer debug.SetGCPercent(debug.SetGCPercent(50))
	if o.As == "" {
		o.As = "nf4"
	}
	if o.As != "nf4" && o.As != "bf16" && o.As != "lora" {
		return nil, fmt.Errorf("merge: --as %q: want nf4, bf16 or lora: %w", o.As, ErrUsage)
	}
	if o.LoRAs == nil {
		o.LoRAs = []MergeLoRA{}
	}
	rep := &MergeReport{Model: o.Model, Out: o.Out, As: o.As, LoRAs: o.LoRAs}
	zero := true
	for _, l := range o.LoRAs {
		zero = zero && l.Strength == 0
	}
	if o.As == "nf4" && zero {
		// Nothing changes any weight: the input, byte for byte.
		n, err := copyFile(o.Model, o.Out)
		if err != nil {
			return nil, fmt.Errorf("merge: %w", err)
		}
		rep.Identity, rep.Bytes, rep.Elapsed = true, n, time.Since(start)
		return rep, nil
	}
	in, err := openMergeInput(o.Model)
	if err != nil {
		return nil, err
	}
	defer in.f.Close()
	var maps []*lora.Mapping
	var strengths []float64
	for _, l := range o.LoRAs {
		f, err := lora.Parse(l.Path)
		if err != nil {
			return nil, fmt.Errorf("merge: %w", err)
		}
		mp, err := in.model.Map(f)
		if err != nil {
			return nil, fmt.Errorf("merge: %w", err)
		}
		if o.Strict && len(mp.Unmatched) > 0 {
			return nil, fmt.Errorf("merge: lora %s: key %s: unmatched (%s) and --strict is set", filepath.Base(l.Path), mp.Unmatched[0].Key, mp.Unmatched[0].Reason)
		}
		maps = append(maps, mp)
		strengths = append(strengths, l.Strength)
	}
	var plan *lora.Plan
	if len(maps) > 0 {
		base := func(layer string) ([]float32, error) {
			w := in.byName[layer+".weight"]
			if w == nil {
				return nil, fmt.Errorf("no 4-bit weight %s.weight", layer)
			}
			return dqLogical(w, in.read)
		}
		if o.As == "nf4" {
			// The fused pass builds one layer's factors at a time
			// (mergeNF4 materializes each before its pass).
			plan, err = lora.BuildDeferred(in.model, maps, strengths, base)
		} else {
			plan, err = lora.BuildSide(in.model, maps, strengths, base, nil)
		}
		if err != nil {
			return nil, fmt.Errorf("merge: %w", err)
		}
		for _, sl := range plan.Layers {
			if sl.HasBias() {
				return nil, fmt.Errorf("merge: layer %s: the LoRAs carry a bias delta, which a merged 4-bit or LoRA output cannot hold", sl.Name)
			}
		}
		rep.Report = plan.Report
	}
	md := map[string]string{}
	for k, v := range in.f.Metadata {
		md[k] = v
	}
	if o.As == "lora" {
		md = map[string]string{"format": "pt"}
	}
	lj, _ := json.Marshal(o.LoRAs)
	md["arenahost.merge.base_model"] = filepath.Base(o.Model)
	md["arenahost.merge.loras"] = string(lj)
	md["arenahost.merge.as"] = o.As
	switch o.As {
	case "nf4":
		err = mergeNF4(ctx, in, plan, md, o)
	case "bf16":
		err = mergeBF16(ctx, in, plan, md, o)
	default:
		err = mergeLoRA(plan, md, o)
	}
	if err != nil {
		return nil, err
	}
	if st, err := os.Stat(o.Out); err == nil {
		rep.Bytes = st.Size()
	}
	if rep.Report != nil {
		rep.Report.Elapsed = time.Since(start)
	}
	rep.Elapsed = time.Since(start)
	return rep, nil
}

func copyFile(src, dst string) (int64, error) {
	in, err := os.Open(src)
	if err != nil {
		return 0, err
	}
	defer in.Close()
	tmp, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".tmp*")
	if err != nil {
		return 0, err
	}
	n, err := io.Copy(tmp, in)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp.Name(), 0o644)
	}
	if err == nil {
		err = os.Rename(tmp.Name(), dst)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return 0, fmt.Errorf("copy %s to %s: %w", src, dst, err)
	}
	return n, nil
}

// outFile writes a safetensors file whose tensors are placed at their
// laid-out offsets in any order (WriteAt), so each layer is computed once
// and written whole, never held with the others. It renames into place on
// Commit.
type outFile struct {
	path   string
	tmp    *os.File
	start  int64
	offset map[string]safetensors.TensorInfo
	done   map[string]bool
}

func createOut(path string, md map[string]string, infos []safetensors.TensorInfo) (*outFile, error) {
	prefix, lay, err := safetensors.EncodeHeader(md, infos)
	if err != nil {
		return nil, fmt.Errorf("merge: encode header of %s: %w", path, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return nil, fmt.Errorf("merge: %w", err)
	}
	o := &outFile{path: path, tmp: tmp, start: int64(len(prefix)), offset: map[string]safetensors.TensorInfo{}, done: map[string]bool{}}
	for _, t := range lay {
		o.offset[t.Name] = t
	}
	if _, err := tmp.WriteAt(prefix, 0); err != nil {
		o.abort()
		return nil, fmt.Errorf("merge: write %s: %w", path, err)
	}
	return o, nil
}

func (o *outFile) put(name string, data []byte) error {
	t, ok := o.offset[name]
	if !ok {
		return fmt.Errorf("merge: tensor %s is not in the output layout", name)
	}
	if int64(len(data)) != t.End-t.Begin {
		return fmt.Errorf("merge: tensor %s: %d bytes, layout holds %d", name, len(data), t.End-t.Begin)
	}
	if _, err := o.tmp.WriteAt(data, o.start+t.Begin); err != nil {
		return fmt.Errorf("merge: write %s: tensor %s: %w", o.path, name, err)
	}
	o.done[name] = true
	return nil
}

func (o *outFile) commit() error {
	for n := range o.offset {
		if !o.done[n] {
			o.abort()
			return fmt.Errorf("merge: tensor %s was never written", n)
		}
	}
	err := o.tmp.Sync()
	if cerr := o.tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(o.tmp.Name(), 0o644)
	}
	if err == nil {
		err = os.Rename(o.tmp.Name(), o.path)
	}
	if err != nil {
		os.Remove(o.tmp.Name())
		return fmt.Errorf("merge: write %s: %w", o.path, err)
	}
	return nil
}

func (o *outFile) abort() {
	o.tmp.Close()
	os.Remove(o.tmp.Name())
}

// memStore serves one layer's copied bytes to the fused pass.
type memStore struct{ q *lora.QLayer }

func (s memStore) Layer(string) (*lora.QLayer, error) { return s.q, nil }

// fuseOne runs shared/lora's tiled fused pass on one layer's copy and
// returns its new packed bytes, float32 absmax and report row.
// buf, when not nil, is reused for the packed copy (grown as needed): the
// caller writes the result out before the next layer, so one buffer serves
// every layer instead of a fresh one per layer for the collector.
func fuseOne(ctx context.Context, in *mergeInput, sl *lora.SideLayer, w *nf4.Weight, tile int, buf *[]byte) ([]byte, []float32, lora.LayerReport, int64, error) {
	d, err := w.Load(in.read)
	if err != nil {
		return nil, nil, lora.LayerReport{}, 0, err
	}
	am, err := nf4.Absmax(w.State, d)
	if err != nil {
		return nil, nil, lora.LayerReport{}, 0, fmt.Errorf("%s: %w", w.Name, err)
	}
	var packed []byte
	if buf != nil {
		*buf = append((*buf)[:0], d.Packed...)
		packed = *buf
	} else {
		packed = append([]byte(nil), d.Packed...)
	}
	q := &lora.QLayer{Name: sl.Name, Out: sl.Out, In: sl.In, Blocksize: w.State.Blocksize, Packed: packed, Absmax: am, Raw: [][]byte{packed}}
	p := &lora.Plan{Layers: []*lora.SideLayer{sl}, Report: &lora.Report{Layers: []lora.LayerReport{{Layer: sl.Name, Rank: sl.Rank, Dense: sl.Dense != nil}}}}
	codec, err := lora.NewNF4Codec(w.State.QuantType, w.State.DType)
	if err != nil {
		return nil, nil, lora.LayerReport{}, 0, fmt.Errorf("%s: %w", w.Name, err)
	}
	// The pass writes a copy, so nothing needs journaling or rolling back.
	if err := lora.Fuse(ctx, p, memStore{q}, codec, nil, lora.FuseOptions{TileElems: tile, CallerRestores: true}); err != nil {
		return nil, nil, lora.LayerReport{}, 0, err
	}
	return packed, am, p.Report.Layers[0], p.Report.PeakScratchBytes, nil
}

func f32le(v []float32) []byte {
	b := make([]byte, 4*len(v))
	half.EncodeF32(b, v)
	return b
}

func (in *mergeInput) plainInfos(skip func(string) bool) []safetensors.TensorInfo {
	var out []safetensors.TensorInfo
	for _, t := range in.f.Tensors {
		if !skip(t.Name) {
			out = append(out, safetensors.TensorInfo{Name: t.Name, DType: t.DType, Shape: t.Shape})
		}
	}
	return out
}

func mergeNF4(ctx context.Context, in *mergeInput, plan *lora.Plan, md map[string]string, o MergeOptions) error {
	touched := map[string]*lora.SideLayer{}
	for _, sl := range plan.Layers {
		touched[sl.Name+".weight"] = sl
	}
	// A nested weight's quant-state JSON records the new nested offset, so
	// its length is known only after the pass: run those passes first and
	// keep just the JSON.
	newJSON := map[string][]byte{}
	var buf []byte // each layer's packed copy, reused
	for name, sl := range touched {
		w := in.byName[name]
		if !w.State.Nested {
			continue
		}
		plan.Materialize(sl)
		_, am, _, _, err := fuseOne(ctx, in, sl, w, o.TileElems, &buf)
		plan.Release(sl)
		if err != nil {
			return fmt.Errorf("merge: %w", err)
		}
		_, _, off := nf4.QuantizeNested(am)
		st := w.State
		st.NestedOffset = float64(off)
		newJSON[w.Keys.QuantState] = st.MarshalPython()
	}
	infos := in.plainInfos(func(string) bool { return false })
	for i := range infos {
		if js, ok := newJSON[infos[i].Name]; ok {
			infos[i].Shape = []int64{int64(len(js))}
		}
	}
	out, err := createOut(o.Out, md, infos)
	if err != nil {
		return err
	}
	written := map[string]bool{}
	var dot, norm, diff float64
	rep := plan.Report
	rep.Mode = "fuse"
	rep.Warnings = nil
	var peak int64
	for li, sl := range plan.Layers {
		w := in.byName[sl.Name+".weight"]
		plan.Materialize(sl)
		packed, am, lr, scratch, err := fuseOne(ctx, in, sl, w, o.TileElems, &buf)
		plan.Release(sl)
		if err != nil {
			out.abort()
			return fmt.Errorf("merge: %w", err)
		}
		peak = max(peak, scratch)
		rep.Layers[li] = lr
		if lr.Warning != "" {
			rep.Warnings = append(rep.Warnings, sl.Name+": "+lr.Warning)
		}
		if n := lr.DeltaNorm2; n > 0 {
			dot += lr.Retention * n
			diff += lr.RelError * lr.RelError * n
			norm += n
		}
		puts := map[string][]byte{w.Keys.Weight: packed}
		if w.State.Nested {
			q, nabs, _ := nf4.QuantizeNested(am)
			puts[w.Keys.Absmax], puts[w.Keys.NestedAbsmax], puts[w.Keys.QuantState] = q, f32le(nabs), newJSON[w.Keys.QuantState]
		} else {
			puts[w.Keys.Absmax] = f32le(am)
		}
		for k, b := range puts {
			if err := out.put(k, b); err != nil {
				out.abort()
				return err
			}
			written[k] = true
		}
		// Read once: keep the layer's mapped pages out of the resident set.
		for _, k := range w.Keys.All() {
			if err := in.f.Evict(k); err != nil {
				out.abort()
				return fmt.Errorf("merge: %w", err)
			}
		}
	}
	if norm > 0 {
		rep.Retention, rep.RelError = dot/norm, math.Sqrt(diff/norm)
	}
	rep.PeakScratchBytes = peak
	// Everything else is copied as stored.
	for _, t := range in.f.Tensors {
		if written[t.Name] {
			continue
		}
		b, err := in.f.TensorData(t)
		if err != nil {
			out.abort()
			return fmt.Errorf("merge: %w", err)
		}
		if err := out.put(t.Name, b); err != nil {
			out.abort()
			return err
		}
		if err := in.f.Evict(t.Name); err != nil {
			out.abort()
			return fmt.Errorf("merge: %w", err)
		}
	}
	return out.commit()
}

// dqLogical dequantizes w as bitsandbytes' dequantize_4bit does: the fp32
// product rounded to the weight's logical dtype, the base every merge adds
// deltas to (as PEFT's merge and the fused pass do).
func dqLogical(w *nf4.Weight, read nf4.TensorBytes) ([]float32, error) {
	v, err := w.DequantizeF32(read)
	if err != nil {
		return nil, err
	}
	nf4.RoundTo(v, w.State.DType)
	return v, nil
}

func mergeBF16(ctx context.Context, in *mergeInput, plan *lora.Plan, md map[string]string, o MergeOptions) error {
	quantKey := map[string]bool{}
	var infos []safetensors.TensorInfo
	for _, w := range in.weights {
		for _, k := range w.Keys.All() {
			quantKey[k] = true
		}
		infos = append(infos, safetensors.TensorInfo{Name: w.Name, DType: safetensors.BF16, Shape: w.State.Shape})
	}
	infos = append(infos, in.plainInfos(func(n string) bool { return quantKey[n] })...)
	out, err := createOut(o.Out, md, infos)
	if err != nil {
		return err
	}
	for _, w := range in.weights {
		if err := ctx.Err(); err != nil {
			out.abort()
			return fmt.Errorf("merge: %w", err)
		}
		vals, err := dqLogical(&w, in.read)
		if err != nil {
			out.abort()
			return fmt.Errorf("merge: %w", err)
		}
		if plan != nil {
			if sl := plan.Layer(strings.TrimSuffix(w.Name, ".weight")); sl != nil {
				sl.DeltaRows(vals, 0, sl.Out)
			}
		}
		b := make([]byte, 2*len(vals))
		half.EncodeBF16(b, vals)
		if err := out.put(w.Name, b); err != nil {
			out.abort()
			return err
		}
	}
	for _, t := range in.f.Tensors {
		if quantKey[t.Name] {
			continue
		}
		b, err := in.f.TensorData(t)
		if err != nil {
			out.abort()
			return fmt.Errorf("merge: %w", err)
		}
		if err := out.put(t.Name, b); err != nil {
			out.abort()
			return err
		}
	}
	return out.commit()
}

// mergeLoRA writes the exact concatenation: per layer A_out = [A_cat; D]
// and B_out = [B_cat | I] (the identity block only for layers carrying a
// dense delta D), so B_out·A_out is the weighted sum of all deltas.
func mergeLoRA(plan *lora.Plan, md map[string]string, o MergeOptions) error {
	if plan == nil {
		return fmt.Errorf("merge: --as lora needs at least one --lora")
	}
	var ts []safetensors.WriteTensor
	for _, sl := range plan.Layers {
		r := sl.Rank
		if sl.Dense != nil {
			r += sl.Out
		}
		if r == 0 {
			continue
		}
		a := make([]float32, r*sl.In)
		copy(a, sl.A)
		if sl.Dense != nil {
			copy(a[sl.Rank*sl.In:], sl.Dense)
		}
		b := make([]float32, sl.Out*r)
		for i := 0; i < sl.Out; i++ {
			copy(b[i*r:i*r+sl.Rank], sl.B[i*sl.Rank:(i+1)*sl.Rank])
			if sl.Dense != nil {
				b[i*r+sl.Rank+i] = 1
			}
		}
		ts = append(ts,
			safetensors.WriteTensor{Name: sl.Name + ".lora_A.weight", DType: safetensors.F32, Shape: []int64{int64(r), int64(sl.In)}, Data: f32le(a)},
			safetensors.WriteTensor{Name: sl.Name + ".lora_B.weight", DType: safetensors.F32, Shape: []int64{int64(sl.Out), int64(r)}, Data: f32le(b)})
	}
	if err := safetensors.WriteFile(o.Out, md, ts); err != nil {
		return fmt.Errorf("merge: %w", err)
	}
	return nil
}
