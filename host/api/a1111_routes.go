package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/arenahost/arenahost/host/lora"
	v1 "github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// The A1111/SD.Next routes clients call before they generate: checkpoints,
// options, samplers, schedulers, refreshes, memory, skip. They translate
// into the registry (checkpoints), the arena (memory) and the job manager
// (skip, interrupt); the options store is the only state they keep, in
// memory, as A1111 keeps its settings (they are not written to disk).

// OptionStrict is the option key (and override_settings key) that makes
// txt2img refuse what it would otherwise ignore with a warning: unknown
// <lora:…> tags, samplers, hires fix and the other settings arenahost
// cannot honour.
const OptionStrict = "arenahost_strict"

// a1111Sampler is the one sampler the pipelines run: a flow-matching Euler
// step on σ = 1 → 0.
var a1111Samplers = []map[string]any{{"name": "Euler", "aliases": []string{"k_euler"}, "options": map[string]any{}}}

// a1111Schedulers lists the one schedule the pipelines use.
var a1111Schedulers = []map[string]any{{"name": "simple", "label": "Simple", "aliases": nil, "default_rho": -1, "need_inner_model": false}}

// a1111State is what the A1111 routes remember between requests: the
// options (A1111's and any unknown key a client sets, echoed back), the
// selected checkpoint, and the txt2img requests running (for interrupt and
// skip).
type a1111State struct {
	mu      sync.Mutex
	options map[string]any
	model   string // registry name of the selected checkpoint; "" = the default
	runs    map[*t2iRun]struct{}
}

// t2iRun is one txt2img request in flight.
type t2iRun struct {
	mu          sync.Mutex
	interrupted bool
	skipped     map[string]bool // job ids skipped by /skip
	current     string          // job id running now
}

func (r *t2iRun) set(f func(r *t2iRun)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f(r)
}

func (s *a1111State) init() {
	if s.options == nil {
		s.options = map[string]any{
			"samples_format":           "png",
			"sd_vae":                   "Automatic",
			"CLIP_stop_at_last_layers": 1,
			"eta_noise_seed_delta":     0,
			"sd_checkpoint_hash":       nil,
			OptionStrict:               false,
		}
		s.runs = map[*t2iRun]struct{}{}
	}
}

// a1111Routes registers the A1111 routes beside txt2img, progress,
// interrupt and loras.
func (a *API) a1111Routes() {
	a.a1.init()
	a.mux.HandleFunc("GET /sdapi/v1/sd-models", a.sdModels)
	a.mux.HandleFunc("GET /sdapi/v1/options", a.getOptions)
	a.mux.HandleFunc("POST /sdapi/v1/options", a.setOptions)
	a.mux.HandleFunc("GET /sdapi/v1/samplers", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, a1111Samplers) })
	a.mux.HandleFunc("GET /sdapi/v1/schedulers", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, a1111Schedulers) })
	a.mux.HandleFunc("POST /sdapi/v1/refresh-loras", a.refreshLoRAs)
	a.mux.HandleFunc("POST /sdapi/v1/refresh-checkpoints", a.refreshCheckpoints)
	a.mux.HandleFunc("GET /sdapi/v1/memory", a.sdapiMemory)
	a.mux.HandleFunc("POST /sdapi/v1/skip", a.sdapiSkip)
}

// SDModel is one entry of GET /sdapi/v1/sd-models, A1111's field names.
// Hash and SHA256 are null: arenahost does not hash checkpoint files.
type SDModel struct {
	Title     string  `json:"title"`
	ModelName string  `json:"model_name"`
	Hash      *string `json:"hash"`
	SHA256    *string `json:"sha256"`
	Filename  string  `json:"filename"`
	Config    *string `json:"config"`
	// Loaded is the registry name when the checkpoint is in the arena.
	Loaded string `json:"arenahost_model,omitempty"`
}

// checkpoints lists the *.safetensors files under the models directory
// (titles are their paths relative to it, as A1111's) and the registry's
// models loaded from elsewhere.
func (a *API) checkpoints() ([]SDModel, error) {
	root, err := filepath.EvalSymlinks(a.opts.ModelsDir)
	if err != nil {
		return nil, fmt.Errorf("list checkpoints in %s: %w", a.opts.ModelsDir, err)
	}
	loaded := map[string]string{} // real source path → registry name
	for _, m := range a.s.Registry.Models() {
		if p, err := filepath.Abs(m.Source); err == nil {
			if real, err := filepath.EvalSymlinks(p); err == nil {
				p = real
			}
			loaded[p] = m.Name
		}
	}
	out := []SDModel{}
	seen := map[string]bool{}
	err = walkConfined(root, isSafetensors, func(rel, real string, _ fs.FileInfo) error {
		rel = filepath.ToSlash(rel)
		stem := strings.TrimSuffix(rel, ".safetensors")
		out = append(out, SDModel{Title: rel, ModelName: strings.ReplaceAll(stem, "/", "_"), Filename: real, Loaded: loaded[real]})
		seen[real] = true
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list checkpoints in %s: %w", a.opts.ModelsDir, err)
	}
	for p, name := range loaded {
		if !seen[p] {
			out = append(out, SDModel{Title: name, ModelName: name, Filename: p, Loaded: name})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Title < out[j].Title })
	return out, nil
}

func (a *API) sdModels(w http.ResponseWriter, r *http.Request) {
	ms, err := a.checkpoints()
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, ms)
}

// currentModel returns the registry name txt2img runs on: the selected
// checkpoint, else the default model, else the first loaded one.
func (a *API) currentModel() string {
	a.a1.mu.Lock()
	m := a.a1.model
	a.a1.mu.Unlock()
	if m != "" {
		if _, ok := a.s.Registry.Model(m); ok {
			return m
		}
	}
	if _, ok := a.s.Registry.Model(lora.DefaultModel); ok {
		return lora.DefaultModel
	}
	if ms := a.s.Registry.Models(); len(ms) > 0 {
		return ms[0].Name
	}
	return ""
}

// checkpointTitle is the sd-models title of a registry model: its source's
// path relative to the models directory when it is a *.safetensors file
// there (the title checkpoints gives it), else the registry name (a model
// from elsewhere, or a model folder). It resolves one path instead of
// walking the models directory, which GET /sdapi/v1/options, polled by
// every A1111 client, used to do on each call.
func (a *API) checkpointTitle(model string) string {
	m, ok := a.s.Registry.Model(model)
	if !ok {
		return model
	}
	root, err := filepath.EvalSymlinks(a.opts.ModelsDir)
	if err != nil {
		return model
	}
	p, err := filepath.Abs(m.Source)
	if err != nil {
		return model
	}
	real, err := filepath.EvalSymlinks(p)
	if err != nil || !isSafetensors(real) || !within(root, real) {
		return model
	}
	if st, err := os.Stat(real); err != nil || !st.Mode().IsRegular() {
		return model
	}
	rel, err := filepath.Rel(root, real)
	if err != nil {
		return model
	}
	return filepath.ToSlash(rel)
}

// resolveCheckpoint finds the checkpoint a client names (a title, a title
// with " [hash]", a model_name, a file name or a registry name) and loads
// it into the arena when it is not there yet. It returns the registry name.
func (a *API) resolveCheckpoint(ctx context.Context, name string) (string, error) {
	name = strings.TrimSpace(name)
	if i := strings.LastIndex(name, " ["); i > 0 && strings.HasSuffix(name, "]") {
		name = name[:i] // A1111 titles carry " [hash]"
	}
	if _, ok := a.s.Registry.Model(name); ok {
		return name, nil
	}
	ms, err := a.checkpoints()
	if err != nil {
		return "", err
	}
	var hit *SDModel
	for i, m := range ms {
		if m.Title == name || m.ModelName == name || strings.TrimSuffix(m.Title, ".safetensors") == name || filepath.Base(m.Title) == name {
			hit = &ms[i]
			break
		}
	}
	if hit == nil {
		titles := make([]string, len(ms))
		for i, m := range ms {
			titles[i] = m.Title
		}
		return "", &StatusError{Status: http.StatusNotFound, Code: "not_found",
			Err: fmt.Errorf("sd_model_checkpoint: no checkpoint %q (have %s; see GET /sdapi/v1/sd-models)", name, strings.Join(titles, ", "))}
	}
	if hit.Loaded != "" {
		return hit.Loaded, nil
	}
	reg := registryName(hit.ModelName)
	if _, ok := a.s.Registry.Model(reg); ok {
		return "", &StatusError{Status: http.StatusConflict, Code: "conflict",
			Err: fmt.Errorf("sd_model_checkpoint %q: a different model is loaded as %q; unload it first (DELETE /v1/models/%s)", name, reg, reg)}
	}
	a.log.Info("a1111: loading checkpoint", "title", hit.Title, "model", reg)
	if _, err := a.s.Registry.Load(ctx, reg, hit.Filename, safetensors.Within(a.opts.ModelsDir)); err != nil {
		if st, _ := statusOf(err); st == http.StatusInternalServerError && ctx.Err() == nil {
			err = &StatusError{Status: http.StatusBadRequest, Code: "bad_model", Err: err}
		}
		return "", fmt.Errorf("sd_model_checkpoint %q: %w", name, err)
	}
	a.s.Prepare(reg)
	return reg, nil
}

// registryName turns a model_name into a name checkName accepts.
func registryName(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			b[i] = '_'
		}
	}
	if len(b) > 128 {
		b = b[:128]
	}
	return string(b)
}

func (a *API) optionsSnapshot() map[string]any {
	a.a1.mu.Lock()
	out := make(map[string]any, len(a.a1.options)+1)
	for k, v := range a.a1.options {
		out[k] = v
	}
	a.a1.mu.Unlock()
	out["sd_model_checkpoint"] = a.checkpointTitle(a.currentModel())
	return out
}

func (a *API) getOptions(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, a.optionsSnapshot())
}

// honoredOptions are the option keys that change what arenahost does.
var honoredOptions = map[string]bool{"sd_model_checkpoint": true, OptionStrict: true}

// decodeOptions decodes a POST /sdapi/v1/options body: one JSON object of
// option keys (numbers kept as json.Number); anything else is a 400.
func decodeOptions(raw []byte) (map[string]any, error) {
	if err := requireObject(raw); err != nil {
		return nil, err
	}
	var body map[string]any
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(&body); err != nil {
		return nil, badRequest("read request body: %v (send one JSON object of option keys)", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, badRequest("read request body: data after the JSON object")
	}
	return body, nil
}

// setOptions merges the body into the options. sd_model_checkpoint loads
// (when needed) and selects a checkpoint; every other key is kept and
// echoed by GET, and keys arenahost does not act on are logged. It answers
// null as A1111 does.
func (a *API) setOptions(w http.ResponseWriter, r *http.Request) {
	raw, err := readBody(r)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	body, err := decodeOptions(raw)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	if v, ok := body[OptionStrict]; ok {
		if _, isBool := v.(bool); !isBool {
			a.fail(w, r, badRequest("option %s: %v is not a boolean", OptionStrict, v))
			return
		}
	}
	model := ""
	if v, ok := body["sd_model_checkpoint"]; ok {
		s, isStr := v.(string)
		if !isStr {
			a.fail(w, r, badRequest("option sd_model_checkpoint: %v is not a string", v))
			return
		}
		m, err := a.resolveCheckpoint(r.Context(), s)
		if err != nil {
			a.fail(w, r, err)
			return
		}
		model = m
	}
	var ignored []string
	a.a1.mu.Lock()
	for k, v := range body {
		if k == "sd_model_checkpoint" {
			continue
		}
		if n, ok := v.(json.Number); ok {
			if i, err := n.Int64(); err == nil {
				v = i
			} else if f, err := n.Float64(); err == nil {
				v = f
			}
		}
		a.a1.options[k] = v
		if !honoredOptions[k] {
			ignored = append(ignored, k)
		}
	}
	if model != "" {
		a.a1.model = model
	}
	a.a1.mu.Unlock()
	if len(ignored) > 0 {
		sort.Strings(ignored)
		a.log.Warn("a1111: options kept but not acted on", "keys", ignored)
	}
	writeJSON(w, http.StatusOK, nil)
}

func (a *API) strict() bool {
	a.a1.mu.Lock()
	defer a.a1.mu.Unlock()
	b, _ := a.a1.options[OptionStrict].(bool)
	return b
}

// refreshLoRAs drops the LoRA listing cache so the next listing re-reads
// every file; A1111 answers null.
func (a *API) refreshLoRAs(w http.ResponseWriter, r *http.Request) {
	a.loras.mu.Lock()
	a.loras.m = nil
	a.loras.mu.Unlock()
	if _, err := a.LoRAs(); err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, nil)
}

// refreshCheckpoints re-reads the models directory (the listing is never
// cached, so it only checks the directory is readable).
func (a *API) refreshCheckpoints(w http.ResponseWriter, r *http.Request) {
	if _, err := a.checkpoints(); err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, nil)
}

// sdapiMemory answers A1111's MemoryResponse: "ram" from /proc/meminfo and
// "cuda" from the arena (on the CPU arena too: it is where the weights
// live), with A1111's keys.
func (a *API) sdapiMemory(w http.ResponseWriter, _ *http.Request) {
	ram := map[string]any{}
	if total, avail, err := meminfo(); err == nil {
		ram = map[string]any{"free": avail, "used": total - avail, "total": total}
	} else {
		ram = map[string]any{"error": err.Error()}
	}
	st := a.s.Arena.Stats()
	cur := map[string]any{"current": st.Allocated, "peak": st.Peak}
	writeJSON(w, http.StatusOK, map[string]any{
		"ram": ram,
		"cuda": map[string]any{
			"system":    map[string]any{"free": st.Capacity - st.Allocated, "used": st.Allocated, "total": st.Capacity},
			"active":    cur,
			"allocated": cur,
			"reserved":  map[string]any{"current": st.Capacity, "peak": st.Capacity},
			"inactive":  map[string]any{"current": 0, "peak": 0},
			"events":    map[string]any{"retries": 0, "oom": 0},
			"backend":   st.Backend,
		},
	})
}

// meminfo reads MemTotal and MemAvailable in bytes.
func meminfo() (total, avail uint64, err error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, 0, fmt.Errorf("read memory: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 2 {
			continue
		}
		v, err := strconv.ParseUint(fs[1], 10, 64)
		if err != nil {
			continue
		}
		switch fs[0] {
		case "MemTotal:":
			total = v << 10
		case "MemAvailable:":
			avail = v << 10
		}
	}
	if total == 0 {
		return 0, 0, errors.New("read memory: no MemTotal in /proc/meminfo")
	}
	return total, avail, sc.Err()
}

// sdapiSkip stops the image being generated; its txt2img request goes on
// with the next image of the batch (A1111's skip). It answers {}.
func (a *API) sdapiSkip(w http.ResponseWriter, _ *http.Request) {
	a.a1.mu.Lock()
	for run := range a.a1.runs {
		run.set(func(r *t2iRun) {
			if r.current != "" {
				r.skipped[r.current] = true
			}
		})
	}
	a.a1.mu.Unlock()
	if j := a.s.Jobs.Current(); j != nil && !j.State().Final() {
		j.Cancel()
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

// interruptRuns marks every running txt2img request interrupted.
func (a *API) interruptRuns() {
	a.a1.mu.Lock()
	defer a.a1.mu.Unlock()
	for run := range a.a1.runs {
		run.set(func(r *t2iRun) { r.interrupted = true })
	}
}

func (a *API) addRun() *t2iRun {
	run := &t2iRun{skipped: map[string]bool{}}
	a.a1.mu.Lock()
	a.a1.runs[run] = struct{}{}
	a.a1.mu.Unlock()
	return run
}

func (a *API) dropRun(run *t2iRun) {
	a.a1.mu.Lock()
	delete(a.a1.runs, run)
	a.a1.mu.Unlock()
}

// resolveLoRA finds the LoRA a <lora:NAME> tag names as A1111 does: a
// path relative to the LoRA directory (with or without .safetensors), else
// the bare file name when exactly one file has it, else the alias
// (kohya's ss_output_name) when exactly one file has it.
// loraEntry resolves a LoRA name as A1111 does (resolveLoRA) and confines
// its path (LoRAPath): the entry an apply takes, for A1111 tags and
// ComfyUI's LoRA nodes alike.
func (a *API) loraEntry(name string, all []v1.LoRAFile, strength float64) (v1.AppliedLoRA, error) {
	e, err := a.resolveLoRA(name, all)
	if err != nil {
		return v1.AppliedLoRA{}, err
	}
	p, err := a.LoRAPath(e.Name)
	if err != nil {
		return v1.AppliedLoRA{}, err
	}
	return v1.AppliedLoRA{Name: e.Name, Path: p, Strength: strength}, nil
}

func (a *API) resolveLoRA(name string, ls []v1.LoRAFile) (v1.LoRAFile, error) {
	n := strings.TrimSuffix(filepath.ToSlash(name), ".safetensors")
	for _, e := range ls {
		if e.Name == n {
			return e, nil
		}
	}
	var bare, alias []v1.LoRAFile
	for _, e := range ls {
		if filepath.Base(e.Name) == n {
			bare = append(bare, e)
		}
		if e.Metadata["ss_output_name"] == n {
			alias = append(alias, e)
		}
	}
	for _, c := range [][]v1.LoRAFile{bare, alias} {
		switch len(c) {
		case 0:
		case 1:
			return c[0], nil
		default:
			names := make([]string, len(c))
			for i, e := range c {
				names[i] = e.Name
			}
			return v1.LoRAFile{}, fmt.Errorf("LoRA %q is ambiguous: %s match (name it by its path)", name, strings.Join(names, ", "))
		}
	}
	return v1.LoRAFile{}, fmt.Errorf("LoRA %q: %w in %s (see GET /sdapi/v1/loras)", name, errNoFile, a.opts.LoRAsDir)
}
