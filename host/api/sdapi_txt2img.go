package api

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/jpeg"
	"image/png"
	"math"
	"math/rand/v2"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/arenahost/arenahost/host/job"
	"github.com/arenahost/arenahost/host/lora"
)

// Txt2ImgRequest is the part of A1111's StableDiffusionTxt2ImgProcessingAPI
// arenahost reads; the many other fields clients send (sampler, CFG scale,
// hires fix …) are accepted and ignored.
type Txt2ImgRequest struct {
	Prompt         string `json:"prompt"`
	NegativePrompt string `json:"negative_prompt,omitempty"`
	Steps          int    `json:"steps,omitempty"`
	Seed           int64  `json:"seed"`
	Width          int    `json:"width,omitempty"`
	Height         int    `json:"height,omitempty"`
	BatchSize      int    `json:"batch_size,omitempty"`
	NIter          int    `json:"n_iter,omitempty"`
}

// Txt2ImgResponse is A1111's answer: base64 PNGs, the parameters used and
// an info JSON string.
type Txt2ImgResponse struct {
	Images     []string       `json:"images"`
	Parameters Txt2ImgRequest `json:"parameters"`
	Info       string         `json:"info"`
}

// Txt2ImgInfo is the info string's content.
type Txt2ImgInfo struct {
	Prompt   string       `json:"prompt"`
	Seed     int64        `json:"seed"`
	AllSeeds []int64      `json:"all_seeds"`
	Width    int          `json:"width"`
	Height   int          `json:"height"`
	Steps    int          `json:"steps"`
	Pipeline string       `json:"pipeline"`
	Jobs     []string     `json:"jobs"`
	LoRAs    []lora.Entry `json:"loras"`
}

// A1111 defaults and arenahost's bounds for txt2img.
const (
	txt2imgSteps   = 20
	txt2imgSide    = 512
	txt2imgMaxSide = 2048
)

// loraTag matches A1111's <lora:NAME:WEIGHT> (the weight is optional, and
// a third field, the text-encoder weight, is accepted and ignored).
var loraTag = regexp.MustCompile(`<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>`)

// ParseLoRATags returns the prompt without its <lora:…> tags and the LoRAs
// they name with their weights (1 when absent). A LoRA named twice keeps
// its last weight.
func ParseLoRATags(prompt string) (string, []ApplyLoRA, error) {
	var out []ApplyLoRA
	index := map[string]int{}
	for _, m := range loraTag.FindAllStringSubmatch(prompt, -1) {
		name := strings.TrimSpace(m[1])
		w := 1.0
		if s := strings.TrimSpace(m[2]); s != "" {
			v, err := strconv.ParseFloat(s, 64)
			if err != nil {
				return "", nil, badRequest("prompt: tag %s: weight %q is not a number", m[0], s)
			}
			w = v
		}
		if i, ok := index[name]; ok {
			out[i].Strength = &w
			continue
		}
		index[name] = len(out)
		out = append(out, ApplyLoRA{Name: name, Strength: &w})
	}
	clean := strings.Join(strings.Fields(loraTag.ReplaceAllString(prompt, " ")), " ")
	return clean, out, nil
}

// pipeline returns the configured pipeline plugin, else the first serving
// plugin of kind "pipeline".
func (a *API) pipeline() (string, error) {
	if a.opts.Pipeline != "" {
		return a.opts.Pipeline, nil
	}
	for _, p := range a.s.Plugins.Status() {
		if p.Kind == "pipeline" && p.State == "serving" {
			return p.Name, nil
		}
	}
	return "", &StatusError{Status: http.StatusConflict, Code: "not_serving",
		Err: errors.New("txt2img: no pipeline plugin is serving (install one under --plugins, or name it with --pipeline)")}
}

// txt2img applies the prompt's <lora:NAME:WEIGHT> set in side mode (an
// empty set removes the LoRAs), runs the pipeline plugin as one job per
// image with steps, seed, width and height, and answers the final frame
// of each, decoded by the preview plugin and scaled to width×height, as a
// base64 PNG. The jobs are ordinary jobs: /sdapi/v1/progress and the job
// routes show them while they run.
func (a *API) txt2img(w http.ResponseWriter, r *http.Request) {
	var req Txt2ImgRequest
	if err := decodeLenient(r, &req); err != nil { // lenient: A1111 clients send many fields
		a.fail(w, r, err)
		return
	}
	if req.Steps == 0 {
		req.Steps = txt2imgSteps
	}
	if req.Width == 0 {
		req.Width = txt2imgSide
	}
	if req.Height == 0 {
		req.Height = txt2imgSide
	}
	n, err := imageCount(req.BatchSize, req.NIter, a.opts.MaxImages)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	req.BatchSize, req.NIter = max(req.BatchSize, 1), max(req.NIter, 1)
	switch {
	case req.Steps < 1 || req.Steps > 1000:
		a.fail(w, r, badRequest("steps: %d must be in 1..1000", req.Steps))
		return
	case req.Width%16 != 0 || req.Height%16 != 0 || req.Width < 16 || req.Height < 16 || req.Width > txt2imgMaxSide || req.Height > txt2imgMaxSide:
		a.fail(w, r, badRequest("width×height: %d×%d must be multiples of 16 from 16 to %d", req.Width, req.Height, txt2imgMaxSide))
		return
	}
	if req.Seed < 0 {
		req.Seed = rand.Int64N(1 << 32) // A1111: -1 is a random seed
	}
	prompt, tags, err := ParseLoRATags(req.Prompt)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	pipe, err := a.pipeline()
	if err != nil {
		a.fail(w, r, err)
		return
	}
	info := Txt2ImgInfo{Prompt: prompt, Seed: req.Seed, Width: req.Width, Height: req.Height, Steps: req.Steps, Pipeline: pipe}
	if a.s.LoRAs != nil {
		lr := lora.Request{Mode: lora.ModeSide}
		for _, t := range tags {
			p, err := a.LoRAPath(t.Name)
			if err != nil {
				a.fail(w, r, fmt.Errorf("prompt: <lora:%s>: %w", t.Name, err))
				return
			}
			lr.LoRAs = append(lr.LoRAs, lora.Entry{Name: t.Name, Path: p, Strength: *t.Strength})
		}
		res, err := a.s.LoRAs.Apply(r.Context(), lr)
		a.Metrics.ObserveApply("apply", lora.ModeSide, resElapsed(res), err)
		if err != nil {
			a.fail(w, r, loraStatus(err))
			return
		}
		info.LoRAs = res.LoRAs
	} else if len(tags) > 0 {
		a.fail(w, r, &StatusError{Status: http.StatusServiceUnavailable, Code: "no_lora_engine", Err: errors.New("prompt has <lora:…> tags but this host runs no LoRA coordinator")})
		return
	}
	out := Txt2ImgResponse{Images: []string{}, Parameters: req}
	for i := range n {
		seed := req.Seed + int64(i)
		b64, id, err := a.runImage(r, pipe, prompt, seed, req)
		if id != "" {
			info.Jobs = append(info.Jobs, id)
		}
		if err != nil {
			a.fail(w, r, err)
			return
		}
		info.AllSeeds = append(info.AllSeeds, seed)
		out.Images = append(out.Images, b64)
	}
	ib, _ := json.Marshal(info)
	out.Info = string(ib)
	writeJSON(w, http.StatusOK, out)
}

func resElapsed(res *lora.Result) (d time.Duration) {
	if res != nil {
		d = res.Elapsed
	}
	return d
}

// runImage runs one pipeline job and returns its final frame as a base64
// PNG of the requested size.
func (a *API) runImage(r *http.Request, pipe, prompt string, seed int64, req Txt2ImgRequest) (string, string, error) {
	j, err := a.s.Jobs.Create(r.Context(), job.Spec{
		Pipeline: pipe,
		Params:   map[string]any{"prompt": prompt, "steps": req.Steps, "seed": seed, "width": req.Width, "height": req.Height},
		Preview:  job.Preview{Format: "png", MaxSide: max(req.Width, req.Height)},
	})
	if err != nil {
		return "", "", fmt.Errorf("txt2img: %w", jobErr(err))
	}
	select {
	case <-j.Done():
	case <-r.Context().Done():
		j.Cancel()
		return "", j.ID(), fmt.Errorf("txt2img: job %s: %w", j.ID(), r.Context().Err())
	}
	s := j.Snapshot()
	if s.State == job.StateFailed {
		// The pipeline plugin failed the run: an upstream failure, not
		// the host's and not the client's.
		return "", j.ID(), &StatusError{Status: http.StatusBadGateway, Code: "pipeline_failed",
			Err: fmt.Errorf("txt2img: job %s failed in pipeline %s: %s", j.ID(), pipe, s.Error)}
	}
	if s.State != job.StateDone {
		return "", j.ID(), fmt.Errorf("txt2img: job %s %s: %s", j.ID(), s.State, s.Error)
	}
	// A pipeline that decodes its own images (the diffusers pipeline's
	// VAE) returns them as PNG bytes under "images": those are the answer.
	// Otherwise the final latent, decoded by the preview plugin, is.
	if img, ok, err := resultImage(s.Result); ok || err != nil {
		if err != nil {
			return "", j.ID(), fmt.Errorf("txt2img: job %s: %w", j.ID(), err)
		}
		return encodePNG(j.ID(), resize(img, req.Width, req.Height))
	}
	f := j.Frame()
	if f == nil || f.Step != f.Total {
		return "", j.ID(), &StatusError{Status: http.StatusServiceUnavailable, Code: "plugin_unavailable",
			Err: fmt.Errorf("txt2img: job %s: no final preview frame: the preview plugin did not render the last step (is it serving? see GET /v1/plugins)", j.ID())}
	}
	img, err := decodeFrame(f)
	if err != nil {
		return "", j.ID(), fmt.Errorf("txt2img: job %s: %w", j.ID(), err)
	}
	return encodePNG(j.ID(), resize(img, req.Width, req.Height))
}

// encodePNG answers img as a base64 PNG for job id.
func encodePNG(id string, img image.Image) (string, string, error) {
	var buf bytes.Buffer
	if err := (&png.Encoder{CompressionLevel: png.BestSpeed}).Encode(&buf, img); err != nil {
		return "", id, fmt.Errorf("txt2img: job %s: encode png: %w", id, err)
	}
	return base64.StdEncoding.EncodeToString(buf.Bytes()), id, nil
}

// resultImage returns the first PNG of a pipeline result's "images" list;
// ok is false when the result has none.
func resultImage(result any) (img image.Image, ok bool, err error) {
	m, _ := result.(map[string]any)
	list, _ := m["images"].([]any)
	if len(list) == 0 {
		return nil, false, nil
	}
	b, isBytes := list[0].([]byte)
	if !isBytes {
		return nil, true, fmt.Errorf("result field \"images\"[0]: %T, want PNG bytes", list[0])
	}
	img, err = png.Decode(bytes.NewReader(b))
	if err != nil {
		return nil, true, fmt.Errorf("result field \"images\"[0]: decode png: %w", err)
	}
	return img, true, nil
}

func decodeFrame(f *job.Frame) (image.Image, error) {
	if f.Format == "png" {
		img, err := png.Decode(bytes.NewReader(f.Data))
		if err != nil {
			return nil, fmt.Errorf("frame %d: decode png: %w", f.ID, err)
		}
		return img, nil
	}
	img, err := jpeg.Decode(bytes.NewReader(f.Data))
	if err != nil {
		return nil, fmt.Errorf("frame %d: decode jpeg: %w", f.ID, err)
	}
	return img, nil
}

// resize scales src to w×h bilinearly (sample centres aligned, edges
// clamped); src already of that size is returned as is.
func resize(src image.Image, w, h int) image.Image {
	b := src.Bounds()
	sw, sh := b.Dx(), b.Dy()
	if sw == w && sh == h {
		return src
	}
	dst := image.NewNRGBA(image.Rect(0, 0, w, h))
	at := func(x, y int) [4]float64 {
		x, y = min(max(x, 0), sw-1), min(max(y, 0), sh-1)
		c := color.NRGBAModel.Convert(src.At(b.Min.X+x, b.Min.Y+y)).(color.NRGBA)
		return [4]float64{float64(c.R), float64(c.G), float64(c.B), float64(c.A)}
	}
	for y := range h {
		fy := (float64(y)+0.5)*float64(sh)/float64(h) - 0.5
		y0 := int(math.Floor(fy))
		ty := fy - float64(y0)
		for x := range w {
			fx := (float64(x)+0.5)*float64(sw)/float64(w) - 0.5
			x0 := int(math.Floor(fx))
			tx := fx - float64(x0)
			p00, p10, p01, p11 := at(x0, y0), at(x0+1, y0), at(x0, y0+1), at(x0+1, y0+1)
			var px [4]uint8
			for k := range 4 {
				v := (p00[k]*(1-tx)+p10[k]*tx)*(1-ty) + (p01[k]*(1-tx)+p11[k]*tx)*ty
				px[k] = uint8(min(max(v+0.5, 0), 255))
			}
			dst.SetNRGBA(x, y, color.NRGBA{px[0], px[1], px[2], px[3]})
		}
	}
	return dst
}
