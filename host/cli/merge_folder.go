package cli

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// A merge writes one safetensors file, or, when --out does not end in
// .safetensors, a diffusers model folder that from_pretrained loads as it
// is: config.json (the input folder's, or one derived from the weights for
// a bare Flux file) with a quantization_config that describes the written
// weights, and diffusion_pytorch_model.safetensors, or above
// --max-shard-size the shards diffusion_pytorch_model-0000N-of-0000M
// .safetensors with their .index.json. A 4-bit weight's tensors (packed
// codes, absmax, quant map, quant state) always share a shard: diffusers
// reads a pre-quantized weight's state from the shard that holds it.

// defaultMaxShard is diffusers' save_pretrained default, "10GB".
const defaultMaxShard = 10_000_000_000

// mergeOut is where a merge writes its tensors, each exactly once.
type mergeOut interface {
	put(name string, data []byte) error
	commit() error
	abort()
}

// isFolderOut reports whether o writes a folder.
func isFolderOut(o MergeOptions) bool {
	return o.As != "lora" && !strings.HasSuffix(strings.ToLower(o.Out), ".safetensors")
}

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

// openOut creates o.Out for the tensors infos: a file or a folder.
func openOut(in *mergeInput, o MergeOptions, md map[string]string, infos []safetensors.TensorInfo) (mergeOut, error) {
	if !isFolderOut(o) {
		return createOut(o.Out, md, infos)
	}
	return createFolder(in, o, md, infos)
}

// outFolder writes the shards into a temporary sibling folder and renames
// it to the output on commit.
type outFolder struct {
	path, tmp string
	shards    []*outFile
	shardOf   map[string]*outFile
	files     map[*outFile]string // shard → its file name
	config    []byte
	index     []byte // nil when unsharded
}

func createFolder(in *mergeInput, o MergeOptions, md map[string]string, infos []safetensors.TensorInfo) (*outFolder, error) {
	info := in.model.Info
	diffusersNamed := info.Naming == layout.NamingDiffusers && info.Prefix == ""
	if !diffusersNamed {
		return nil, fmt.Errorf("merge: --out %s is a folder, which diffusers loads only with its own module names; %s is %s-named (prefix %q): write a .safetensors file instead", o.Out, o.Model, info.Naming, info.Prefix)
	}
	cfg, err := folderConfig(in, o.As)
	if err != nil {
		return nil, err
	}
	if st, err := os.Stat(o.Out); err == nil {
		ents, _ := os.ReadDir(o.Out)
		if !st.IsDir() || len(ents) > 0 {
			return nil, fmt.Errorf("merge: --out %s exists and is not an empty folder", o.Out)
		}
	}
	max := o.MaxShardSize
	if max <= 0 {
		max = defaultMaxShard
	}
	// Group a 4-bit weight's tensors; everything else stands alone.
	group := map[string]string{}
	if o.As == "nf4" {
		for _, w := range in.weights {
			for _, k := range w.Keys.All() {
				group[k] = w.Name
			}
		}
	}
	names := make([]string, len(infos))
	sizes := make([]int64, len(infos))
	for i, t := range infos {
		names[i], sizes[i] = t.Name, t.NBytes()
	}
	plan, err := safetensors.PlanShards("diffusion_pytorch_model", names, sizes, max, func(n string) string {
		if g := group[n]; g != "" {
			return g
		}
		return n
	})
	if err != nil {
		return nil, fmt.Errorf("merge: %w", err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(filepath.Clean(o.Out)), "."+filepath.Base(o.Out)+".tmp*")
	if err != nil {
		return nil, fmt.Errorf("merge: %w", err)
	}
	f := &outFolder{path: o.Out, tmp: tmp, shardOf: map[string]*outFile{}, files: map[*outFile]string{}, config: cfg}
	md2 := map[string]string{"format": "pt"}
	for k, v := range md {
		md2[k] = v
	}
	for k, idx := range plan.Shards {
		name := plan.Names[k]
		sh := make([]safetensors.TensorInfo, len(idx))
		for j, i := range idx {
			sh[j] = infos[i]
		}
		of, err := createOut(filepath.Join(tmp, name), md2, sh)
		if err != nil {
			f.abort()
			return nil, err
		}
		f.shards = append(f.shards, of)
		f.files[of] = name
		for _, t := range sh {
			f.shardOf[t.Name] = of
		}
	}
	f.index = plan.Index
	return f, nil
}

func (f *outFolder) put(name string, data []byte) error {
	of, ok := f.shardOf[name]
	if !ok {
		return fmt.Errorf("merge: tensor %s is not in the output layout", name)
	}
	return of.put(name, data)
}

func (f *outFolder) commit() error {
	for i, of := range f.shards {
		if err := of.commit(); err != nil {
			f.shards = f.shards[i+1:]
			f.abort()
			return err
		}
	}
	f.shards = nil
	write := func(name string, b []byte) error {
		return os.WriteFile(filepath.Join(f.tmp, name), append(b, '\n'), 0o644)
	}
	err := write("config.json", f.config)
	if err == nil && f.index != nil {
		err = write("diffusion_pytorch_model.safetensors.index.json", f.index)
	}
	if err == nil {
		err = os.Chmod(f.tmp, 0o755)
	}
	if err == nil && isDir(f.path) {
		err = os.Remove(f.path) // empty: checked when created
	}
	if err == nil {
		err = os.Rename(f.tmp, f.path)
	}
	if err != nil {
		os.RemoveAll(f.tmp)
		return fmt.Errorf("merge: write %s: %w", f.path, err)
	}
	return nil
}

func (f *outFolder) abort() {
	for _, of := range f.shards {
		of.abort()
	}
	os.RemoveAll(f.tmp)
}

// folderConfig is the output's config.json: the input folder's, or one
// derived from a Flux model's layers, with quantization_config describing
// the written weights (removed for --as bf16).
func folderConfig(in *mergeInput, as string) ([]byte, error) {
	cfg := map[string]any{}
	if in.f.Config != nil {
		// json.Number keeps each number as written: diffusers wants
		// llm_int8_threshold as 6.0, never 6.
		dec := json.NewDecoder(bytes.NewReader(in.f.Config))
		dec.UseNumber()
		if err := dec.Decode(&cfg); err != nil {
			return nil, fmt.Errorf("merge: %s: %w", in.f.ConfigPath, err)
		}
	} else {
		c := in.model.Flux
		if c == nil || !in.model.Info.Layout.IsFlux() {
			return nil, fmt.Errorf("merge: %s has no config.json and is not a Flux model whose config arenahost can derive: write a .safetensors file, or merge the model's folder", in.f.Path)
		}
		if c.HeadDim != 128 {
			return nil, fmt.Errorf("merge: %s has no config.json and head_dim %d (diffusers' rope axes are known for 128 only): merge the model's folder instead", in.f.Path, c.HeadDim)
		}
		cls := "FluxTransformer2DModel"
		if c.Chroma {
			cls = "ChromaTransformer2DModel"
		}
		cfg = map[string]any{"_class_name": cls, "patch_size": 1, "in_channels": c.InChannels, "num_layers": c.DoubleBlocks,
			"num_single_layers": c.SingleBlocks, "attention_head_dim": c.HeadDim, "num_attention_heads": c.Heads(),
			"joint_attention_dim": c.ContextDim, "axes_dims_rope": []int{16, 56, 56}}
		if c.OutCh > 0 {
			cfg["out_channels"] = c.OutCh
		}
		if c.Chroma {
			cfg["approximator_num_channels"], cfg["approximator_hidden_dim"], cfg["approximator_layers"] = c.Approximator.InDim, c.Approximator.Hidden, c.Approximator.Layers
		} else {
			cfg["pooled_projection_dim"], cfg["guidance_embeds"] = c.VecDim, c.Guidance
		}
	}
	if as != "nf4" || len(in.weights) == 0 {
		delete(cfg, "quantization_config")
	} else {
		st := in.weights[0].State
		q, _ := cfg["quantization_config"].(map[string]any)
		if q == nil {
			q = map[string]any{"quant_method": "bitsandbytes", "load_in_8bit": false, "llm_int8_threshold": json.Number("6.0"),
				"llm_int8_skip_modules": nil, "llm_int8_enable_fp32_cpu_offload": false, "llm_int8_has_fp16_weight": false,
				"bnb_4bit_quant_storage": "uint8", "_load_in_8bit": false}
		}
		q["load_in_4bit"], q["_load_in_4bit"] = true, true
		q["bnb_4bit_quant_type"] = string(st.QuantType)
		q["bnb_4bit_use_double_quant"] = st.Nested
		if _, ok := q["bnb_4bit_compute_dtype"]; !ok {
			q["bnb_4bit_compute_dtype"] = string(st.DType)
		}
		cfg["quantization_config"] = q
	}
	return json.MarshalIndent(cfg, "", "  ")
}

// byteSize is a flag holding a size such as "10GB" (10⁹ bytes), "500MiB"
// (2²⁰) or plain bytes, as huggingface_hub's max_shard_size reads it.
type byteSize struct{ v *int64 }

func (b byteSize) String() string {
	if b.v == nil || *b.v == 0 {
		return "10GB"
	}
	return strconv.FormatInt(*b.v, 10)
}

func (b byteSize) Set(s string) error {
	units := []struct {
		suffix string
		mult   int64
	}{{"KIB", 1 << 10}, {"MIB", 1 << 20}, {"GIB", 1 << 30}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"B", 1}}
	t := strings.ToUpper(strings.TrimSpace(s))
	mult := int64(1)
	for _, u := range units {
		if rest, ok := strings.CutSuffix(t, u.suffix); ok {
			t, mult = strings.TrimSpace(rest), u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(t, 64)
	if err != nil || f <= 0 {
		return fmt.Errorf("size %q: want a positive number with an optional unit (KB, MB, GB, KiB, MiB, GiB)", s)
	}
	*b.v = int64(f * float64(mult))
	return nil
}
