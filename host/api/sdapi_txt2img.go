package api

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"image"
	"image/color"
	"image/jpeg"
	"image/png"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/arenahost/arenahost/host/job"
	"github.com/arenahost/arenahost/host/lora"
	v1 "github.com/arenahost/arenahost/sdk/api"
)

// Txt2ImgRequest is the part of A1111's StableDiffusionTxt2ImgProcessingAPI
// arenahost reads. The many other fields clients send are accepted; those
// that would change the image in A1111 (sampler, CFG scale, hires fix,
// override_settings …) are reported as warnings in info (errors in strict
// mode, see OptionStrict).
type Txt2ImgRequest struct {
	Prompt           string         `json:"prompt"`
	NegativePrompt   string         `json:"negative_prompt,omitempty"`
	Steps            int            `json:"steps,omitempty"`
	Seed             int64          `json:"seed"`
	Width            int            `json:"width,omitempty"`
	Height           int            `json:"height,omitempty"`
	BatchSize        int            `json:"batch_size,omitempty"`
	NIter            int            `json:"n_iter,omitempty"`
	SamplerName      string         `json:"sampler_name,omitempty"`
	OverrideSettings map[string]any `json:"override_settings,omitempty"`
}

// Txt2ImgResponse is A1111's answer: base64 PNGs, the parameters used (the
// request's fields with width, height and seed as run) and an info JSON
// string.
type Txt2ImgResponse struct {
	Images     []string       `json:"images"`
	Parameters map[string]any `json:"parameters"`
	Info       string         `json:"info"`
}

// Txt2ImgInfo is the info string's content: A1111's keys, plus what
// arenahost adds (pipeline, jobs, loras, warnings, interrupted, skipped).
type Txt2ImgInfo struct {
	Prompt      string           `json:"prompt"`
	AllPrompts  []string         `json:"all_prompts"`
	Negative    string           `json:"negative_prompt"`
	Seed        int64            `json:"seed"`
	AllSeeds    []int64          `json:"all_seeds"`
	Width       int              `json:"width"`
	Height      int              `json:"height"`
	Steps       int              `json:"steps"`
	SamplerName string           `json:"sampler_name"`
	BatchSize   int              `json:"batch_size"`
	SDModelName string           `json:"sd_model_name"`
	Infotexts   []string         `json:"infotexts"`
	Pipeline    string           `json:"pipeline"`
	Jobs        []string         `json:"jobs"`
	LoRAs       []v1.AppliedLoRA `json:"loras"`
	// Warnings lists what was ignored or changed: unknown LoRA tags,
	// settings the pipeline cannot honour, sizes rounded.
	Warnings []string `json:"warnings"`
	// Interrupted: /sdapi/v1/interrupt (or a cancelled job) stopped the
	// request; Images holds the images finished before it and, last, the
	// interrupted image's newest preview when it had one (PartialImage is
	// its index, -1 when none).
	Interrupted  bool `json:"interrupted"`
	PartialImage int  `json:"partial_image"`
	// Skipped counts images /sdapi/v1/skip dropped.
	Skipped int `json:"skipped"`
	// Conditioning is what the pipeline conditioned the image on, from its
	// job result: "text_encoders" (the model's CLIP-L and T5 encoded the
	// prompt) or "stand-in" (embeddings seeded from the prompt text; a
	// warning says why). Empty when the pipeline does not say.
	Conditioning string `json:"conditioning,omitempty"`
	// Decoder is what decoded the latents, from the job result: "vae" (the
	// model's own VAE) or "stand-in" (a small random VAE: the image means
	// nothing; a warning says why). Empty when the pipeline does not say.
	Decoder string `json:"decoder,omitempty"`
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
func ParseLoRATags(prompt string) (string, []v1.ApplyLoRA, error) {
	var out []v1.ApplyLoRA
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
		out = append(out, v1.ApplyLoRA{Name: name, Strength: &w})
	}
	clean := strings.Join(strings.Fields(loraTag.ReplaceAllString(prompt, " ")), " ")
	return clean, out, nil
}

// txt2imgIgnored lists request fields arenahost does not act on, with the
// value that means "off" in A1111: any other value is a warning.
var txt2imgIgnored = []struct {
	field string
	off   func(v any) bool
}{
	{"enable_hr", isFalse},
	{"cfg_scale", func(v any) bool { f, ok := v.(float64); return ok && f == 7 }},
	{"restore_faces", isFalse},
	{"tiling", isFalse},
	{"styles", isEmpty},
	{"subseed_strength", func(v any) bool { f, ok := v.(float64); return ok && f == 0 }},
	{"alwayson_scripts", isEmpty},
	{"script_name", isEmpty},
	{"script_args", isEmpty},
	{"scheduler", func(v any) bool {
		s, _ := v.(string)
		return v == nil || s == "" || strings.EqualFold(s, "automatic") || s == "simple"
	}},
	{"negative_prompt", isEmpty},
}

func isFalse(v any) bool { b, ok := v.(bool); return v == nil || ok && !b }

func isEmpty(v any) bool {
	switch x := v.(type) {
	case nil:
		return true
	case string:
		return x == ""
	case []any:
		return len(x) == 0
	case map[string]any:
		return len(x) == 0
	}
	return false
}

// roundSide rounds a side to the pipeline's multiple of 16 within 16..max.
func roundSide(v int) int {
	r := (v + 8) / 16 * 16
	return min(max(r, 16), txt2imgMaxSide)
}

// txt2img applies the prompt's <lora:NAME:WEIGHT> set in side mode (an
// empty set removes the LoRAs), runs the pipeline plugin as one job per
// image with steps, seed, width and height on the selected checkpoint, and
// answers the final frame of each, decoded by the preview plugin and scaled
// to width×height, as a base64 PNG. The jobs are ordinary jobs:
// /sdapi/v1/progress and the job routes show them while they run.
//
// As A1111: an unknown LoRA tag is a warning; a size that is not a
// multiple of 16 is rounded (and reported); /sdapi/v1/interrupt answers
// 200 with the images done so far; /sdapi/v1/skip drops the current image.
// Everything ignored is listed in info.warnings and logged; with
// arenahost_strict (option or override_settings) it is a 400 instead.
func (a *API) txt2img(w http.ResponseWriter, r *http.Request) {
	raw, err := readBody(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	if err := requireObject(raw); err != nil {
		a.fail(w, r, err)
		return
	}
	var req Txt2ImgRequest
	var fields map[string]any
	if err := json.Unmarshal(raw, &fields); err != nil { // requireObject: an object, never nil
		a.fail(w, r, badRequest("read request body: %v", err))
		return
	}
	if err := json.Unmarshal(raw, &req); err != nil { // lenient: A1111 clients send many fields
		a.fail(w, r, badRequest("read request body: %v", err))
		return
	}
	var warnings []string
	strict := a.strict()
	model := a.currentModel()
	for k, v := range req.OverrideSettings {
		switch k {
		case OptionStrict:
			b, ok := v.(bool)
			if !ok {
				a.fail(w, r, badRequest("override_settings.%s: %v is not a boolean", k, v))
				return
			}
			strict = b
		case "sd_model_checkpoint":
			s, ok := v.(string)
			if !ok {
				a.fail(w, r, badRequest("override_settings.sd_model_checkpoint: %v is not a string", v))
				return
			}
			m, err := a.resolveCheckpoint(r.Context(), s)
			if err != nil {
				a.fail(w, r, err)
				return
			}
			model = m
		default:
			warnings = append(warnings, fmt.Sprintf("override_settings.%s ignored: arenahost does not act on it", k))
		}
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
	case req.Width < 1 || req.Height < 1 || req.Width > txt2imgMaxSide || req.Height > txt2imgMaxSide:
		a.fail(w, r, badRequest("width×height: %d×%d must be from 1 to %d", req.Width, req.Height, txt2imgMaxSide))
		return
	}
	if w2, h2 := roundSide(req.Width), roundSide(req.Height); w2 != req.Width || h2 != req.Height {
		warnings = append(warnings, fmt.Sprintf("size %d×%d rounded to %d×%d (the pipeline takes multiples of 16)", req.Width, req.Height, w2, h2))
		req.Width, req.Height = w2, h2
	}
	if s := req.SamplerName; s != "" && !strings.EqualFold(s, "Euler") && s != "k_euler" {
		warnings = append(warnings, fmt.Sprintf("sampler_name %q ignored: the pipeline samples with Euler (flow matching)", s))
	}
	for _, ig := range txt2imgIgnored {
		if v, ok := fields[ig.field]; ok && !ig.off(v) {
			warnings = append(warnings, fmt.Sprintf("%s=%v ignored: the pipeline does not support it", ig.field, compactJSON(v)))
		}
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
	info := Txt2ImgInfo{Prompt: prompt, Negative: req.NegativePrompt, Seed: req.Seed, Width: req.Width, Height: req.Height, Steps: req.Steps,
		SamplerName: "Euler", BatchSize: req.BatchSize, SDModelName: model, Pipeline: pipe, PartialImage: -1,
		AllPrompts: []string{}, AllSeeds: []int64{}, Infotexts: []string{}, Jobs: []string{}, LoRAs: []v1.AppliedLoRA{}}
	var entries []v1.AppliedLoRA
	if len(tags) > 0 {
		ls, err := a.LoRAs()
		if err != nil {
			a.fail(w, r, err)
			return
		}
		for _, t := range tags {
			e, err := a.loraEntry(t.Name, ls, *t.Strength)
			if err != nil {
				warnings = append(warnings, fmt.Sprintf("<lora:%s> skipped: %v", t.Name, err))
				continue
			}
			entries = append(entries, e)
		}
	}
	if a.s.LoRAs == nil && len(entries) > 0 {
		warnings = append(warnings, fmt.Sprintf("%d <lora:…> tags skipped: this host runs no LoRA coordinator", len(entries)))
		entries = nil
	}
	if strict && len(warnings) > 0 {
		a.fail(w, r, &StatusError{Status: http.StatusBadRequest, Code: "strict",
			Err: fmt.Errorf("txt2img refused in strict mode (%s): %s", OptionStrict, strings.Join(warnings, "; "))})
		return
	}
	for _, m := range warnings {
		a.log.Warn("a1111 txt2img: "+m, "path", r.URL.Path)
	}
	release, err := a.gen.acquire(r.Context())
	if err != nil {
		a.fail(w, r, fmt.Errorf("txt2img: waiting for the generation before it: %w", err))
		return
	}
	defer release()
	if a.s.LoRAs != nil {
		res, err := a.s.LoRAs.Apply(r.Context(), lora.Request{Model: model, Mode: lora.ModeSide, LoRAs: entries})
		a.Metrics.ObserveApply("apply", lora.ModeSide, resElapsed(res), err)
		if err != nil {
			a.fail(w, r, loraStatus(err))
			return
		}
		info.LoRAs = res.LoRAs
	}
	run := a.addRun()
	defer a.dropRun(run)
	out := Txt2ImgResponse{Images: []string{}}
	for i := range n {
		seed := req.Seed + int64(i)
		var stop bool
		run.set(func(r *t2iRun) { stop = r.interrupted })
		if stop {
			info.Interrupted = true
			break
		}
		j, err := a.runJob(r, run, pipe, model, prompt, seed, req)
		if j != nil {
			info.Jobs = append(info.Jobs, j.ID())
		}
		if err != nil {
			a.fail(w, r, err)
			return
		}
		s := j.Snapshot()
		if s.State == v1.JobCancelled {
			var skipped bool
			run.set(func(r *t2iRun) { skipped = r.skipped[j.ID()] })
			if skipped {
				info.Skipped++
				continue
			}
			info.Interrupted = true
			if f := j.Frame(); f != nil {
				if img, err := decodeFrame(f); err == nil {
					if b64, _, err := encodePNG(j.ID(), resize(img, req.Width, req.Height)); err == nil {
						info.PartialImage = len(out.Images)
						out.Images = append(out.Images, b64)
						info.AllSeeds = append(info.AllSeeds, seed)
						info.AllPrompts = append(info.AllPrompts, prompt)
						info.Infotexts = append(info.Infotexts, infotext(prompt, req, seed, model)+fmt.Sprintf(", Interrupted at step: %d/%d", s.Step, s.Total))
					}
				}
			}
			break
		}
		b64, err := a.jobImage(j, req)
		if err != nil {
			a.fail(w, r, err)
			return
		}
		if c, note := resultConditioning(s.Result); c != "" && info.Conditioning == "" {
			info.Conditioning = c
			if c == "stand-in" {
				warnings = append(warnings, "the prompt did not condition the image: stand-in embeddings ("+note+")")
			}
		}
		if d, note := resultPair(s.Result, "decoder"); d != "" && info.Decoder == "" {
			info.Decoder = d
			if d == "stand-in" {
				warnings = append(warnings, "the image was not decoded by the model's VAE: "+note)
			}
		}
		info.AllSeeds = append(info.AllSeeds, seed)
		info.AllPrompts = append(info.AllPrompts, prompt)
		info.Infotexts = append(info.Infotexts, infotext(prompt, req, seed, model))
		out.Images = append(out.Images, b64)
	}
	if info.Interrupted {
		warnings = append(warnings, fmt.Sprintf("interrupted: %d of %d images returned", len(out.Images), n))
	}
	info.Warnings = append([]string{}, warnings...)
	ib, _ := json.Marshal(info)
	out.Info = string(ib)
	fields["width"], fields["height"], fields["seed"], fields["steps"] = req.Width, req.Height, req.Seed, req.Steps
	out.Parameters = fields
	writeJSON(w, http.StatusOK, out)
}

// infotext is A1111's one-line description of an image.
func infotext(prompt string, req Txt2ImgRequest, seed int64, model string) string {
	return fmt.Sprintf("%s\nSteps: %d, Sampler: Euler, Seed: %d, Size: %dx%d, Model: %s", prompt, req.Steps, seed, req.Width, req.Height, model)
}

func compactJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	return string(b)
}

func resElapsed(res *v1.LoRAResult) (d time.Duration) {
	if res != nil {
		d = res.Elapsed
	}
	return d
}

// runJob runs one pipeline job on model and waits for it to end. A job
// that failed is an error; a cancelled one is returned for the caller to
// tell skip from interrupt.
func (a *API) runJob(r *http.Request, run *t2iRun, pipe, model, prompt string, seed int64, req Txt2ImgRequest) (*job.Job, error) {
	params := map[string]any{"prompt": prompt, "steps": req.Steps, "seed": seed, "width": req.Width, "height": req.Height}
	if model != "" {
		params["model"] = model
		if err := a.addModelDir(params); err != nil {
			return nil, err
		}
	}
	j, err := a.s.Jobs.Create(r.Context(), v1.JobSpec{
		Pipeline: pipe,
		Origin:   v1.OriginA1111,
		Params:   params,
		Preview:  v1.PreviewSpec{Format: "png", MaxSide: max(req.Width, req.Height)},
	})
	if err != nil {
		return nil, fmt.Errorf("txt2img: %w", jobErr(err))
	}
	run.set(func(r *t2iRun) { r.current = j.ID() })
	var interrupted bool
	run.set(func(r *t2iRun) { interrupted = r.interrupted })
	if interrupted { // an interrupt that came while the job was being created
		j.Cancel()
	}
	select {
	case <-j.Done():
	case <-r.Context().Done():
		j.Cancel()
		return j, fmt.Errorf("txt2img: job %s: %w", j.ID(), r.Context().Err())
	}
	s := j.Snapshot()
	if s.State == v1.JobFailed {
		// The pipeline plugin failed the run: an upstream failure, not
		// the host's and not the client's.
		return j, &StatusError{Status: http.StatusBadGateway, Code: "pipeline_failed",
			Err: fmt.Errorf("txt2img: job %s failed in pipeline %s: %s", j.ID(), pipe, s.Error)}
	}
	if s.State != v1.JobDone && s.State != v1.JobCancelled {
		return j, fmt.Errorf("txt2img: job %s %s: %s", j.ID(), s.State, s.Error)
	}
	return j, nil
}

// jobImage returns a finished job's image as a base64 PNG of the
// requested size.
func (a *API) jobImage(j *job.Job, req Txt2ImgRequest) (string, error) {
	img, err := finalImage(j, req.Width, req.Height)
	if err != nil {
		return "", err
	}
	b64, _, err := encodePNG(j.ID(), img)
	return b64, err
}

// finalImage returns a finished job's image scaled to w×h.
func finalImage(j *job.Job, w, h int) (image.Image, error) {
	s := j.Snapshot()
	// A pipeline that decodes its own images (the diffusers pipeline's
	// VAE) returns them as PNG bytes under "images": those are the answer.
	// Otherwise the final latent, decoded by the preview plugin, is.
	if img, ok, err := resultImage(s.Result); ok || err != nil {
		if err != nil {
			return nil, fmt.Errorf("job %s: %w", j.ID(), err)
		}
		return resize(img, w, h), nil
	}
	f := j.Frame()
	if f == nil || f.Step != f.Total {
		// The preview plugin did not render the last step: it is down or
		// restarting, which a retry can fix.
		return nil, &StatusError{Status: http.StatusServiceUnavailable, Code: "plugin_unavailable",
			Err: fmt.Errorf("job %s: no final preview frame: the preview plugin did not render the last step (is it serving? see GET /v1/plugins)", j.ID())}
	}
	img, err := decodeFrame(f)
	if err != nil {
		return nil, fmt.Errorf("job %s: %w", j.ID(), err)
	}
	return resize(img, w, h), nil
}

// encodePNG answers img as a base64 PNG for job id.
func encodePNG(id string, img image.Image) (string, string, error) {
	var buf bytes.Buffer
	if err := (&png.Encoder{CompressionLevel: png.BestSpeed}).Encode(&buf, img); err != nil {
		return "", id, fmt.Errorf("txt2img: job %s: encode png: %w", id, err)
	}
	return base64.StdEncoding.EncodeToString(buf.Bytes()), id, nil
}

// addModelDir sets params["model_dir"] to the folder of the model
// params["model"] names when that model was loaded from a diffusers
// pipeline folder: the pipeline may load the folder's other components
// (diffusers-flux: its CLIP-L, T5 and VAE); and params["model_file"] to the
// model's file when it was loaded from one file (diffusers-flux looks for
// the tokenizers of a bundled single file beside it). Pipelines that take
// neither ignore them. A model_dir, model_file or tokenizer_dir the client
// sent is a path the pipeline will read, so it passes the same confinement
// as model paths (inside --models-dir, folders allowed) and is replaced by
// its resolved path; a client's model_dir or model_file is not replaced.
// A folder the pipeline reads (model_dir, tokenizer_dir, or the model's
// own pipeline folder) must also hold no symlink that leads out of
// --models-dir (confineTree): the pipeline reads every file in it.
func (a *API) addModelDir(params map[string]any) error {
	for _, key := range []string{"model_dir", "model_file", "tokenizer_dir"} {
		v, set := params[key]
		if !set {
			continue
		}
		p, ok := v.(string)
		if !ok {
			return badRequest("params.%s: %v is not a string", key, v)
		}
		real, err := confineModel(a.opts.ModelsDir, p)
		if err != nil {
			return fmt.Errorf("params.%s: %w", key, err)
		}
		if key != "model_file" {
			if err := confineTree(a.opts.ModelsDir, real); err != nil {
				return fmt.Errorf("params.%s: %w", key, err)
			}
		}
		params[key] = real
	}
	if _, set := params["model_dir"]; set {
		return nil
	}
	name, _ := params["model"].(string)
	if name == "" {
		return nil
	}
	if m, ok := a.s.Registry.Model(name); ok {
		if dir := pipelineFolder(m.Source); dir != "" {
			if err := confineTree(a.opts.ModelsDir, dir); err != nil {
				return fmt.Errorf("model %s: %w", name, err)
			}
			params["model_dir"] = dir
		} else if _, set := params["model_file"]; !set {
			if st, err := os.Stat(m.Source); err == nil && st.Mode().IsRegular() {
				if abs, err := filepath.Abs(m.Source); err == nil {
					params["model_file"] = abs
				}
			}
		}
	}
	return nil
}

// pipelineFolder returns source, absolute, when it is a diffusers pipeline
// folder (a directory holding a regular model_index.json), else "".
func pipelineFolder(source string) string {
	if source == "" {
		return ""
	}
	st, err := os.Stat(filepath.Join(source, "model_index.json"))
	if err != nil || !st.Mode().IsRegular() {
		return ""
	}
	abs, err := filepath.Abs(source)
	if err != nil {
		return ""
	}
	return abs
}

// resultConditioning returns a pipeline result's "conditioning" and
// "conditioning_note" string fields ("" when absent or not strings).
func resultConditioning(result any) (cond, note string) {
	return resultPair(result, "conditioning")
}

// resultPair returns a pipeline result's string field key and its
// key+"_note" ("" when absent or not strings).
func resultPair(result any, key string) (val, note string) {
	m, _ := result.(map[string]any)
	val, _ = m[key].(string)
	note, _ = m[key+"_note"].(string)
	return val, note
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
