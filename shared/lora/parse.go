// Package lora owns LoRA files and the merge math: parsing every common key
// format (kohya, diffusers/PEFT, ComfyUI, XLabs, OneTrainer, LyCORIS) and
// network type (LoRA/LoCon, LoHa, LoKr, full diff, DoRA), mapping modules
// onto a model's layers in either Flux naming (fused ↔ split exactly, by row
// maps from shared/layout), the per-type scale, the side factors A_cat/B_cat
// with per-LoRA strength columns, the tiled fused pass with a journal for
// byte-exact restore, and the fidelity report.
//
// The lora-nf4 plugin runs this code. host/lora, also named lora, is the
// host's coordinator that calls the plugin (state, journal, rollback);
// lorawire, under this package, is the contract between the two.
package lora

import (
	"github.com/arenahost/arenahost/shared/lora/lorareport"

	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// KeyFormat is the key convention a LoRA file uses (lorareport's).
type KeyFormat = lorareport.KeyFormat

// Key formats detected by Parse.
const (
	FormatKohya      = lorareport.FormatKohya
	FormatOneTrainer = lorareport.FormatOneTrainer
	FormatLyCORIS    = lorareport.FormatLyCORIS
	FormatDiffusers  = lorareport.FormatDiffusers
	FormatComfyUI    = lorareport.FormatComfyUI
	FormatXLabs      = lorareport.FormatXLabs
	FormatBare       = lorareport.FormatBare
	FormatMixed      = lorareport.FormatMixed
)

// NetType is a LyCORIS network type (lorareport's).
type NetType = lorareport.NetType

// Network types.
const (
	TypeLoRA = lorareport.TypeLoRA
	TypeLoHa = lorareport.TypeLoHa
	TypeLoKr = lorareport.TypeLoKr
	TypeFull = lorareport.TypeFull
)

// Mat is a row-major float32 matrix.
type Mat struct {
	Rows, Cols int
	Data       []float32
}

func (m Mat) ok() bool { return m.Data != nil }

// Module is one LoRA module: the factors for one layer of the base model.
type Module struct {
	Key   string  `json:"key"`  // module key as stored ("lora_unet_double_blocks_0_img_attn_qkv")
	Type  NetType `json:"type"` // network type
	Rank  int     `json:"rank"` // 0 where not applicable
	Alpha float64 `json:"alpha"`
	// HasAlpha says the file gave an alpha for this module (key or PEFT
	// metadata); without one the scale is 1.
	HasAlpha bool    `json:"has_alpha"`
	Scale    float64 `json:"scale"` // per the network type's rule
	Out      int     `json:"out"`   // rows of ΔW
	In       int     `json:"in"`    // columns of ΔW (conv kernels flattened)
	DoRA     bool    `json:"dora"`

	Down, Up           Mat       `json:"-"`
	W1a, W1b, W2a, W2b Mat       `json:"-"` // LoHa
	K1, K1a, K1b       Mat       `json:"-"` // LoKr w1 (full or a@b)
	K2, K2a, K2b       Mat       `json:"-"` // LoKr w2
	Diff               Mat       `json:"-"`
	BiasDelta          []float32 `json:"-"` // lora_B.bias or diff_b
	Magnitude          []float32 `json:"-"` // DoRA magnitude (per output row or per input column)
	MagnitudePerInput  bool      `json:"-"`

	keys []string // file keys that made this module, for errors
}

// Meta is the training metadata a file carries (lorareport's).
type Meta = lorareport.Meta

// File is a parsed LoRA file.
type File struct {
	Path    string    `json:"path"`
	Format  KeyFormat `json:"format"`
	Meta    Meta      `json:"meta"`
	Modules []*Module `json:"modules"`
	// Unknown lists keys that belong to no module type this package applies
	// (reported as unmatched, never dropped silently).
	Unknown []string `json:"unknown,omitempty"`
}

// suffixes recognised after a module key, longest first within a family.
var suffixes = []string{
	".lora_down.weight", ".lora_up.weight", ".lora_mid.weight",
	".lora_A.default.weight", ".lora_B.default.weight",
	".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_A", ".lora_B",
	".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight",
	"_lora.down.weight", "_lora.up.weight", ".lora.down.weight", ".lora.up.weight",
	".down.weight", ".up.weight",
	".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
	".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_w1", ".lokr_w2", ".lokr_t2",
	".diff_b", ".diff", ".dora_scale", ".lora_magnitude_vector", ".magnitude", ".alpha",
}

// role is what a suffix means.
func role(suffix string) string {
	switch suffix {
	case ".lora_down.weight", ".lora_A.default.weight", ".lora_A.weight", ".lora_A", ".lora_linear_layer.down.weight", "_lora.down.weight", ".lora.down.weight", ".down.weight":
		return "down"
	case ".lora_up.weight", ".lora_B.default.weight", ".lora_B.weight", ".lora_B", ".lora_linear_layer.up.weight", "_lora.up.weight", ".lora.up.weight", ".up.weight":
		return "up"
	case ".dora_scale", ".lora_magnitude_vector", ".magnitude":
		return "dora"
	case ".lora_B.bias":
		return "up_bias"
	}
	return strings.TrimPrefix(suffix, ".")
}

// splitKey separates a file key into module key and role.
func splitKey(key string) (module, r string, ok bool) {
	// XLabs names end in "_lora", "_lora1", "_lora2" before ".down.weight";
	// keep those in the module key (the old diffusers "to_q_lora.down"
	// form drops it).
	if strings.Contains(key, ".processor.qkv_lora") || strings.Contains(key, ".processor.proj_lora") {
		for _, s := range []string{".down.weight", ".up.weight"} {
			if m, found := strings.CutSuffix(key, s); found {
				return m, role(s), true
			}
		}
	}
	for _, s := range suffixes {
		if m, found := strings.CutSuffix(key, s); found && m != "" {
			return m, role(s), true
		}
	}
	return "", "", false
}

// peftMeta is the part of diffusers' lora_adapter_metadata (a PEFT
// LoraConfig as JSON) that sets the scale.
type peftMeta struct {
	R            int                `json:"r"`
	LoraAlpha    float64            `json:"lora_alpha"`
	UseRSLoRA    bool               `json:"use_rslora"`
	AlphaPattern map[string]float64 `json:"alpha_pattern"`
	RankPattern  map[string]int     `json:"rank_pattern"`
}

// Parse reads a LoRA safetensors file. Every tensor is checked (shapes
// consistent within a module, alpha a scalar, no NaN or Inf); the first
// problem is returned naming the file and key. The file is closed before
// Parse returns; factors are copied to float32.
func Parse(path string) (*File, error) {
	st, err := safetensors.Open(path)
	if err != nil {
		return nil, fmt.Errorf("parse lora %s: %w", path, err)
	}
	defer st.Close()
	f := &File{Path: path}
	name := filepath.Base(path)
	fail := func(key string, format string, a ...any) error {
		return fmt.Errorf("parse lora %s: key %s: %s", name, key, fmt.Sprintf(format, a...))
	}
	if st.Metadata != nil {
		f.Meta = Meta{BaseModel: st.Metadata["ss_base_model_version"], Architecture: st.Metadata["modelspec.architecture"], NetworkModule: st.Metadata["ss_network_module"]}
	}
	var peft map[string]*peftMeta
	if raw, ok := st.Metadata["lora_adapter_metadata"]; ok {
		if peft, err = parsePEFTMeta(raw); err != nil {
			return nil, fail("__metadata__.lora_adapter_metadata", "%v", err)
		}
	}
	type tensor struct {
		key   string
		shape []int
		data  []float32
	}
	// Tensors are decoded (and checked finite) in parallel; errors are
	// reported in file order, as a sequential read would meet them.
	var infos []safetensors.TensorInfo
	var mods, roles []string
	for _, ti := range st.Tensors {
		mod, r, ok := splitKey(ti.Name)
		if !ok {
			f.Unknown = append(f.Unknown, ti.Name)
			continue
		}
		switch ti.DType {
		case safetensors.F32, safetensors.F16, safetensors.BF16:
		default:
			return nil, fail(ti.Name, "dtype %s, want F32, F16 or BF16", ti.DType)
		}
		infos, mods, roles = append(infos, ti), append(mods, mod), append(roles, r)
	}
	vals, errs := decodeAll(st, infos)
	byModule := map[string]map[string]tensor{}
	var order []string
	for i, ti := range infos {
		if errs[i] != nil {
			return nil, fail(ti.Name, "%v", errs[i])
		}
		mod, r := mods[i], roles[i]
		shape := make([]int, len(ti.Shape))
		for i, d := range ti.Shape {
			shape[i] = int(d)
		}
		if byModule[mod] == nil {
			byModule[mod] = map[string]tensor{}
			order = append(order, mod)
		}
		if prev, dup := byModule[mod][r]; dup {
			return nil, fail(ti.Name, "second %s tensor for module %s (first: %s)", r, mod, prev.key)
		}
		byModule[mod][r] = tensor{key: ti.Name, shape: shape, data: vals[i]}
	}
	sort.Strings(order)
	for _, modKey := range order {
		ts := byModule[modKey]
		m := &Module{Key: modKey}
		for _, t := range ts {
			m.keys = append(m.keys, t.key)
		}
		sort.Strings(m.keys)
		mat2 := func(r string) (Mat, error) { // a tensor as [dim0, prod(rest)]
			t, ok := ts[r]
			if !ok {
				return Mat{}, nil
			}
			if len(t.shape) < 1 {
				return Mat{}, fail(t.key, "0-d tensor, want a matrix")
			}
			rows, cols := t.shape[0], 1
			if len(t.shape) == 1 {
				rows, cols = 1, t.shape[0]
			}
			for _, d := range t.shape[1:] {
				cols *= d
			}
			return Mat{Rows: rows, Cols: cols, Data: t.data}, nil
		}
		var err error
		get := func(dst *Mat, r string) {
			if err == nil {
				*dst, err = mat2(r)
			}
		}
		get(&m.Down, "down")
		get(&m.Up, "up")
		get(&m.W1a, "hada_w1_a")
		get(&m.W1b, "hada_w1_b")
		get(&m.W2a, "hada_w2_a")
		get(&m.W2b, "hada_w2_b")
		get(&m.K1, "lokr_w1")
		get(&m.K1a, "lokr_w1_a")
		get(&m.K1b, "lokr_w1_b")
		get(&m.K2, "lokr_w2")
		get(&m.K2a, "lokr_w2_a")
		get(&m.K2b, "lokr_w2_b")
		get(&m.Diff, "diff")
		if err != nil {
			return nil, err
		}
		if t, ok := ts["alpha"]; ok {
			if len(t.data) != 1 {
				return nil, fail(t.key, "alpha has shape %v, want a scalar", t.shape)
			}
			m.Alpha, m.HasAlpha = float64(t.data[0]), true
		}
		for _, unsupported := range []string{"lora_mid", "hada_t1", "hada_t2", "lokr_t2"} {
			if t, ok := ts[unsupported]; ok {
				return nil, fail(t.key, "CP/Tucker-decomposed conv factors (%s) are not supported", unsupported)
			}
		}
		switch {
		case m.Down.ok() || m.Up.ok():
			m.Type = TypeLoRA
			if !m.Down.ok() || !m.Up.ok() {
				return nil, fail(m.keys[0], "module %s has only one of down/up", modKey)
			}
			if up := ts["up"]; len(up.shape) > 2 {
				for _, d := range up.shape[2:] {
					if d != 1 {
						return nil, fail(up.key, "up shape %v: only 1×1 up kernels are supported", up.shape)
					}
				}
				m.Up.Cols = up.shape[1]
			}
			if m.Up.Cols != m.Down.Rows {
				return nil, fail(ts["up"].key, "rank mismatch: up has %d columns, down has %d rows", m.Up.Cols, m.Down.Rows)
			}
			m.Rank, m.Out, m.In = m.Down.Rows, m.Up.Rows, m.Down.Cols
		case m.W1a.ok() || m.W1b.ok() || m.W2a.ok() || m.W2b.ok():
			m.Type = TypeLoHa
			if !(m.W1a.ok() && m.W1b.ok() && m.W2a.ok() && m.W2b.ok()) {
				return nil, fail(m.keys[0], "LoHa module %s needs hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b", modKey)
			}
			if m.W1a.Cols != m.W1b.Rows || m.W2a.Cols != m.W2b.Rows || m.W1a.Rows != m.W2a.Rows || m.W1b.Cols != m.W2b.Cols {
				return nil, fail(ts["hada_w1_a"].key, "LoHa shapes disagree: w1 [%d×%d]@[%d×%d], w2 [%d×%d]@[%d×%d]",
					m.W1a.Rows, m.W1a.Cols, m.W1b.Rows, m.W1b.Cols, m.W2a.Rows, m.W2a.Cols, m.W2b.Rows, m.W2b.Cols)
			}
			m.Rank, m.Out, m.In = m.W1b.Rows, m.W1a.Rows, m.W1b.Cols
		case m.K1.ok() || m.K1a.ok() || m.K2.ok() || m.K2a.ok():
			m.Type = TypeLoKr
			if err := m.checkLoKr(fail); err != nil {
				return nil, err
			}
		case m.Diff.ok():
			m.Type = TypeFull
			m.Out, m.In = m.Diff.Rows, m.Diff.Cols
		default:
			return nil, fail(m.keys[0], "module %s has no factors (only %s)", modKey, strings.Join(m.keys, ", "))
		}
		if t, ok := ts["diff_b"]; ok {
			if len(t.data) != m.Out {
				return nil, fail(t.key, "diff_b has %d elements, module has %d outputs", len(t.data), m.Out)
			}
			m.BiasDelta = t.data
		}
		if t, ok := ts["up_bias"]; ok {
			if len(t.data) != m.Out {
				return nil, fail(t.key, "lora_B.bias has %d elements, module has %d outputs", len(t.data), m.Out)
			}
			m.BiasDelta = t.data
		}
		if t, ok := ts["dora"]; ok {
			m.DoRA = true
			m.Magnitude = t.data
			switch {
			case len(t.data) == m.Out && (len(t.shape) == 1 || t.shape[0] == m.Out):
			case len(t.data) == m.In && (len(t.shape) == 1 || t.shape[len(t.shape)-1] == m.In):
				m.MagnitudePerInput = true
			default:
				return nil, fail(t.key, "DoRA magnitude shape %v fits neither %d outputs nor %d inputs", t.shape, m.Out, m.In)
			}
		}
		m.setScale(peftFor(peft, modKey))
		f.Modules = append(f.Modules, m)
	}
	if len(f.Modules) == 0 {
		return nil, fmt.Errorf("parse lora %s: no LoRA modules among %d tensors", name, len(st.Tensors))
	}
	f.Format = detectFormat(f.Modules)
	return f, nil
}

// parsePEFTMeta reads diffusers' lora_adapter_metadata: a PEFT LoraConfig
// as JSON, either bare (save_lora_adapter) or with every field prefixed by
// its component ("transformer.r", "unet.lora_alpha"; pipeline
// save_lora_weights). The result is keyed by component, "" for bare.
func parsePEFTMeta(raw string) (map[string]*peftMeta, error) {
	var flat map[string]json.RawMessage
	if err := json.Unmarshal([]byte(raw), &flat); err != nil {
		return nil, fmt.Errorf("bad JSON: %v", err)
	}
	groups := map[string]map[string]json.RawMessage{}
	for k, v := range flat {
		comp, field := "", k
		for _, c := range []string{"transformer", "unet", "text_encoder_2", "text_encoder"} {
			if rest, ok := strings.CutPrefix(k, c+"."); ok {
				comp, field = c, rest
				break
			}
		}
		if groups[comp] == nil {
			groups[comp] = map[string]json.RawMessage{}
		}
		groups[comp][field] = v
	}
	out := map[string]*peftMeta{}
	for comp, g := range groups {
		b, _ := json.Marshal(g)
		pm := &peftMeta{}
		if err := json.Unmarshal(b, pm); err != nil {
			return nil, fmt.Errorf("component %q: %v", comp, err)
		}
		out[comp] = pm
	}
	return out, nil
}

// peftFor picks the PEFT config that applies to a module key.
func peftFor(all map[string]*peftMeta, key string) *peftMeta {
	if len(all) == 0 {
		return nil
	}
	for _, c := range []string{"transformer", "unet", "text_encoder_2", "text_encoder"} {
		if strings.HasPrefix(key, c+".") {
			if pm, ok := all[c]; ok {
				return pm
			}
		}
	}
	if pm, ok := all[""]; ok {
		return pm
	}
	if len(all) == 1 {
		for _, pm := range all {
			return pm
		}
	}
	return nil
}

func (m *Module) checkLoKr(fail func(string, string, ...any) error) error {
	w1, w2 := m.K1, m.K2
	if !w1.ok() {
		if !m.K1a.ok() || !m.K1b.ok() || m.K1a.Cols != m.K1b.Rows {
			return fail(m.keys[0], "LoKr module %s: lokr_w1 missing and lokr_w1_a/_b absent or inconsistent", m.Key)
		}
		w1 = Mat{Rows: m.K1a.Rows, Cols: m.K1b.Cols}
		m.Rank = m.K1b.Rows
	}
	if !w2.ok() {
		if !m.K2a.ok() || !m.K2b.ok() || m.K2a.Cols != m.K2b.Rows {
			return fail(m.keys[0], "LoKr module %s: lokr_w2 missing and lokr_w2_a/_b absent or inconsistent", m.Key)
		}
		w2 = Mat{Rows: m.K2a.Rows, Cols: m.K2b.Cols}
		m.Rank = m.K2b.Rows // w2_b wins, as in LyCORIS
	}
	m.Out, m.In = w1.Rows*w2.Rows, w1.Cols*w2.Cols
	return nil
}

// setScale applies the per-type scale rule (reference table B.7): alpha/r
// for LoRA, LoHa and decomposed LoKr; 1 for full LoKr, diff, and files
// without alpha; alpha 0 means alpha = rank. PEFT metadata supplies
// lora_alpha/r (√r for rsLoRA) when the file has no alpha keys.
func (m *Module) setScale(peft *peftMeta) {
	m.Scale = 1
	if !m.HasAlpha && peft != nil && m.Type == TypeLoRA {
		alpha, r := peft.LoraAlpha, float64(m.Rank)
		for pat, a := range peft.AlphaPattern {
			if strings.HasSuffix(m.Key, pat) {
				alpha = a
			}
		}
		if alpha > 0 {
			m.Alpha, m.HasAlpha = alpha, true
			if peft.UseRSLoRA {
				m.Scale = alpha / math.Sqrt(r)
			} else {
				m.Scale = alpha / r
			}
		}
		return
	}
	switch m.Type {
	case TypeLoRA, TypeLoHa:
	case TypeLoKr:
		if m.K1.ok() && m.K2.ok() {
			return
		}
	default:
		return
	}
	if m.HasAlpha && m.Alpha != 0 && m.Rank > 0 {
		m.Scale = m.Alpha / float64(m.Rank)
	}
}

// detectFormat names the key convention from the module keys.
func detectFormat(mods []*Module) KeyFormat {
	seen := map[KeyFormat]bool{}
	for _, m := range mods {
		seen[formatOf(m)] = true
	}
	if len(seen) == 1 {
		for k := range seen {
			return k
		}
	}
	return FormatMixed
}

func formatOf(m *Module) KeyFormat {
	k := m.Key
	switch {
	case strings.Contains(k, ".processor."):
		return FormatXLabs
	case strings.HasPrefix(k, "lora_transformer_"):
		return FormatOneTrainer
	case strings.HasPrefix(k, "lora_unet_"), strings.HasPrefix(k, "lora_te"):
		return FormatKohya
	case strings.HasPrefix(k, "lycoris_"):
		return FormatLyCORIS
	case strings.HasPrefix(k, "diffusion_model."), strings.HasPrefix(k, "text_encoders."):
		return FormatComfyUI
	case strings.HasPrefix(k, "transformer."), strings.HasPrefix(k, "unet."), strings.HasPrefix(k, "text_encoder"), strings.HasPrefix(k, "base_model.model."):
		return FormatDiffusers
	}
	return FormatBare
}

// decodeAll decodes every tensor of infos to float32 on up to GOMAXPROCS
// goroutines, each reading the mapping under its own fault guard. errs[i]
// says why tensor i could not be read or holds a NaN or an infinity.
func decodeAll(st *safetensors.File, infos []safetensors.TensorInfo) (vals [][]float32, errs []error) {
	vals, errs = make([][]float32, len(infos)), make([]error, len(infos))
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(runtime.GOMAXPROCS(0), len(infos)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < len(infos); i = int(next.Add(1) - 1) {
				vals[i], errs[i] = decodeTensor(st, infos[i])
			}
		}()
	}
	wg.Wait()
	return vals, errs
}

// decodeTensor decodes one F32, F16 or BF16 tensor and checks that every
// value is finite.
func decodeTensor(st *safetensors.File, ti safetensors.TensorInfo) ([]float32, error) {
	vals := make([]float32, ti.NumElements())
	bad := -1
	err := st.ReadTensor(ti, func(data []byte) error {
		if int64(len(data)) != ti.NBytes() {
			return fmt.Errorf("%d bytes for %d %s values", len(data), len(vals), ti.DType)
		}
		bad = decodeFinite(vals, data, ti.DType)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read: %w", err)
	}
	if bad >= 0 {
		return nil, fmt.Errorf("non-finite value %v at element %d", vals[bad], bad)
	}
	return vals, nil
}

// decodeFinite widens the little-endian values of dt in src into dst, in
// one pass, and returns the index of the first NaN or ±Inf (all exponent
// bits set), or -1. len(src) is len(dst) values of dt.
func decodeFinite(dst []float32, src []byte, dt safetensors.DType) int {
	if len(dst) == 0 {
		return -1
	}
	switch dt {
	case safetensors.F32:
		src = src[:4*len(dst)]
		for i := range dst {
			u := binary.LittleEndian.Uint32(src[4*i:])
			if u&0x7f800000 == 0x7f800000 {
				dst[i] = math.Float32frombits(u)
				return i
			}
			dst[i] = math.Float32frombits(u)
		}
	case safetensors.BF16:
		src = src[:2*len(dst)]
		for i := range dst {
			u := uint16(src[2*i]) | uint16(src[2*i+1])<<8
			dst[i] = math.Float32frombits(uint32(u) << 16)
			if u&0x7f80 == 0x7f80 { // 8 exponent bits
				return i
			}
		}
	case safetensors.F16:
		half.DecodeF16(dst, src)
		src = src[:2*len(dst)]
		for i := range dst {
			if (uint16(src[2*i])|uint16(src[2*i+1])<<8)&0x7c00 == 0x7c00 { // 5 exponent bits
				return i
			}
		}
	}
	return -1
}
