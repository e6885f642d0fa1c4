// Package layout owns the naming and shapes of the model architectures
// arenahost serves: Flux in BFL layout (fused qkv and linear1) and in
// diffusers layout (split to_q/to_k/to_v, proj_mlp), and the SDXL and SD1.5
// UNets in LDM and diffusers naming. It answers three questions from tensor
// names and shapes alone, without reading any tensor data: which layout a
// checkpoint uses (Detect), which linear layers a model of a given
// configuration has and with which shapes (FluxConfig), and how a layer in
// one naming corresponds, row by row, to layers in the other (RowMap), which
// is what LoRA key mapping (shared/lora) is built on.
package layout

import (
	"fmt"
	"strings"
)

// Layout names a checkpoint layout: an architecture plus a naming scheme.
type Layout int

// The layouts Detect recognises.
const (
	Unknown       Layout = iota
	FluxBFL              // double_blocks.N.img_attn.qkv, single_blocks.N.linear1 (fused)
	FluxDiffusers        // transformer_blocks.N.attn.to_q, single_transformer_blocks.N.proj_mlp (split)
	SDXL                 // SDXL UNet, LDM (input_blocks…) or diffusers (down_blocks…) naming
	SD15                 // SD1.x UNet, LDM or diffusers naming
	SD3                  // SD3/SD3.5 MMDiT: diffusers (transformer_blocks…, pos_embed) or SAI (joint_blocks…) naming
	Flux2                // FLUX.2 transformer, diffusers naming (double_stream_modulation_img…)
)

var layoutNames = [...]string{"unknown", "flux-bfl", "flux-diffusers", "sdxl", "sd15", "sd3", "flux2"}

// String returns the layout's stable name ("flux-bfl").
func (l Layout) String() string {
	if l < 0 || int(l) >= len(layoutNames) {
		return fmt.Sprintf("layout(%d)", int(l))
	}
	return layoutNames[l]
}

// MarshalText writes the layout's stable name (for JSON and msgpack reports).
func (l Layout) MarshalText() ([]byte, error) { return []byte(l.String()), nil }

// UnmarshalText parses a name written by MarshalText.
func (l *Layout) UnmarshalText(b []byte) error {
	for i, n := range layoutNames {
		if n == string(b) {
			*l = Layout(i)
			return nil
		}
	}
	return fmt.Errorf("parse layout: unknown name %q", b)
}

// IsFlux reports whether the layout is one of the Flux namings.
func (l Layout) IsFlux() bool { return l == FluxBFL || l == FluxDiffusers }

// Kind says what a tensor is for.
type Kind int

// Tensor kinds. Only KindLinear weights are quantized to NF4 by arenahost.
const (
	KindOther     Kind = iota
	KindLinear         // a Linear layer's weight, shape [out, in]
	KindBias           // a Linear layer's bias, shape [out]
	KindNormScale      // an RMSNorm scale, shape [head_dim]
	KindConv           // a convolution weight, shape [out, in, k, k]
)

var kindNames = [...]string{"other", "linear", "bias", "norm-scale", "conv"}

// String returns the kind's stable name.
func (k Kind) String() string {
	if k < 0 || int(k) >= len(kindNames) {
		return fmt.Sprintf("kind(%d)", int(k))
	}
	return kindNames[k]
}

// MarshalText writes the kind's stable name.
func (k Kind) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

// LayerSpec is one tensor of a model: its full name, its shape and its kind.
type LayerSpec struct {
	Name  string `json:"name" msgpack:"name"`
	Shape []int  `json:"shape" msgpack:"shape"`
	Kind  Kind   `json:"kind" msgpack:"kind"`
}

// Elements returns the product of the shape.
func (s LayerSpec) Elements() int64 {
	n := int64(1)
	for _, d := range s.Shape {
		n *= int64(d)
	}
	return n
}

// Linear is one Linear layer: Name is the module path (the weight key minus
// ".weight"), the weight has shape [Out, In], and Bias says whether a bias
// [Out] exists.
type Linear struct {
	Name string `json:"name" msgpack:"name"`
	Out  int    `json:"out" msgpack:"out"`
	In   int    `json:"in" msgpack:"in"`
	Bias bool   `json:"bias" msgpack:"bias"`
}

// Params returns the layer's parameter count, bias included.
func (l Linear) Params() int64 {
	n := int64(l.Out) * int64(l.In)
	if l.Bias {
		n += int64(l.Out)
	}
	return n
}

// KohyaName returns the flattened name kohya's sd-scripts give a module:
// prefix plus the module path with every "." replaced by "_"
// (KohyaName("lora_unet_", "double_blocks.0.img_attn.qkv") =
// "lora_unet_double_blocks_0_img_attn_qkv"). The flattening loses
// information, so mapping back always goes through a table built from the
// model's own names.
func KohyaName(prefix, module string) string {
	return prefix + strings.ReplaceAll(module, ".", "_")
}
