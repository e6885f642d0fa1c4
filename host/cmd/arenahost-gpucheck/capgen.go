package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/arenahost/arenahost/shared/gpu"
	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/samples"
)

// capgenModels are the capped-generation step's transformers: Flux-dev,
// what the issue measures, and a one-block-each Flux of the sample's
// widths (hidden 256, diffusers' mlp ratio 4 and 256-wide timestep
// embedding, which the merge steps' "tiny" lacks) that runs every line of
// the step on a CPU with cuda-sim.
var capgenModels = map[string]layout.FluxConfig{
	"dev": layout.FluxDev(),
	"tiny": func() layout.FluxConfig {
		c := layout.FluxSample()
		c.DoubleBlocks, c.SingleBlocks = 1, 1
		return c
	}(),
}

// CapGenOptions says how the capped-generation step runs.
type CapGenOptions struct {
	Device     string   // arenahost binary whose bin/plugins has lora-nf4 and diffusers_flux
	DeviceArgs []string // e.g. --arena-backend cuda --arena-device 0
	TorchDev   string   // the pipelines' torch device: cuda:N, or cpu (cuda-sim)
	Python     string   // a Python with torch, diffusers, peft, bitsandbytes (plugins and baseline)
	Script     string   // capgen.py
	SDK        string   // sdk/python, put on the plugins' and the baseline's PYTHONPATH
	Model      string   // a capgenModels key
	Size       int      // image side (1024 on Flux-dev)
	Steps      int      // denoising steps (8)
	DType      string   // pipeline compute dtype (bfloat16 on a GPU)
	Tokens     int      // stand-in T5 tokens (512)
	CapsGiB    []float64
	LoRAs      []int // counts of LoRAs (0, 3, 5)
	Ranks      []int // 16, 64
	Baseline   bool  // also run diffusers + PEFT on bitsandbytes under each cap
	// Budget bounds the step: no configuration starts after it (they are
	// reported as skipped), so the GPU check keeps its 5 minutes.
	Budget       time.Duration
	StartTimeout time.Duration
}

// capRow is one line of the step's table.
type capRow struct {
	Who        string // arenahost, baseline
	CapGiB     float64
	LoRAs      int
	Rank       int
	Mode       string // side, fuse, unmerged
	ApplyS     float64
	StepMS     float64
	ArenaBytes int64 // arena allocated after the apply (model, factors; the journal takes none)
	TorchPeak  int64 // the pipeline process's torch allocator peak
	OOM        bool
	Err        string
	Skipped    string
}

func (c capRow) peak() int64 { return c.ArenaBytes + c.TorchPeak }

// configs lists the step's configurations for one cap, most wanted first:
// the full matrix at the first (largest) cap, rank 16 only below it.
func (o CapGenOptions) configs(first bool) []capRow {
	out := []capRow{{LoRAs: 0, Mode: "side"}}
	ranks := o.Ranks
	if !first && len(ranks) > 1 {
		ranks = ranks[:1]
	}
	for _, r := range ranks {
		for _, n := range o.LoRAs {
			if n == 0 {
				continue
			}
			for _, m := range []string{"side", "fuse"} {
				out = append(out, capRow{LoRAs: n, Rank: r, Mode: m})
			}
		}
	}
	return out
}

// CheckCapGen runs the capped-generation step: a whole diffusers-flux
// generation (Size², Steps steps, VAE decode) on the model's shapes (random
// NF4 codes in the arena, stand-in prompt embeddings of the real shapes:
// Tokens × context_dim and a pooled vec_dim) with 0 and some LoRAs of each
// rank in side and fused mode, under each device-memory cap: the arena's
// capacity plus ARENAHOST_TORCH_MEMORY_CAP for every pipeline process add
// up to the cap. Apply time is the HTTP apply call, end to end; step time
// the median step the pipeline reports; peak device memory the arena's
// allocation plus the pipeline's torch peak. With Baseline, diffusers +
// PEFT on bitsandbytes Linear4bit (unmerged, and fuse_lora) run the same
// generations under the same cap, in their own process.
func CheckCapGen(ctx context.Context, r *Report, o CapGenOptions) error {
	cfg, ok := capgenModels[o.Model]
	if !ok {
		return fmt.Errorf("capgen: model %q: want dev or tiny", o.Model)
	}
	if o.StartTimeout == 0 {
		o.StartTimeout = 2 * time.Minute
	}
	deadline := time.Now().Add(o.Budget)
	if o.Budget <= 0 {
		deadline = time.Now().Add(24 * time.Hour)
	}
	work, err := os.MkdirTemp("", "arenahost-capgen-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)

	// Fixtures: the checkpoint, five LoRAs per rank, the pipeline folder.
	t0 := time.Now()
	const modelFile = "capgen.safetensors"
	maxN := slices.Max(o.LoRAs)
	loraPath := func(rank, i int) string {
		return filepath.Join(work, "loras", fmt.Sprintf("capgen-r%d-%d.safetensors", rank, i+1))
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	fail := func(err error) {
		if err != nil {
			mu.Lock()
			errs = append(errs, err)
			mu.Unlock()
		}
	}
	for _, d := range []string{"models", "loras"} {
		if err := os.MkdirAll(filepath.Join(work, d), 0o755); err != nil {
			return err
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		fail(samples.WriteModel(filepath.Join(work, "models", modelFile), samples.ModelOptions{Config: cfg, RandomCodes: true, Seed: 9}))
	}()
	for _, rank := range o.Ranks {
		for i := range maxN {
			wg.Add(1)
			go func() {
				defer wg.Done()
				fail(samples.WriteKohyaLoRA(loraPath(rank, i), samples.LoRAOptions{Config: cfg, Rank: rank, Alpha: float32(rank), Seed: uint64(31 + 7*rank + i)}))
			}()
		}
	}
	pipeDir := filepath.Join(work, "models", "capgen-pipe")
	vae := "full"
	if o.Model != "dev" {
		vae = "small"
	}
	flux, _ := json.Marshal(map[string]any{"hidden": cfg.Hidden, "head_dim": cfg.HeadDim, "mlp": cfg.MLP, "in_channels": cfg.InChannels,
		"context_dim": cfg.ContextDim, "vec_dim": cfg.VecDim, "double_blocks": cfg.DoubleBlocks, "single_blocks": cfg.SingleBlocks, "guidance": cfg.Guidance})
	if _, err := o.python(ctx, "fixture", "--out", pipeDir, "--flux", string(flux), "--vae", vae); err != nil {
		fail(fmt.Errorf("capgen fixture: %w", err))
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("capgen: %w", err)
	}
	st, err := os.Stat(filepath.Join(work, "models", modelFile))
	if err != nil {
		return err
	}
	lin, err := gpu.BlockLinears(cfg)
	if err != nil {
		return err
	}
	r.Note("capgen step: Flux %s (%d block linears), random NF4 codes (%s), %d kohya LoRAs per rank %v, a diffusers folder with a random %s VAE; prompts are stand-in embeddings of T5-XXL's shape %d×%d and a pooled CLIP %d (no text encoders); %d×%d, %d steps, %s, VAE decode; written in %.1f s",
		o.Model, len(lin), MiB(st.Size()), maxN, o.Ranks, vae, o.Tokens, cfg.ContextDim, cfg.VecDim, o.Size, o.Size, o.Steps, o.DType, time.Since(t0).Seconds())

	// The side factors the largest config binds, fp32 A_cat and B_cat.
	var perRank int64
	for _, l := range lin {
		perRank += int64(4 * (l.In + l.Out))
	}
	var rows []capRow
	for ci, capGiB := range o.CapsGiB {
		capBytes := int64(capGiB * (1 << 30))
		cfgs := o.configs(ci == 0)
		var side int64
		for _, c := range cfgs {
			if c.Mode == "side" {
				side = max(side, int64(c.LoRAs*c.Rank)*perRank)
			}
		}
		// The arena gets the model, the largest side set and 256 MiB; the
		// rest of the cap is the pipeline's. At least 1 GiB stays for
		// torch: a set that does not fit then fails in the arena (OOM).
		arenaCap := st.Size() + side + 256<<20
		arenaCap = min(arenaCap, capBytes-1<<30)
		torchCap := capBytes - arenaCap
		r.Note("capgen cap %.0f GiB: arena capacity %s + ARENAHOST_TORCH_MEMORY_CAP %s per pipeline process (torch.cuda.set_per_process_memory_fraction); the baseline's process gets all %.0f GiB",
			capGiB, MiB(arenaCap), MiB(torchCap), capGiB)
		got, err := o.runHost(ctx, r, work, pipeDir, modelFile, loraPath, capGiB, arenaCap, torchCap, cfgs, deadline)
		rows = append(rows, got...)
		if err != nil && ctx.Err() == nil {
			r.Add("capgen", fmt.Sprintf("arenahost under %.0f GiB", capGiB), err.Error(), "", Fail)
		}
		if o.Baseline {
			got, err := o.runBaseline(ctx, work, pipeDir, modelFile, loraPath, capGiB, capBytes, cfgs, deadline)
			rows = append(rows, got...)
			if err != nil && ctx.Err() == nil {
				r.Add("capgen", fmt.Sprintf("baseline under %.0f GiB", capGiB), err.Error(), "", Fail)
			}
		}
		if ctx.Err() != nil {
			break
		}
	}
	r.Note("capgen: peak device memory is the arena's allocation after the apply (model + factors; the fuse journal takes none) plus the pipeline process's torch peak (max_memory_reserved); the CUDA contexts of the host and plugin processes (a few hundred MiB each) are not in either figure")
	r.AddSection(fmt.Sprintf("Capped generation (capgen step): %s, LoRAs × rank × mode under each cap", r.Device), capTable(rows)+"\n"+smallestCaps(rows))
	for _, c := range rows {
		if c.Skipped != "" {
			continue
		}
		name := fmt.Sprintf("%s, %.0f GiB cap: %d LoRA(s)%s, %s", c.Who, c.CapGiB, c.LoRAs, rankLabel(c), c.Mode)
		if c.Err != "" && !c.OOM {
			r.Add("capgen", name, lastLine(c.Err), "", Fail)
			continue
		}
		r.Add("capgen", name, c.summary(), "", Info)
	}
	return nil
}

func rankLabel(c capRow) string {
	if c.LoRAs == 0 {
		return ""
	}
	return fmt.Sprintf(" rank %d", c.Rank)
}

func (c capRow) summary() string {
	if c.OOM {
		return "out of memory: " + lastLine(c.Err)
	}
	return fmt.Sprintf("apply %.3f s, step %.0f ms, peak %s", c.ApplyS, c.StepMS, MiB(c.peak()))
}

// capTable renders the rows as the markdown table bench/gpu-results.md keeps.
func capTable(rows []capRow) string {
	var b strings.Builder
	b.WriteString("| who | cap | LoRAs | rank | mode | apply (s) | step (ms) | peak device memory | arena | torch peak | OOM |\n")
	b.WriteString("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|\n")
	for _, c := range rows {
		rank := "-"
		if c.LoRAs > 0 {
			rank = fmt.Sprint(c.Rank)
		}
		switch {
		case c.Skipped != "":
			fmt.Fprintf(&b, "| %s | %.0f GiB | %d | %s | %s | skipped: %s | | | | | |\n", c.Who, c.CapGiB, c.LoRAs, rank, c.Mode, c.Skipped)
		case c.Err != "" && !c.OOM:
			fmt.Fprintf(&b, "| %s | %.0f GiB | %d | %s | %s | error: %s | | | | | |\n", c.Who, c.CapGiB, c.LoRAs, rank, c.Mode, mdCell(lastLine(c.Err)))
		default:
			oom := "no"
			if c.OOM {
				oom = "**yes**: " + mdCell(lastLine(c.Err))
			}
			fmt.Fprintf(&b, "| %s | %.0f GiB | %d | %s | %s | %.3f | %.0f | %s | %s | %s | %s |\n", c.Who, c.CapGiB, c.LoRAs, rank, c.Mode,
				c.ApplyS, c.StepMS, MiB(c.peak()), MiB(c.ArenaBytes), MiB(c.TorchPeak), oom)
		}
	}
	return b.String()
}

// isOOM says whether an error is the device (or the arena) running out.
func isOOM(msg string) bool {
	m := strings.ToLower(msg)
	return strings.Contains(m, "out of memory") || strings.Contains(m, "outofmemoryerror") || strings.Contains(m, "capacity") ||
		strings.Contains(m, "insufficient")
}

func (o CapGenOptions) env() []string {
	return []string{"PYTHONPATH=" + o.SDK + string(os.PathListSeparator) + os.Getenv("PYTHONPATH"), "TORCHDYNAMO_DISABLE=1"}
}

// python runs capgen.py with args and returns its stdout.
func (o CapGenOptions) python(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, o.Python, append([]string{o.Script}, args...)...)
	cmd.Env = append(os.Environ(), o.env()...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", o.Script, args[0], err, tail(stderr.String(), 1500))
	}
	return out, nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// runHost starts the device host under one cap and runs the configs.
func (o CapGenOptions) runHost(ctx context.Context, r *Report, work, pipeDir, modelFile string, loraPath func(int, int) string,
	capGiB float64, arenaCap, torchCap int64, cfgs []capRow, deadline time.Time) ([]capRow, error) {
	args := append(slices.Clone(o.DeviceArgs), "--arena-capacity", fmt.Sprint(arenaCap), "--models-dir", filepath.Join(work, "models"),
		"--loras-dir", filepath.Join(work, "loras"), "--python", o.Python, "--samples=false")
	env := append(o.env(), "ARENAHOST_TORCH_MEMORY_CAP="+fmt.Sprint(torchCap))
	var rows []capRow
	skipRest := func(from int, why string) {
		for _, c := range cfgs[from:] {
			c.Who, c.CapGiB, c.Skipped = "arenahost", capGiB, why
			rows = append(rows, c)
		}
	}
	if time.Now().After(deadline) {
		skipRest(0, "time budget")
		return rows, nil
	}
	h, err := startHost(ctx, "capgen", o.Device, args, env, o.StartTimeout)
	if err != nil {
		skipRest(0, "host did not start")
		return rows, err
	}
	defer h.stop()
	const model = "capgen"
	tl := time.Now()
	if err := h.call(ctx, "POST", "/v1/models", map[string]any{"path": modelFile, "name": model}, nil); err != nil {
		skipRest(0, "model did not load")
		return rows, err
	}
	r.Note("capgen cap %.0f GiB: model loaded into the arena in %.2f s", capGiB, time.Since(tl).Seconds())
	for i, c := range cfgs {
		if time.Now().After(deadline) || ctx.Err() != nil {
			skipRest(i, "time budget")
			break
		}
		c.Who, c.CapGiB = "arenahost", capGiB
		c = o.runOne(ctx, h, model, pipeDir, loraPath, c)
		if ctx.Err() != nil && c.Err != "" {
			// The check's time limit (SIGINT) ended it: not a failure.
			c.Err, c.OOM, c.Skipped = "", false, "interrupted at the check's time limit"
		}
		rows = append(rows, c)
	}
	return rows, nil
}

// runOne applies c's set (timed, over HTTP), runs one generation and
// removes the set.
func (o CapGenOptions) runOne(ctx context.Context, h *host, model, pipeDir string, loraPath func(int, int) string, c capRow) capRow {
	if c.LoRAs > 0 {
		set := make([]map[string]any, c.LoRAs)
		for i := range set {
			set[i] = map[string]any{"name": strings.TrimSuffix(filepath.Base(loraPath(c.Rank, i)), ".safetensors"), "strength": 1.0}
		}
		req := map[string]any{"model": model, "loras": set, "mode": c.Mode}
		if c.Mode == "side" && o.DType == "bfloat16" {
			// A bfloat16 forward gets the same bits from bf16 factors,
			// which take half the memory (docs/api.md, factor_dtype).
			req["factor_dtype"] = "bf16"
		}
		t := time.Now()
		err := h.call(ctx, "POST", "/v1/loras/apply", req, nil)
		c.ApplyS = time.Since(t).Seconds()
		if err != nil {
			c.Err, c.OOM = err.Error(), isOOM(err.Error())
			return c
		}
		defer func() { _ = h.call(context.WithoutCancel(ctx), "DELETE", "/v1/loras?model="+model, nil, nil) }()
	}
	var ar struct {
		Allocated int64 `json:"allocated"`
	}
	if err := h.call(ctx, "GET", "/v1/arena", nil, &ar); err == nil {
		c.ArenaBytes = ar.Allocated
	}
	var job struct {
		ID     string `json:"id"`
		State  string `json:"state"`
		Error  string `json:"error"`
		Result struct {
			StepMS    []float64 `json:"step_ms"`
			PeakTorch int64     `json:"peak_torch_bytes"`
			Width     int       `json:"width"`
		} `json:"result"`
	}
	params := map[string]any{"model": model, "model_dir": pipeDir, "steps": o.Steps, "width": o.Size, "height": o.Size, "seed": 1,
		"prompt": "capgen", "cache_weights": false, "dtype": o.DType, "stand_in_tokens": o.Tokens}
	if err := h.call(ctx, "POST", "/v1/jobs", map[string]any{"pipeline": "diffusers-flux", "params": params, "preview": map[string]any{"method": "none"}}, &job); err != nil {
		c.Err = err.Error()
		return c
	}
	id := job.ID
	for {
		if err := h.call(ctx, "GET", "/v1/jobs/"+id, nil, &job); err != nil {
			c.Err = err.Error()
			return c
		}
		if job.State == "done" || job.State == "failed" || job.State == "cancelled" {
			break
		}
		select {
		case <-ctx.Done():
			c.Err = ctx.Err().Error()
			return c
		case <-time.After(100 * time.Millisecond):
		}
	}
	if job.State != "done" {
		c.Err, c.OOM = fmt.Sprintf("job %s %s: %s", id, job.State, job.Error), isOOM(job.Error)
		return c
	}
	if job.Result.Width != o.Size || len(job.Result.StepMS) == 0 {
		c.Err = fmt.Sprintf("job %s: result of width %d with %d step times", id, job.Result.Width, len(job.Result.StepMS))
		return c
	}
	c.StepMS = medianAfterFirst(job.Result.StepMS)
	c.TorchPeak = job.Result.PeakTorch
	return c
}

func medianAfterFirst(v []float64) float64 {
	if len(v) > 1 {
		v = v[1:]
	}
	s := slices.Sorted(slices.Values(v))
	return s[len(s)/2]
}

// runBaseline runs capgen.py baseline under the cap, one process.
func (o CapGenOptions) runBaseline(ctx context.Context, work, pipeDir, modelFile string, loraPath func(int, int) string,
	capGiB float64, capBytes int64, cfgs []capRow, deadline time.Time) ([]capRow, error) {
	type bcfg struct {
		LoRAs []string `json:"loras"`
		Rank  int      `json:"rank"`
		Mode  string   `json:"mode"`
	}
	var bc []bcfg
	for _, c := range cfgs {
		m := "unmerged"
		if c.Mode == "fuse" {
			m = "fuse"
		}
		ls := []string{}
		for i := range c.LoRAs {
			ls = append(ls, loraPath(c.Rank, i))
		}
		bc = append(bc, bcfg{LoRAs: ls, Rank: c.Rank, Mode: m})
	}
	raw, _ := json.Marshal(bc)
	out, err := o.python(ctx, "baseline", "--model-dir", pipeDir, "--checkpoint", filepath.Join(work, "models", modelFile),
		"--configs", string(raw), "--cap-bytes", fmt.Sprint(capBytes), "--size", fmt.Sprint(o.Size), "--steps", fmt.Sprint(o.Steps),
		"--dtype", o.DType, "--stand-in-tokens", fmt.Sprint(o.Tokens), "--device", o.TorchDev,
		"--deadline", fmt.Sprint(float64(deadline.UnixNano())/1e9))
	var rows []capRow
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l struct {
			Note      string  `json:"note"`
			LoRAs     int     `json:"loras"`
			Rank      int     `json:"rank"`
			Mode      string  `json:"mode"`
			ApplyS    float64 `json:"apply_s"`
			StepMS    float64 `json:"step_ms"`
			PeakBytes int64   `json:"peak_bytes"`
			OOM       bool    `json:"oom"`
			Error     string  `json:"error"`
			Skipped   string  `json:"skipped"`
		}
		if json.Unmarshal(sc.Bytes(), &l) != nil || l.Note != "" || l.Mode == "" {
			continue
		}
		rows = append(rows, capRow{Who: "baseline", CapGiB: capGiB, LoRAs: l.LoRAs, Rank: l.Rank, Mode: l.Mode, ApplyS: l.ApplyS,
			StepMS: l.StepMS, TorchPeak: l.PeakBytes, OOM: l.OOM, Err: l.Error, Skipped: l.Skipped})
	}
	return rows, err
}

// smallestCaps says, for each who × mode × LoRA count of rank-16 rows, the
// smallest cap at which the generation ran (the question for 3 and
// 5 LoRAs), as markdown lines.
func smallestCaps(rows []capRow) string {
	type key struct {
		who, mode string
		n         int
	}
	best := map[key]float64{}
	tried := map[key][]float64{}
	var keys []key
	for _, c := range rows {
		if c.LoRAs == 0 || c.Rank != 16 || c.Skipped != "" {
			continue
		}
		k := key{c.Who, c.Mode, c.LoRAs}
		if _, ok := tried[k]; !ok {
			keys = append(keys, k)
		}
		tried[k] = append(tried[k], c.CapGiB)
		if c.Err == "" && !c.OOM {
			if b, ok := best[k]; !ok || c.CapGiB < b {
				best[k] = c.CapGiB
			}
		}
	}
	var b strings.Builder
	for _, k := range keys {
		caps := make([]string, len(tried[k]))
		for i, c := range tried[k] {
			caps[i] = fmt.Sprintf("%.0f", c)
		}
		if v, ok := best[k]; ok {
			fmt.Fprintf(&b, "- %s, %s, %d rank-16 LoRAs: generates down to **%.0f GiB** (caps tried: %s GiB)\n", k.who, k.mode, k.n, v, strings.Join(caps, ", "))
		} else {
			fmt.Fprintf(&b, "- %s, %s, %d rank-16 LoRAs: generated under none of the caps tried (%s GiB)\n", k.who, k.mode, k.n, strings.Join(caps, ", "))
		}
	}
	return b.String()
}
