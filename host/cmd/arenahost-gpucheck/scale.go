package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/arenahost/arenahost/shared/gpu"
	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/samples"
)

// mergeModels are the models -merge-model picks for the merge and scale
// steps: Flux-dev, which the targets are for, and a tiny Flux (one block of
// each kind, width 128) that runs every line of both steps where speed
// means nothing (fakecuda, the CPU stand-in for the driver; cuda-sim).
var mergeModels = map[string]layout.FluxConfig{
	"dev":  layout.FluxDev(),
	"tiny": {Hidden: 128, HeadDim: 64, MLP: 512, InChannels: 64, ContextDim: 256, VecDim: 128, TimeDim: 64, DoubleBlocks: 1, SingleBlocks: 1, Guidance: true},
}

// timeTarget returns the check of a time target in section: checked on
// Flux-dev, the targets' model, only reported on another (a real GPU is
// what the targets are for).
func timeTarget(r *Report, section, model string) func(name, measured, target string, ok bool) {
	return func(name, measured, target string, ok bool) {
		if model == "dev" {
			r.Check(section, name, measured, target, ok)
		} else {
			r.Add(section, name, measured, target+" (Flux-dev only)", Info)
		}
	}
}

// ScaleOptions says where CheckScale runs: the device host (Device, with
// DeviceArgs such as --arena-backend cuda) and the model (a mergeModels
// key) with its LoRAs' rank.
type ScaleOptions struct {
	Device       string
	DeviceArgs   []string
	Env          []string
	Model        string
	Rank         int
	StartTimeout time.Duration
}

// scaleLoRAs is how many LoRAs the scale step writes (the 1 and 5).
const scaleLoRAs = 5

// CheckScale times the whole product path at the model's real scale on
// the device host, as a UI drives it over HTTP: it writes a checkpoint of
// the model's shapes and layout (random codes: the work does not depend on
// the values) and five rank-Rank kohya LoRAs on every block Linear into
// the host's directories, loads the checkpoint onto the device, fuses 1
// and then 5 LoRAs (host journal by file reference, plan, factors, batched
// uploads, kernels), removes them and checks that a block's bytes are back,
// and side-applies the 5. The wall times include the HTTP round trip; the
// scratch is what lora-nf4 allocated on the device for the fused pass.
// The time targets are checked for Flux-dev only.
func CheckScale(ctx context.Context, r *Report, o ScaleOptions) error {
	cfg, ok := mergeModels[o.Model]
	if !ok {
		return fmt.Errorf("scale: model %q: want dev or tiny", o.Model)
	}
	if o.Rank <= 0 {
		o.Rank = 16
	}
	if o.StartTimeout == 0 {
		o.StartTimeout = 2 * time.Minute
	}
	timeCheck := timeTarget(r, "scale", o.Model)
	args := o.DeviceArgs
	if o.Model == "dev" {
		// The checkpoint (6.9 GB) and five LoRAs' side factors (1.2 GB)
		// need more than the default 8 GiB of arena address space.
		args = append(slices.Clone(args), "--arena-capacity", "24GiB")
	}
	h, err := startHost(ctx, "device", o.Device, args, o.Env, o.StartTimeout)
	if err != nil {
		return err
	}
	defer h.stop()
	lin, err := gpu.BlockLinears(cfg)
	if err != nil {
		return err
	}

	t0 := time.Now()
	models, loras := filepath.Join(h.data, "models"), filepath.Join(h.data, "loras")
	const modelFile = "flux-scale.safetensors"
	var wg sync.WaitGroup
	errs := make([]error, scaleLoRAs+1)
	wg.Add(scaleLoRAs + 1)
	go func() {
		defer wg.Done()
		errs[0] = samples.WriteModel(filepath.Join(models, modelFile), samples.ModelOptions{Config: cfg, RandomCodes: true, Seed: 7})
	}()
	for i := range scaleLoRAs {
		go func() {
			defer wg.Done()
			errs[i+1] = samples.WriteKohyaLoRA(filepath.Join(loras, loraName(i)+".safetensors"),
				samples.LoRAOptions{Config: cfg, Rank: o.Rank, Alpha: float32(o.Rank), Seed: uint64(11 + i)})
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("scale: %w", err)
	}
	st, err := os.Stat(filepath.Join(models, modelFile))
	if err != nil {
		return err
	}
	r.Note("scale step: Flux %s, %d block linears; wrote the checkpoint (random NF4 codes, %s) and %d rank-%d kohya LoRAs in %.1f s",
		o.Model, len(lin), MiB(st.Size()), scaleLoRAs, o.Rank, time.Since(t0).Seconds())

	const model = "scale"
	wall := func(fn func() error) (float64, error) {
		t := time.Now()
		err := fn()
		return time.Since(t).Seconds(), err
	}
	tl, err := wall(func() error {
		return h.call(ctx, "POST", "/v1/models", map[string]any{"path": modelFile, "name": model}, nil)
	})
	if err != nil {
		return err
	}
	r.Add("scale", "load the checkpoint onto the device (POST /v1/models)", fmt.Sprintf("%.2f s, %s", tl, GBps(float64(st.Size()), tl)), "", Info)
	const block = "double_blocks.0."
	d0, err := h.digestOf(ctx, model, block)
	if err != nil {
		return err
	}

	var rep applyReply
	for _, k := range []int{1, scaleLoRAs} {
		set := make([]map[string]any, k)
		for i := range set {
			set[i] = map[string]any{"name": loraName(i), "strength": 1.0}
		}
		t, err := wall(func() error {
			return h.call(ctx, "POST", "/v1/loras/apply", map[string]any{"model": model, "loras": set, "mode": "fuse"}, &rep)
		})
		if err != nil {
			return err
		}
		what := fmt.Sprintf("fused apply of %d rank-%d LoRA(s) to %d layers, end to end", k, o.Rank, len(rep.Fused))
		r.Note("scale step: %s: %s", what, rep.phases())
		measured := fmt.Sprintf("%.3f s wall, %.3f s in the host; journal %s referenced in the file, %s in the arena",
			t, float64(rep.ElapsedNS)/1e9, MiB(int64(rep.JournalFileBytes)), MiB(int64(rep.JournalBytes)))
		if k == 1 {
			if len(rep.Fused) != len(lin) {
				r.Check("scale", "every block linear fused", fmt.Sprintf("%d of %d", len(rep.Fused), len(lin)), "all", false)
			}
			timeCheck(what, measured, "< 0.25 s", t < 0.25)
		} else {
			r.Add("scale", what+" (a re-apply: restores, then fuses)", measured, "", Info)
		}
		r.Check("scale", fmt.Sprintf("lora-nf4's device scratch for the fused pass, %d LoRA(s)", k), MiB(rep.Report.PeakScratchBytes),
			"≤ 64 MiB", rep.Report.PeakScratchBytes > 0 && rep.Report.PeakScratchBytes <= 64<<20)
	}
	dFused, err := h.digestOf(ctx, model, block)
	if err != nil {
		return err
	}
	tr, err := wall(func() error { return h.call(ctx, "DELETE", "/v1/loras?model="+model, nil, nil) })
	if err != nil {
		return err
	}
	d1, err := h.digestOf(ctx, model, block)
	if err != nil {
		return err
	}
	r.Check("scale", fmt.Sprintf("remove (%.3f s): %s* bytes, changed by the fuse (%s), back as loaded", tr, block, short(dFused)),
		short(d1), short(d0), d1 == d0 && dFused != d0)

	set := make([]map[string]any, scaleLoRAs)
	for i := range set {
		set[i] = map[string]any{"name": loraName(i), "strength": 1.0}
	}
	// The factors stored as f32 and as bf16 (half the bytes to build and
	// upload; the same bits for a bfloat16 forward); each from no factors.
	for _, fdt := range []string{"f32", "bf16"} {
		ts, err := wall(func() error {
			return h.call(ctx, "POST", "/v1/loras/apply", map[string]any{"model": model, "loras": set, "mode": "side", "factor_dtype": fdt}, &rep)
		})
		if err != nil {
			return err
		}
		r.Add("scale", fmt.Sprintf("side apply of %d rank-%d LoRAs, factor_dtype %s, end to end (parses the files, builds and uploads the factors)", scaleLoRAs, o.Rank, fdt),
			fmt.Sprintf("%.3f s wall, %.3f s in the host, %s of factors", ts, float64(rep.ElapsedNS)/1e9, MiB(rep.Report.SideBytes)), "", Info)
		if err := h.call(ctx, "DELETE", "/v1/loras?model="+model, nil, nil); err != nil {
			return err
		}
	}
	return nil
}

func loraName(i int) string { return fmt.Sprintf("flux-scale-lora-%d", i+1) }
