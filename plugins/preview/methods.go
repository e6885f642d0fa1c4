package main

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/arenahost/arenahost/plugins/preview/render"
	"github.com/arenahost/arenahost/sdk"
	"github.com/arenahost/arenahost/shared/preview/previewwire"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// Preview methods a job may pick. Each is served as the RPC method
// "render.<name>"; "render" takes the name in its options.
const (
	MethodFactor = previewwire.MethodFactor
	MethodTAESD  = previewwire.MethodTAESD
)

// RenderArgs and RenderResult are the msgpack arguments and result of
// render and render.<method>, defined once in the shared contract.
type (
	RenderArgs   = previewwire.RenderArgs
	RenderResult = previewwire.RenderResult
)

// renderer holds what render needs beyond its arguments: the optional
// decoder, loaded once at start.
type renderer struct {
	mu      sync.Mutex
	decoder *render.Decoder
}

func (r *renderer) loadDecoder(path string) error {
	d, err := render.LoadDecoder(path)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.decoder = d
	r.mu.Unlock()
	return nil
}

// methods lists the preview methods this process serves.
func (r *renderer) methods() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.decoder != nil {
		return []string{MethodFactor, MethodTAESD}
	}
	return []string{MethodFactor}
}

func (r *renderer) register(p *sdk.Plugin) {
	sdk.Method(p, "render", func(ctx context.Context, c *sdk.Call, a RenderArgs) (RenderResult, error) {
		return r.render(c, a)
	}, sdk.Doc("render latent tensor #0 to a JPEG/PNG preview; options: method, family, layout, max_side, format, quality, filter"))
	for _, m := range r.methods() {
		doc := "render with the published latent-to-RGB factors (ComfyUI Latent2RGB)"
		if m == MethodTAESD {
			doc = "render with the TAESD/TAEF1 decoder " + r.decoder.Name() + " at reduced size"
		}
		sdk.Method(p, "render."+m, func(ctx context.Context, c *sdk.Call, a RenderArgs) (RenderResult, error) {
			if a.Method != "" && a.Method != m {
				return RenderResult{}, fmt.Errorf("args.method: %q but the method is render.%s: %w", a.Method, m, sdk.ErrInvalidArgument)
			}
			a.Method = m
			return r.render(c, a)
		}, sdk.Doc(doc))
	}
}

var dtypes = map[pluginv1.DType]render.DType{
	pluginv1.DType_DTYPE_F32:  render.Float32,
	pluginv1.DType_DTYPE_BF16: render.BFloat16,
	pluginv1.DType_DTYPE_F16:  render.Float16,
}

// options checks the arguments and turns them into render options.
func (r *renderer) options(a RenderArgs) (render.Options, render.Format, render.Layout, error) {
	var o render.Options
	var f render.Format
	bad := func(field string, v any, want string) error {
		return fmt.Errorf("args.%s: %v unknown (want %s): %w", field, v, want, sdk.ErrInvalidArgument)
	}
	switch a.Method {
	case "", MethodFactor:
	case MethodTAESD:
		r.mu.Lock()
		o.Decoder = r.decoder
		r.mu.Unlock()
		if o.Decoder == nil {
			return o, f, 0, fmt.Errorf("args.method: taesd needs a decoder weights file (set %s): %w", EnvDecoder, sdk.ErrFailedPrecondition)
		}
	default:
		return o, f, 0, bad("method", fmt.Sprintf("%q", a.Method), strings.Join(r.methods(), " or "))
	}
	if a.Family != "" {
		if _, err := render.FactorsFor(render.Family(a.Family)); err != nil {
			return o, f, 0, fmt.Errorf("args.family: %w: %w", err, sdk.ErrInvalidArgument)
		}
		o.Family = render.Family(a.Family)
	}
	if err := previewwire.CheckMaxSide(a.MaxSide); err != nil {
		return o, f, 0, fmt.Errorf("args.max_side: %w: %w", err, sdk.ErrInvalidArgument)
	}
	o.MaxSide = a.MaxSide
	switch a.Filter {
	case "", "nearest":
		o.Filter = render.Nearest
	case "bilinear":
		o.Filter = render.Bilinear
	default:
		return o, f, 0, bad("filter", fmt.Sprintf("%q", a.Filter), "nearest or bilinear")
	}
	switch format, err := previewwire.NormalizeFormat(a.Format); {
	case err != nil:
		return o, f, 0, fmt.Errorf("args.format: %w: %w", err, sdk.ErrInvalidArgument)
	case format == previewwire.FormatPNG:
		f.Kind = render.PNG
	default:
		f.Kind = render.JPEG
	}
	if err := previewwire.CheckQuality(a.Quality); err != nil {
		return o, f, 0, fmt.Errorf("args.quality: %w: %w", err, sdk.ErrInvalidArgument)
	}
	f.Quality = a.Quality
	var layout render.Layout
	switch a.Layout {
	case "", previewwire.LayoutCHW:
		layout = render.ChannelMajor
	case previewwire.LayoutTokens:
		layout = render.TokenMajor
	default:
		return o, f, 0, bad("layout", fmt.Sprintf("%q", a.Layout), "chw or tokens")
	}
	if a.GridH < 0 || a.GridW < 0 {
		return o, f, 0, fmt.Errorf("args.grid_h/grid_w: %d×%d negative: %w", a.GridH, a.GridW, sdk.ErrInvalidArgument)
	}
	return o, f, layout, nil
}

func (r *renderer) render(c *sdk.Call, a RenderArgs) (RenderResult, error) {
	o, f, layout, err := r.options(a)
	if err != nil {
		return RenderResult{}, err
	}
	d, err := c.InputAt(0)
	if err != nil {
		return RenderResult{}, fmt.Errorf("latent: %w", err)
	}
	dt, ok := dtypes[d.GetDtype()]
	if !ok {
		return RenderResult{}, fmt.Errorf("tensor %q: dtype %v unsupported (want F32, BF16 or F16): %w", d.GetName(), d.GetDtype(), sdk.ErrInvalidArgument)
	}
	data, err := c.Bytes(d)
	if err != nil {
		return RenderResult{}, fmt.Errorf("tensor %q: %w", d.GetName(), err)
	}
	shape := make([]int, len(d.GetShape()))
	for i, s := range d.GetShape() {
		shape[i] = int(s)
	}
	lat := render.Latent{Data: data, DType: dt, Shape: shape, Layout: layout, GridH: a.GridH, GridW: a.GridW}
	fam := o.Family
	if fam == "" && len(shape) >= 2 {
		ch := shape[len(shape)-1] // tokens: features
		if layout == render.ChannelMajor && len(shape) >= 3 {
			ch = shape[len(shape)-3]
		}
		fam, _, _ = render.Detect(ch, layout) // Render reports an undetectable family
	}
	t0 := time.Now()
	img, err := render.Render(lat, o)
	if err != nil {
		return RenderResult{}, fmt.Errorf("render tensor %q: %w: %w", d.GetName(), err, sdk.ErrInvalidArgument)
	}
	t1 := time.Now()
	out, err := render.Encode(img, f)
	if err != nil {
		return RenderResult{}, fmt.Errorf("encode %v: %w", f.Kind, err)
	}
	method := a.Method
	if method == "" {
		method = MethodFactor
	}
	b := img.Bounds()
	return RenderResult{
		Image: out, Format: f.Kind.String(), Width: b.Dx(), Height: b.Dy(), Family: string(fam), Method: method,
		RenderMS: float64(t1.Sub(t0).Microseconds()) / 1000, EncodeMS: float64(time.Since(t1).Microseconds()) / 1000,
	}, nil
}
