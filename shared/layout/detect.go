package layout

import (
	"fmt"
	"strings"
)

// Naming is the module naming a checkpoint uses within its layout.
type Naming string

// Namings.
const (
	NamingBFL       Naming = "bfl"       // Flux reference names (double_blocks…)
	NamingDiffusers Naming = "diffusers" // diffusers names (transformer_blocks…, down_blocks…)
	NamingLDM       Naming = "ldm"       // Stability's LDM/sgm UNet names (input_blocks…)
	NamingSAI       Naming = "sai"       // Stability's SD3 MMDiT names (joint_blocks…)
)

// Info is what Detect learns from a checkpoint's tensor names.
type Info struct {
	Layout Layout `json:"layout" msgpack:"layout"`
	Naming Naming `json:"naming" msgpack:"naming"`
	// Prefix is what precedes the model's module paths in the file
	// ("model.diffusion_model." in Forge/ComfyUI single files, "" in bare BFL
	// and diffusers files).
	Prefix string `json:"prefix" msgpack:"prefix"`
}

// bnbSideSuffixes mark the bitsandbytes quantization side tensors stored
// next to a weight; they say nothing about the layout.
var bnbSideSuffixes = []string{".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"}

// IsQuantSideKey reports whether name is a bitsandbytes side tensor
// (X.weight.absmax, X.weight.quant_map, X.weight.nested_absmax,
// X.weight.nested_quant_map, X.weight.quant_state.bitsandbytes__nf4/__fp4).
func IsQuantSideKey(name string) bool {
	if strings.Contains(name, ".quant_state.") {
		return true
	}
	for _, s := range bnbSideSuffixes {
		if strings.HasSuffix(name, s) {
			return true
		}
	}
	return false
}

// probe is one distinguishing key: a module path fragment that appears in
// exactly one layout. The fragment must start a module path (after an
// optional prefix) so that "transformer_blocks." does not match inside
// "single_transformer_blocks.".
type probe struct {
	key    string
	layout Layout
	naming Naming
}

// The distinguishing keys, per layout:
//   - Flux BFL: double_blocks.N.img_attn.qkv / single_blocks.N.linear1 (fused
//     layers only BFL has), checked as path starts "double_blocks." and
//     "single_blocks." with those leaf modules.
//   - Flux diffusers: single_transformer_blocks.* or
//     transformer_blocks.N.attn.add_q_proj / x_embedder.
//   - SDXL: label_emb (LDM) or add_embedding (diffusers), the class/size
//     conditioning SD1.5 lacks.
//   - SD1.5: attention at the first UNet level, input_blocks.1.1 (LDM) or
//     down_blocks.0.attentions (diffusers); SDXL's first level has none.
var probes = []probe{
	{"double_blocks.", FluxBFL, NamingBFL},
	{"single_blocks.", FluxBFL, NamingBFL},
	{"single_transformer_blocks.", FluxDiffusers, NamingDiffusers},
	{"x_embedder.", FluxDiffusers, NamingDiffusers},
	{"label_emb.", SDXL, NamingLDM},
	{"add_embedding.", SDXL, NamingDiffusers},
	{"input_blocks.1.1.", SD15, NamingLDM},
	{"down_blocks.0.attentions.", SD15, NamingDiffusers},
	{"pos_embed.proj.", SD3, NamingDiffusers},
	{"joint_blocks.", SD3, NamingSAI},
	{"double_stream_modulation_img.", Flux2, NamingDiffusers},
	{"single_stream_modulation.", Flux2, NamingDiffusers},
}

// unet probes that confirm a UNet without telling SDXL from SD1.5.
var unetProbes = []struct {
	key    string
	naming Naming
}{{"input_blocks.", NamingLDM}, {"down_blocks.", NamingDiffusers}}

// fluxLeaves are the leaf modules that confirm a BFL block key.
var fluxLeaves = []string{".img_attn.qkv.", ".linear1.", ".img_mod.lin.", ".modulation.lin."}

// Detect returns the layout of a checkpoint from its tensor names.
func Detect(names []string) (Layout, error) {
	info, err := DetectInfo(names)
	return info.Layout, err
}

// DetectInfo returns the layout, naming and key prefix of a checkpoint from
// its tensor names, ignoring bitsandbytes side keys. It fails when no layout
// matches or when names of two layouts are mixed.
func DetectInfo(names []string) (Info, error) {
	type hit struct {
		info  Info
		count int
		first string
	}
	var hits []hit
	add := func(i Info, name string) {
		for k := range hits {
			if hits[k].info == i {
				hits[k].count++
				return
			}
		}
		hits = append(hits, hit{info: i, count: 1, first: name})
	}
	unet := map[Info]string{}
	for _, name := range names {
		if IsQuantSideKey(name) {
			continue
		}
		// A bundled text encoder's or VAE's layers (a VAE's down_blocks.)
		// say nothing about the diffusion model's layout.
		if c, _, ok := ComponentOf(name); ok && c.Kind != "diffusion" {
			continue
		}
		for _, p := range probes {
			pre, ok := modulePrefix(name, p.key)
			if !ok {
				continue
			}
			if p.layout == FluxBFL && !hasAny(name, fluxLeaves) {
				continue
			}
			// SD3's SAI names have a patch-embedding conv x_embedder.proj;
			// Flux's x_embedder is a Linear.
			if p.key == "x_embedder." && strings.Contains(name, "x_embedder.proj.") {
				continue
			}
			add(Info{Layout: p.layout, Naming: p.naming, Prefix: pre}, name)
		}
		for _, p := range unetProbes {
			if pre, ok := modulePrefix(name, p.key); ok {
				unet[Info{Naming: p.naming, Prefix: pre}] = name
			}
		}
	}
	// FLUX.2 shares x_embedder and single_transformer_blocks with FLUX.1's
	// diffusers names; its own modulation layers decide.
	for _, h := range hits {
		if h.info.Layout != Flux2 {
			continue
		}
		kept := hits[:0]
		for _, o := range hits {
			if !(o.info.Layout == FluxDiffusers && o.info.Prefix == h.info.Prefix) {
				kept = append(kept, o)
			}
		}
		hits = kept
		break
	}
	// A UNet with no SD1.5 probe but UNet names is SDXL only if label/add
	// embedding was seen; SD1.5's own probe must be present otherwise.
	switch len(hits) {
	case 0:
		if len(unet) > 0 {
			for i, n := range unet {
				return Info{}, fmt.Errorf("detect layout: UNet names (%s, naming %s) but neither SDXL's label_emb/add_embedding nor SD1.5's first-level attention (input_blocks.1.1 / down_blocks.0.attentions)", n, i.Naming)
			}
		}
		return Info{}, fmt.Errorf("detect layout: no known layout among %d tensor names (looked for double_blocks.N.img_attn.qkv, single_transformer_blocks, x_embedder, label_emb, add_embedding, input_blocks.1.1, down_blocks.0.attentions)", len(names))
	case 1:
		return hits[0].info, nil
	}
	var parts []string
	for _, h := range hits {
		parts = append(parts, fmt.Sprintf("%s/%s prefix %q (%d names, e.g. %s)", h.info.Layout, h.info.Naming, h.info.Prefix, h.count, h.first))
	}
	return Info{}, fmt.Errorf("detect layout: names of several layouts mixed: %s", strings.Join(parts, "; "))
}

// modulePrefix reports whether key starts a module path inside name: at the
// start of name or right after a ".", returning what precedes it.
func modulePrefix(name, key string) (string, bool) {
	for from := 0; ; {
		i := strings.Index(name[from:], key)
		if i < 0 {
			return "", false
		}
		i += from
		if i == 0 || name[i-1] == '.' {
			return name[:i], true
		}
		from = i + 1
	}
}

func hasAny(s string, subs []string) bool {
	for _, x := range subs {
		if strings.Contains(s, x) {
			return true
		}
	}
	return false
}
