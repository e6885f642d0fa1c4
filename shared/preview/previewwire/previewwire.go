// Package previewwire owns the contract between the host and a preview
// plugin (kind "preview", plugins/preview): the method names, the msgpack
// arguments and result of render, the limits both sides check, and what a
// pipeline may say about a latent it publishes (topic "latent"). The host's
// job manager and the preview plugin both import it, so the two cannot
// drift; it sits beside shared/lora/lorawire, the LoRA plugin's contract.
package previewwire

import (
	"fmt"
	"slices"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// Methods. A preview plugin serves "render" (the method picked by
// RenderArgs.Method) and one "render.<method>" per preview method it has;
// a job's preview.method names one of those.
const (
	MethodRender = "render"
	// MethodPrefix + a preview method is the RPC method that renders with it.
	MethodPrefix = "render."
	MethodFactor = "factor" // the published latent-to-RGB factors (ComfyUI Latent2RGB)
	MethodTAESD  = "taesd"  // the TAESD/TAEF1 decoder, when the plugin has its weights
)

// TopicLatent is the Publish topic of a pipeline's per-step latent
// (tensor #0, payload LatentPayload); TopicProgress carries step and total
// only.
const (
	TopicLatent   = "latent"
	TopicProgress = "progress"
)

// Limits and defaults both sides apply.
const (
	// MaxSideLimit is the largest output side a render accepts.
	MaxSideLimit = 8192
	// DefaultMaxSide caps the longer output side when MaxSide is 0.
	DefaultMaxSide = 512
	// MaxQuality is the highest JPEG quality; 0 means DefaultJPEGQuality.
	MaxQuality = 100
	// DefaultJPEGQuality is the JPEG quality when Quality is 0.
	DefaultJPEGQuality = 85
)

// Image formats of RenderArgs.Format and RenderResult.Format.
const (
	FormatJPEG = "jpeg"
	FormatPNG  = "png"
)

// Latent layouts of RenderArgs.Layout.
const (
	LayoutCHW    = "chw"    // [C H W] or [B C H W]
	LayoutTokens = "tokens" // diffusers' packed [N F] / [B N F]
)

// RenderArgs are the msgpack options of render and render.<method>. The
// latent is input tensor #0 (F32, BF16 or F16; read-only is enough).
type RenderArgs struct {
	// Method is "factor" (default) or "taesd"; render.<method> fixes it.
	Method string `msgpack:"method,omitempty"`
	// Family is sd15, sdxl, sd3, flux or flux2; "" detects it from the
	// channel count where that is unambiguous.
	Family string `msgpack:"family,omitempty"`
	// Layout is "chw" (default) or "tokens"; GridH/GridW give a token grid
	// that is not square.
	Layout string `msgpack:"layout,omitempty"`
	GridH  int    `msgpack:"grid_h,omitempty"`
	GridW  int    `msgpack:"grid_w,omitempty"`
	// MaxSide caps the longer side (0: DefaultMaxSide; at most
	// MaxSideLimit).
	MaxSide int `msgpack:"max_side,omitempty"`
	// Format is "jpeg" (default) or "png"; Quality the JPEG quality (0:
	// DefaultJPEGQuality; at most MaxQuality).
	Format  string `msgpack:"format,omitempty"`
	Quality int    `msgpack:"quality,omitempty"`
	// Filter is "nearest" (default) or "bilinear".
	Filter string `msgpack:"filter,omitempty"`
}

// RenderResult is render's msgpack result: the encoded image and what it is.
type RenderResult struct {
	Image    []byte  `msgpack:"image"`
	Format   string  `msgpack:"format"` // FormatJPEG or FormatPNG
	Width    int     `msgpack:"width"`
	Height   int     `msgpack:"height"`
	Family   string  `msgpack:"family"`
	Method   string  `msgpack:"method"`
	RenderMS float64 `msgpack:"render_ms"`
	EncodeMS float64 `msgpack:"encode_ms"`
}

// LatentPayload is what a pipeline may say about a latent it publishes
// (all optional): its architecture or preview family, its layout ("chw",
// or "tokens"/"packed"/"nf"/"bnf" for packed tokens) and the token grid.
type LatentPayload struct {
	Arch   string `msgpack:"arch"`
	Family string `msgpack:"family"`
	Layout string `msgpack:"layout"`
	GridH  int    `msgpack:"grid_h"`
	GridW  int    `msgpack:"grid_w"`
}

// LatentDTypes are the element types a latent may have.
var LatentDTypes = []pluginv1.DType{pluginv1.DType_DTYPE_F32, pluginv1.DType_DTYPE_BF16, pluginv1.DType_DTYPE_F16}

// LatentDType reports whether d is one of LatentDTypes.
func LatentDType(d pluginv1.DType) bool { return slices.Contains(LatentDTypes, d) }

// Families maps the arch names pipelines publish to preview families.
var Families = map[string]string{
	"flux1": "flux", "flux": "flux", "flux2": "flux2", "sd15": "sd15", "sd1": "sd15", "sdxl": "sdxl", "sd3": "sd3",
}

// RenderLayout returns the render layout a LatentPayload's layout names:
// LayoutTokens for the packed spellings, else LayoutCHW.
func (p LatentPayload) RenderLayout() string {
	switch p.Layout {
	case LayoutTokens, "packed", "nf", "bnf":
		return LayoutTokens
	}
	return LayoutCHW
}

// RenderFamily is the preview family the payload names (Family first, then
// Arch), or "" to let the plugin detect it.
func (p LatentPayload) RenderFamily() string {
	if f := Families[p.Family]; f != "" {
		return f
	}
	return Families[p.Arch]
}

// NormalizeFormat returns the canonical spelling of a format ("" and "jpg"
// are "jpeg"), or an error naming the accepted ones.
func NormalizeFormat(f string) (string, error) {
	switch f {
	case "", FormatJPEG, "jpg":
		return FormatJPEG, nil
	case FormatPNG:
		return FormatPNG, nil
	}
	return "", fmt.Errorf("%q unknown (want %s or %s)", f, FormatJPEG, FormatPNG)
}

// CheckMaxSide checks a max_side value against [0, MaxSideLimit].
func CheckMaxSide(n int) error {
	if n < 0 || n > MaxSideLimit {
		return fmt.Errorf("%d out of range [0, %d]", n, MaxSideLimit)
	}
	return nil
}

// CheckQuality checks a JPEG quality against [0, MaxQuality].
func CheckQuality(q int) error {
	if q < 0 || q > MaxQuality {
		return fmt.Errorf("%d out of range [0, %d]", q, MaxQuality)
	}
	return nil
}
