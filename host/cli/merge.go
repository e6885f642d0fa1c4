package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync/atomic"
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
		usage:   "arenahost merge --model IN --lora FILE[:STRENGTH] ... --out OUT --as nf4|bf16|lora [--report FILE.json]   (no --lora: an identity copy for nf4, the dequantized model for bf16)",
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
	// Progress, when set, is kept up to date while Merge runs.
	Progress *MergeProgress
	// MaxShardSize bounds each shard of a folder Out (0: 10 GB, diffusers'
	// default); see merge_folder.go.
	MaxShardSize int64
}

// MergeProgress is how far a running Merge is: layers and bytes of the
// input done, out of their totals (set once the input is open). Read it
// from another goroutine while Merge runs.
type MergeProgress struct {
	Layers, LayersTotal atomic.Int64
	Bytes, BytesTotal   atomic.Int64
}

func (p *MergeProgress) layer(bytes int64) {
	if p != nil {
		p.Layers.Add(1)
		p.Bytes.Add(bytes)
	}
}

func (p *MergeProgress) bytes(n int64) {
	if p != nil {
		p.Bytes.Add(n)
	}
}

func (p *MergeProgress) totals(layers int, bytes int64) {
	if p != nil {
		p.LayersTotal.Store(int64(layers))
		p.BytesTotal.Store(bytes)
	}
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

// Set takes FILE or FILE:STRENGTH. A FILE whose own name has a colon is
// taken whole when it exists; otherwise what follows the last colon must
// be a finite number.
func (l *loraFlags) Set(v string) error {
	path, s := v, 1.0
	if i := strings.LastIndexByte(v, ':'); i >= 0 {
		if _, err := os.Stat(v); err != nil {
			str := v[i+1:]
			f, err := strconv.ParseFloat(str, 64)
			if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
				return fmt.Errorf("strength %q is not a finite number (write FILE:STRENGTH, e.g. style.safetensors:0.8)", str)
			}
			path, s = v[:i], f
		}
	}
	if path == "" {
		return errors.New("no LoRA file before the strength (write FILE[:STRENGTH])")
	}
	if math.IsNaN(s) || math.IsInf(s, 0) {
		return fmt.Errorf("LoRA %s: strength %v is not a finite number", path, s)
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
	fs.StringVar(&o.Out, "out", "", "output safetensors file, or a folder (any name not ending in .safetensors) diffusers loads as it is")
	fs.Var(byteSize{&o.MaxShardSize}, "max-shard-size", "with a folder --out: shard above this size (e.g. 10GB, 500MB; default 10GB)")
	fs.StringVar(&o.As, "as", "nf4", "output: nf4 (the input's layout, re-quantized), bf16 (dense merged weights) or lora (one concatenated LoRA)")
	fs.BoolVar(&o.Strict, "strict", false, "fail when a LoRA has keys that match no layer")
	report := fs.String("report", "", "write the merge report (matched/unmatched keys, retention) as JSON to this file")
	pos, done, err := parse(fs, args)
	if done {
		return err
	}
	switch {
	case len(pos) > 0:
		return usagef("takes no positional arguments, got %q (give LoRAs as --lora FILE[:STRENGTH])", pos)
	case o.Model == "":
		return usagef("needs --model IN, the bitsandbytes 4-bit safetensors model to merge into")
	case o.Out == "":
		return usagef("needs --out OUT, the safetensors file to write")
	case o.As != "nf4" && o.As != "bf16" && o.As != "lora":
		return usagef("--as must be nf4, bf16 or lora, got %q", o.As)
	case o.As == "lora" && len(ls) == 0:
		return usagef("--as lora needs at least one --lora FILE[:STRENGTH] to concatenate")
	}
	o.LoRAs = ls
	if len(ls) == 0 {
		what := "an identity copy of " + o.Model
		if o.As == "bf16" {
			what = "the dequantized weights of " + o.Model + " unchanged"
		}
		fmt.Fprintf(env.Stderr, "merge: no --lora given: writing %s\n", what)
	}
	o.Progress = &MergeProgress{}
	stop := startMergeProgress(env.Stderr, o.Progress)
	rep, err := Merge(ctx, o)
	stop()
	if err != nil {
		return err
	}
	if *report != "" {
		b, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(*report, append(b, '\n'), 0o644); err != nil {
			return fmt.Errorf("merge: write report: %w", err)
		}
	}
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
	fmt.Fprintln(env.Stdout, mergeSummary(rep))
	return nil
}

// mergeSummary is the line merge ends with: what was written, the matched
// and unmatched LoRA keys per file and, for nf4, the retention.
func mergeSummary(rep *MergeReport) string {
	s := fmt.Sprintf("wrote %s (%s, %d LoRAs, %s, %s)", rep.Out, rep.As, len(rep.LoRAs), human(rep.Bytes), rep.Elapsed.Round(time.Millisecond))
	if rep.Identity {
		return s + ": identity copy, no LoRA changes a weight"
	}
	if rep.Report == nil {
		return s
	}
	var parts []string
	for _, l := range rep.Report.LoRAs {
		parts = append(parts, fmt.Sprintf("%s %d keys matched, %d unmatched", filepath.Base(l.File), l.Matched, len(l.Unmatched)))
	}
	s += ": " + strings.Join(parts, "; ")
	if rep.As == "nf4" && rep.Report.Retention != 0 {
		s += fmt.Sprintf("; retention %.4f (relative error %.4f)", rep.Report.Retention, rep.Report.RelError)
	}
	return s
}

// checkOut refuses an output whose directory is missing or which is a
// directory itself (unless folder: a diffusers folder --out), naming the user's path (not the temporary file the
// output is written through).
func checkOut(path string, folder bool) error {
	dir := filepath.Dir(path)
	st, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("merge: --out %s: directory %s does not exist (create it first)", path, dir)
	case err != nil:
		return fmt.Errorf("merge: --out %s: %w", path, bareErr(err))
	case !st.IsDir():
		return fmt.Errorf("merge: --out %s: %s is not a directory", path, dir)
	}
	if st, err := os.Stat(path); err == nil && st.IsDir() && !folder {
		return fmt.Errorf("merge: --out %s is a directory; name the output file", path)
	}
	return nil
}

// bareErr strips the path from a *fs.PathError or *os.LinkError, so the
// message can name the user's path instead of a temporary file.
func bareErr(err error) error {
	var pe *fs.PathError
	var le *os.LinkError
	switch {
	case errors.As(err, &pe):
		return pe.Err
	case errors.As(err, &le):
		return le.Err
	}
	return err
}

// progressWriter counts bytes copied into a MergeProgress.
type progressWriter struct{ p *MergeProgress }

func (w progressWriter) Write(b []byte) (int, error) {
	w.p.bytes(int64(len(b)))
	return len(b), nil
}

// mergeInput is the opened model.
type mergeInput struct {
	f       *safetensors.Set
	weights []nf4.Weight
	byName  map[string]*nf4.Weight
	// dense: the plain 2-D weights of bundled text encoders (CLIP-L F16,
	// T5 F8_E4M3, …) by key, which LoRAs' text-encoder keys merge into,
	// rounded to their stored dtype.
	dense map[string]safetensors.TensorInfo
	model *lora.Model
	total int64 // every tensor's bytes
}

// weightBytes is the stored size of all of w's tensors.
func (in *mergeInput) weightBytes(w *nf4.Weight) int64 {
	var n int64
	for _, k := range w.Keys.All() {
		if t, ok := in.f.Lookup(k); ok {
			n += t.End - t.Begin
		}
	}
	return n
}

func (in *mergeInput) read(key string) ([]byte, error) { return in.f.Data(key) }

func openMergeInput(path string) (*mergeInput, error) {
	f, err := safetensors.OpenSet(path)
	if err != nil {
		return nil, fmt.Errorf("merge: %w", err)
	}
	in := &mergeInput{f: f, byName: map[string]*nf4.Weight{}, dense: map[string]safetensors.TensorInfo{}}
	meta := map[string]nf4.TensorMeta{}
	var names []string
	for _, t := range f.Tensors {
		in.total += t.End - t.Begin
		meta[t.Name] = nf4.TensorMeta{DType: string(t.DType), Shape: t.Shape}
		names = append(names, t.Name)
	}
	in.weights, _, err = nf4.GroupWeights(path, meta, in.read)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("merge: %w", err)
	}
	var layers []lora.Layer
	quantKey := map[string]bool{}
	for i := range in.weights {
		w := &in.weights[i]
		in.byName[w.Name] = w
		for _, k := range w.Keys.All() {
			quantKey[k] = true
		}
		if len(w.State.Shape) == 2 && strings.HasSuffix(w.Name, ".weight") {
			layers = append(layers, lora.Layer{Name: strings.TrimSuffix(w.Name, ".weight"), Out: int(w.State.Shape[0]), In: int(w.State.Shape[1])})
		}
	}
	if len(layers) == 0 {
		f.Close()
		return nil, fmt.Errorf("merge: %s: no 2-D bitsandbytes 4-bit weights", path)
	}
	for _, t := range f.Tensors {
		if quantKey[t.Name] || len(t.Shape) != 2 || !strings.HasSuffix(t.Name, ".weight") || !lora.DenseFusable(string(t.DType)) {
			continue
		}
		if c, _, ok := layout.ComponentOf(t.Name); ok && (c.Kind == "te1" || c.Kind == "te2" || c.Kind == "t5") {
			in.dense[t.Name] = t
			layers = append(layers, lora.Layer{Name: strings.TrimSuffix(t.Name, ".weight"), Out: int(t.Shape[0]), In: int(t.Shape[1])})
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
	in.model.NoteTensors(names)
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
		return nil, fmt.Errorf("merge: --as must be nf4, bf16 or lora, got %q", o.As)
	}
	// A folder --out may exist empty (merge_folder.go refuses a non-empty one).
	if err := checkOut(o.Out, isFolderOut(o)); err != nil {
		return nil, err
	}
	if o.LoRAs == nil {
		o.LoRAs = []MergeLoRA{}
	}
	rep := &MergeReport{Model: o.Model, Out: o.Out, As: o.As, LoRAs: o.LoRAs}
	zero := true
	for _, l := range o.LoRAs {
		zero = zero && l.Strength == 0
	}
	if o.As == "nf4" && zero && !isFolderOut(o) && !isDir(o.Model) {
		// Nothing changes any weight: the input, byte for byte.
		if st, err := os.Stat(o.Model); err == nil {
			o.Progress.totals(0, st.Size())
		}
		n, err := copyFile(o.Model, o.Out, o.Progress)
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
			if t, ok := in.dense[layer+".weight"]; ok {
				b, err := in.f.TensorData(t)
				if err != nil {
					return nil, err
				}
				return lora.DecodeDense(string(t.DType), b, int(t.Shape[0]*t.Shape[1]))
			}
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

func copyFile(src, dst string, p *MergeProgress) (int64, error) {
	in, err := safetensors.OpenRegular(src)
	if err != nil {
		return 0, err
	}
	defer in.Close()
	tmp, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".tmp*")
	if err != nil {
		return 0, fmt.Errorf("write %s: %w", dst, bareErr(err))
	}
	n, err := io.Copy(tmp, io.TeeReader(in, progressWriter{p}))
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
		return 0, fmt.Errorf("copy %s to %s: %w", src, dst, bareErr(err))
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
		return nil, fmt.Errorf("merge: write %s: %w", path, bareErr(err))
	}
	o := &outFile{path: path, tmp: tmp, start: int64(len(prefix)), offset: map[string]safetensors.TensorInfo{}, done: map[string]bool{}}
	for _, t := range lay {
		o.offset[t.Name] = t
	}
	if _, err := tmp.WriteAt(prefix, 0); err != nil {
		o.abort()
		return nil, fmt.Errorf("merge: write %s: %w", path, bareErr(err))
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
	if err := checkFinite(name, t.DType, data); err != nil {
		return err
	}
	if _, err := o.tmp.WriteAt(data, o.start+t.Begin); err != nil {
		return fmt.Errorf("merge: write %s: tensor %s: %w", o.path, name, bareErr(err))
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
		return fmt.Errorf("merge: write %s: %w", o.path, bareErr(err))
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

// fuseDenseOne runs the fused pass on a copy of a bundled text encoder's
// plain weight t and returns its merged bytes (same dtype), report row and
// scratch.
func fuseDenseOne(ctx context.Context, in *mergeInput, sl *lora.SideLayer, t safetensors.TensorInfo, tile int) ([]byte, lora.LayerReport, int64, error) {
	b, err := in.f.TensorData(t)
	if err != nil {
		return nil, lora.LayerReport{}, 0, err
	}
	data := bytes.Clone(b)
	q := &lora.QLayer{Name: sl.Name, Out: sl.Out, In: sl.In, Dense: string(t.DType), Data: data, Raw: [][]byte{data}}
	p := &lora.Plan{Layers: []*lora.SideLayer{sl}, Report: &lora.Report{Layers: []lora.LayerReport{{Layer: sl.Name, Rank: sl.Rank, Dense: sl.Dense != nil}}}}
	if err := lora.Fuse(ctx, p, memStore{q}, nil, nil, lora.FuseOptions{TileElems: tile, CallerRestores: true}); err != nil {
		return nil, lora.LayerReport{}, 0, err
	}
	return data, p.Report.Layers[0], p.Report.PeakScratchBytes, nil
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
		if w == nil || !w.State.Nested { // nil: a text encoder's plain weight
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
	out, err := openOut(in, o, md, infos)
	if err != nil {
		return err
	}
	o.Progress.totals(len(plan.Layers), in.total)
	written := map[string]bool{}
	var dot, norm, diff float64
	rep := plan.Report
	rep.Mode = "fuse"
	rep.Warnings = nil
	var peak int64
	for li, sl := range plan.Layers {
		account := func(lr lora.LayerReport, scratch int64) {
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
		}
		if t, ok := in.dense[sl.Name+".weight"]; ok {
			plan.Materialize(sl)
			data, lr, scratch, err := fuseDenseOne(ctx, in, sl, t, o.TileElems)
			plan.Release(sl)
			if err == nil {
				err = out.put(t.Name, data)
			}
			if err != nil {
				out.abort()
				return fmt.Errorf("merge: %w", err)
			}
			account(lr, scratch)
			written[t.Name] = true
			o.Progress.layer(t.End - t.Begin)
			continue
		}
		w := in.byName[sl.Name+".weight"]
		plan.Materialize(sl)
		packed, am, lr, scratch, err := fuseOne(ctx, in, sl, w, o.TileElems, &buf)
		plan.Release(sl)
		if err != nil {
			out.abort()
			return fmt.Errorf("merge: %w", err)
		}
		account(lr, scratch)
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
		o.Progress.layer(in.weightBytes(w))
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
		o.Progress.bytes(int64(len(b)))
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
	out, err := openOut(in, o, md, infos)
	if err != nil {
		return err
	}
	o.Progress.totals(len(in.weights), in.total)
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
		o.Progress.layer(in.weightBytes(&w))
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
		if _, ok := in.dense[t.Name]; ok && plan != nil {
			// A bundled text encoder's plain weight keeps its dtype, the
			// deltas merged as the fused pass does.
			if sl := plan.Layer(strings.TrimSuffix(t.Name, ".weight")); sl != nil {
				if b, _, _, err = fuseDenseOne(ctx, in, sl, t, o.TileElems); err != nil {
					out.abort()
					return fmt.Errorf("merge: %w", err)
				}
			}
		}
		if err := out.put(t.Name, b); err != nil {
			out.abort()
			return err
		}
		o.Progress.bytes(int64(len(b)))
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
	for _, t := range ts {
		if err := checkFinite(t.Name, t.DType, t.Data); err != nil {
			return err
		}
	}
	if err := safetensors.WriteFile(o.Out, md, ts); err != nil {
		return fmt.Errorf("merge: write %s: %w", o.Out, bareErr(err))
	}
	o.Progress.totals(len(plan.Layers), 0)
	for range plan.Layers {
		o.Progress.layer(0)
	}
	return nil
}

// checkFinite refuses to write a tensor holding a NaN or an infinity: a
// merge that overflows (a huge strength, LoRA values near the float limits)
// fails naming the tensor instead of writing a poisoned file.
func checkFinite(name string, dt safetensors.DType, data []byte) error {
	if i, v := safetensors.FirstNonFinite(dt, data); i >= 0 {
		return fmt.Errorf("merge: tensor %s: element %d would be %v: %w (lower the strength or check the LoRA)", name, i, v, lora.ErrNonFinite)
	}
	return nil
}
