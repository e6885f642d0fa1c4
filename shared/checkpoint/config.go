package checkpoint

import (
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/arenahost/arenahost/shared/layout"
)

// shapeSet is a model's tensor shapes by name (prefix stripped, 4-bit
// weights at their logical shapes).
type shapeSet map[string][]int

// dim returns dimension i of name's shape; ok is false when the tensor is
// absent or has fewer dimensions.
func (s shapeSet) dim(name string, i int) (int, bool) {
	sh, ok := s[name]
	if !ok || i >= len(sh) {
		return 0, false
	}
	return sh[i], true
}

// count returns 1 + the highest N among names "<prefix>N.…", 0 when none.
func (s shapeSet) count(prefix string) int {
	n := 0
	for name := range s {
		rest, ok := strings.CutPrefix(name, prefix)
		if !ok {
			continue
		}
		idx, _, _ := strings.Cut(rest, ".")
		if i, err := strconv.Atoi(idx); err == nil && i+1 > n {
			n = i + 1
		}
	}
	return n
}

// has reports whether any tensor name starts with prefix.
func (s shapeSet) has(prefix string) bool {
	for name := range s {
		if strings.HasPrefix(name, prefix) {
			return true
		}
	}
	return false
}

// first returns the sorted-first name that starts with prefix and ends
// with suffix.
func (s shapeSet) first(prefix, suffix string) (string, bool) {
	var hits []string
	for name := range s {
		if strings.HasPrefix(name, prefix) && strings.HasSuffix(name, suffix) {
			hits = append(hits, name)
		}
	}
	if len(hits) == 0 {
		return "", false
	}
	sort.Strings(hits)
	return hits[0], true
}

// cfgInt reads an integer config field; ok is false when it is absent,
// null or not a number.
func cfgInt(cfg map[string]any, key string) (int, bool) {
	v, ok := cfg[key].(float64)
	return int(v), ok
}

// cfgInts reads a config field that is an integer or a list of integers
// (diffusers accepts both for per-block fields); a single integer stands
// for every one of n blocks.
func cfgInts(cfg map[string]any, key string, n int) ([]int, bool) {
	switch v := cfg[key].(type) {
	case float64:
		out := make([]int, n)
		for i := range out {
			out[i] = int(v)
		}
		return out, true
	case []any:
		out := make([]int, 0, len(v))
		for _, e := range v {
			f, ok := e.(float64)
			if !ok {
				return nil, false
			}
			out = append(out, int(f))
		}
		return out, true
	}
	return nil, false
}

// cfgStrings reads a list-of-strings config field.
func cfgStrings(cfg map[string]any, key string) ([]string, bool) {
	v, ok := cfg[key].([]any)
	if !ok {
		return nil, false
	}
	out := make([]string, 0, len(v))
	for _, e := range v {
		s, ok := e.(string)
		if !ok {
			return nil, false
		}
		out = append(out, s)
	}
	return out, true
}

// classFor is the diffusers class (prefix of _class_name) each layout's
// weights belong to.
var classFor = map[layout.Layout][]string{
	layout.FluxDiffusers: {"FluxTransformer2DModel", "ChromaTransformer2DModel"},
	layout.Flux2:         {"Flux2Transformer2DModel"},
	layout.SD3:           {"SD3Transformer2DModel"},
	layout.SDXL:          {"UNet2DConditionModel"},
	layout.SD15:          {"UNet2DConditionModel"},
}

// classMismatch names a config class that belongs to another layout than
// the weights' (an SD3 config beside a UNet's weights); a class arenahost
// does not know is not judged.
func classMismatch(cfg map[string]any, l layout.Layout) []string {
	cls, _ := cfg["_class_name"].(string)
	known, mine := false, false
	for ll, names := range classFor {
		for _, n := range names {
			if n == cls {
				known = true
				mine = mine || ll == l
			}
		}
	}
	if !known || mine || classFor[l] == nil {
		return nil
	}
	return []string{fmt.Sprintf("_class_name = %s but the weights are a %s model (want %s)", cls, l, strings.Join(classFor[l], " or "))}
}

// unetMismatches compares a diffusers UNet2DConditionModel config with the
// UNet's weights (diffusers names): channels, levels, block kinds, layers
// per block, transformer depth, cross-attention and add-embedding widths.
func unetMismatches(cfg map[string]any, s shapeSet) []string {
	var bad []string
	want := func(key string, have int, ok bool, what string) {
		v, present := cfgInt(cfg, key)
		if present && ok && v != have {
			bad = append(bad, fmt.Sprintf("%s = %d but %s", key, v, fmt.Sprintf(what, have)))
		}
	}
	in, ok := s.dim("conv_in.weight", 1)
	want("in_channels", in, ok, "conv_in.weight has %d input channels")
	out, ok := s.dim("conv_out.weight", 0)
	want("out_channels", out, ok, "conv_out.weight has %d output channels")
	levels := s.count("down_blocks.")
	if ch, ok := cfgInts(cfg, "block_out_channels", levels); ok {
		if len(ch) != levels {
			bad = append(bad, fmt.Sprintf("block_out_channels has %d levels but the weights have %d (down_blocks.N)", len(ch), levels))
		} else {
			for i, c := range ch {
				key := "down_blocks." + strconv.Itoa(i) + ".resnets.0.conv1.weight"
				if have, ok := s.dim(key, 0); ok && have != c {
					bad = append(bad, fmt.Sprintf("block_out_channels[%d] = %d but %s has %d output channels", i, c, key, have))
				}
			}
		}
	}
	for _, side := range []string{"down", "up"} {
		types, ok := cfgStrings(cfg, side+"_block_types")
		n := s.count(side + "_blocks.")
		if !ok {
			continue
		}
		if len(types) != n {
			bad = append(bad, fmt.Sprintf("%s_block_types has %d blocks but the weights have %d (%s_blocks.N)", side, len(types), n, side))
			continue
		}
		for i, ty := range types {
			p := side + "_blocks." + strconv.Itoa(i) + ".attentions."
			if cross, has := strings.Contains(ty, "CrossAttn"), s.has(p); cross != has {
				state := "has no " + p + "N"
				if has {
					state = "has " + p + "N"
				}
				bad = append(bad, fmt.Sprintf("%s_block_types[%d] = %s but the weights' %s_blocks.%d %s", side, i, ty, side, i, state))
			}
		}
	}
	if lp, ok := cfgInts(cfg, "layers_per_block", levels); ok && len(lp) == levels {
		for i, want := range lp {
			p := "down_blocks." + strconv.Itoa(i) + ".resnets."
			if have := s.count(p); have > 0 && have != want {
				bad = append(bad, fmt.Sprintf("layers_per_block = %d (level %d) but the weights have %d %sN", want, i, have, p))
				break
			}
		}
	}
	if tl, ok := cfgInts(cfg, "transformer_layers_per_block", levels); ok && len(tl) == levels {
		for i, want := range tl {
			p := "down_blocks." + strconv.Itoa(i) + ".attentions.0.transformer_blocks."
			if have := s.count(p); have > 0 && have != want {
				bad = append(bad, fmt.Sprintf("transformer_layers_per_block[%d] = %d but the weights have %d %sN", i, want, have, p))
			}
		}
	}
	if name, ok := s.first("", ".attn2.to_k.weight"); ok {
		have, _ := s.dim(name, 1)
		if cd, ok := cfgInts(cfg, "cross_attention_dim", 1); ok {
			for _, v := range cd {
				if v != have {
					bad = append(bad, fmt.Sprintf("cross_attention_dim = %d but %s is %d wide", v, name, have))
					break
				}
			}
		}
	}
	add := s.has("add_embedding.")
	if et, ok := cfg["addition_embed_type"]; ok {
		typ, _ := et.(string)
		if (typ == "text_time") != add {
			state := "no add_embedding"
			if add {
				state = "add_embedding.linear_1"
			}
			bad = append(bad, fmt.Sprintf("addition_embed_type = %s but the weights have %s", jsonValue(et), state))
		}
	}
	pin, ok := s.dim("add_embedding.linear_1.weight", 1)
	want("projection_class_embeddings_input_dim", pin, ok, "add_embedding.linear_1.weight is %d wide")
	if lin, ok := cfg["use_linear_projection"].(bool); ok {
		if name, ok := s.first("", ".proj_in.weight"); ok {
			if isLinear := len(s[name]) == 2; isLinear != lin {
				bad = append(bad, fmt.Sprintf("use_linear_projection = %v but %s has shape %v", lin, name, s[name]))
			}
		}
	}
	return bad
}

// sd3Mismatches compares a diffusers SD3Transformer2DModel config with the
// MMDiT's weights (diffusers names).
func sd3Mismatches(cfg map[string]any, s shapeSet) []string {
	var bad []string
	want := func(key string, have int, ok bool, what string) {
		v, present := cfgInt(cfg, key)
		if present && ok && v != have {
			bad = append(bad, fmt.Sprintf("%s = %d but %s", key, v, fmt.Sprintf(what, have)))
		}
	}
	const pe = "pos_embed.proj.weight"
	in, ok := s.dim(pe, 1)
	want("in_channels", in, ok, pe+" has %d input channels")
	patch, okp := s.dim(pe, 2)
	want("patch_size", patch, okp, pe+" has %d×%[1]d patches")
	want("num_layers", s.count("transformer_blocks."), s.has("transformer_blocks."), "the weights have %d transformer_blocks.N")
	hidden, okh := s.dim(pe, 0)
	heads, ok1 := cfgInt(cfg, "num_attention_heads")
	hd, ok2 := cfgInt(cfg, "attention_head_dim")
	if ok1 && ok2 && okh && heads*hd != hidden {
		bad = append(bad, fmt.Sprintf("num_attention_heads × attention_head_dim = %d × %d = %d but %s makes the hidden width %d", heads, hd, heads*hd, pe, hidden))
	}
	const nq = "transformer_blocks.0.attn.norm_q.weight"
	qn, hasQN := s.dim(nq, 0)
	want("attention_head_dim", qn, hasQN, nq+" is %d wide")
	if v, present := cfg["qk_norm"]; present {
		if set := v != nil; set != hasQN {
			state := "no " + nq
			if hasQN {
				state = nq
			}
			bad = append(bad, fmt.Sprintf("qk_norm = %s but the weights have %s", jsonValue(v), state))
		}
	}
	jd, ok := s.dim("context_embedder.weight", 1)
	want("joint_attention_dim", jd, ok, "context_embedder.weight is %d wide")
	cp, ok := s.dim("context_embedder.weight", 0)
	want("caption_projection_dim", cp, ok, "context_embedder.weight has %d rows")
	pd, ok := s.dim("time_text_embed.text_embedder.linear_1.weight", 1)
	want("pooled_projection_dim", pd, ok, "time_text_embed.text_embedder.linear_1.weight is %d wide")
	if rows, ok := s.dim("proj_out.weight", 0); ok && okp && patch > 0 {
		want("out_channels", rows/(patch*patch), true, "proj_out.weight has %d channels per patch position")
	}
	if grid, ok := s.dim("pos_embed.pos_embed", 1); ok {
		if m, present := cfgInt(cfg, "pos_embed_max_size"); present && m*m != grid {
			bad = append(bad, fmt.Sprintf("pos_embed_max_size = %d but pos_embed.pos_embed holds %d positions (%d² = %d)", m, grid, m, m*m))
		}
	}
	if v, present := cfg["dual_attention_layers"]; present {
		var have []int
		for i := 0; i < s.count("transformer_blocks."); i++ {
			if s.has("transformer_blocks." + strconv.Itoa(i) + ".attn2.") {
				have = append(have, i)
			}
		}
		cfgLayers, _ := cfgInts(cfg, "dual_attention_layers", 0)
		if v == nil {
			cfgLayers = nil
		}
		if fmt.Sprint(cfgLayers) != fmt.Sprint(have) {
			bad = append(bad, fmt.Sprintf("dual_attention_layers = %v but the weights have attn2 in blocks %v (transformer_blocks.N.attn2)", cfgLayers, have))
		}
	}
	return bad
}

// jsonValue writes a config value as config.json has it (null, "rms_norm").
func jsonValue(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	return string(b)
}
