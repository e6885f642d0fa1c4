package api

import (
	"context"
	"errors"
	"fmt"
	"image"
	"os"
	"path/filepath"
	"strings"

	"github.com/arenahost/arenahost/host/api/comfyui"
	"github.com/arenahost/arenahost/host/lora"
	v1 "github.com/arenahost/arenahost/sdk/api"
)

// comfyRoutes mounts the ComfyUI server API (package comfyui) at the root
// and under /api/, over comfyCore. Its input/output/temp folders live in
// DATA/comfyui.
func (a *API) comfyRoutes() {
	dir := filepath.Join(a.s.DataDir, "comfyui")
	c, err := comfyui.New(comfyCore{a}, comfyui.Options{Dir: dir, Logger: a.log, MaxUpload: a.opts.MaxBody, Frontend: a.opts.ComfyFrontend})
	if err != nil {
		a.log.Error("comfyui routes disabled", "err", err)
		return
	}
	a.comfy = c
	c.Register(a.mux)
}

// Close stops what the API runs in the background (the ComfyUI executor).
func (a *API) Close() {
	if a.comfy != nil {
		a.comfy.Close()
	}
}

// comfyCore is comfyui.Core over the server: checkpoints and LoRAs as the
// A1111 routes resolve them, sampling as pipeline jobs.
type comfyCore struct{ a *API }

func (c comfyCore) Checkpoints() ([]string, error) {
	ms, err := c.a.checkpoints()
	out := make([]string, 0, len(ms))
	for _, m := range ms {
		out = append(out, m.Title)
	}
	return out, err
}

func (c comfyCore) LoadCheckpoint(ctx context.Context, name string) (string, error) {
	return c.a.resolveCheckpoint(ctx, name)
}

// LoRAs lists LoRA files as ComfyUI does: paths relative to the LoRA
// directory, with their extension.
func (c comfyCore) LoRAs() ([]string, error) {
	ls, err := c.a.LoRAs()
	out := make([]string, 0, len(ls))
	for _, e := range ls {
		if e.Kind == v1.FileKindLoRA {
			out = append(out, e.Path)
		}
	}
	return out, err
}

// applyLoRAs makes exactly ls active on model.
func (c comfyCore) applyLoRAs(ctx context.Context, model string, ls []comfyui.LoRA) error {
	if c.a.s.LoRAs == nil {
		if len(ls) > 0 {
			return errors.New("this host runs no LoRA coordinator")
		}
		return nil
	}
	req := lora.Request{Model: model, Mode: lora.ModeSide}
	if len(ls) > 0 {
		all, err := c.a.LoRAs()
		if err != nil {
			return err
		}
		req.Mode = ls[0].Mode
		for _, l := range ls {
			e, err := c.a.loraEntry(l.Name, all, l.Strength)
			if err != nil {
				return err
			}
			req.LoRAs = append(req.LoRAs, e)
		}
	}
	res, err := c.a.s.LoRAs.Apply(ctx, req)
	c.a.Metrics.ObserveApply("apply", req.Mode, resElapsed(res), err)
	return err
}

func (c comfyCore) Sample(ctx context.Context, s comfyui.Sampling, ev comfyui.Events) (image.Image, error) {
	pipe, err := c.a.pipeline()
	if err != nil {
		return nil, err
	}
	release, err := c.a.gen.acquire(ctx)
	if err != nil {
		return nil, comfyui.ErrInterrupted
	}
	defer release()
	if err := c.applyLoRAs(ctx, s.Model, s.LoRAs); err != nil {
		return nil, fmt.Errorf("apply LoRAs: %w", err)
	}
	j, err := c.a.s.Jobs.Create(ctx, v1.JobSpec{
		Pipeline: pipe,
		Origin:   v1.OriginComfyUI,
		Params:   map[string]any{"prompt": s.Prompt, "steps": s.Steps, "seed": s.Seed, "width": s.Width, "height": s.Height, "model": s.Model},
		Preview:  v1.PreviewSpec{Format: "png", MaxSide: max(s.Width, s.Height)},
	})
	if err != nil {
		return nil, jobErr(err)
	}
	sub := c.a.s.Jobs.Subscribe(j.ID(), 0)
	defer sub.Close()
	deliver := func() {
		for _, e := range sub.Next() {
			switch {
			case e.Type == v1.EventProgress && ev.Progress != nil:
				ev.Progress(e.Job.Step, e.Job.Total)
			case e.Type == v1.EventFrame && ev.Frame != nil && e.Frame != nil:
				ev.Frame(e.Frame.Format, e.Frame.Data)
			}
		}
	}
wait:
	for {
		select {
		case <-sub.C():
			deliver()
		case <-j.Done():
			deliver()
			break wait
		case <-ctx.Done():
			j.Cancel()
			<-j.Done()
			return nil, comfyui.ErrInterrupted
		}
	}
	st := j.Snapshot()
	switch st.State {
	case v1.JobCancelled:
		return nil, comfyui.ErrInterrupted
	case v1.JobDone:
		return finalImage(j, s.Width, s.Height)
	}
	return nil, fmt.Errorf("pipeline job %s %s: %s", j.ID(), st.State, st.Error)
}

func (c comfyCore) Free(ctx context.Context) error {
	if c.a.s.LoRAs == nil {
		return nil
	}
	for _, m := range c.a.s.Registry.Models() {
		if st, err := c.a.s.LoRAs.State(m.Name); err == nil && len(st.LoRAs) > 0 {
			if _, err := c.a.s.LoRAs.Remove(ctx, m.Name); err != nil {
				return fmt.Errorf("remove LoRAs from %s: %w", m.Name, err)
			}
		}
	}
	return nil
}

func (c comfyCore) Stats() comfyui.Stats {
	st := c.a.s.Arena.Stats()
	out := comfyui.Stats{Device: "arenahost arena (" + st.Backend + ")", DeviceType: "cpu", DeviceTotal: uint64(st.Capacity),
		DeviceFree: uint64(st.Capacity - st.Allocated), Argv: os.Args}
	if strings.Contains(st.Backend, "cuda") {
		out.DeviceType = "cuda"
	}
	if total, avail, err := meminfo(); err == nil {
		out.RAMTotal, out.RAMFree = total, avail
	}
	return out
}
