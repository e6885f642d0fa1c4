// Command go-client is an extension author's program outside the
// arenahost module: with only sdk/client and sdk/api it lists the loaded
// models, applies a LoRA, runs a job on the default pipeline while
// streaming its preview frames and events, and removes the LoRA again.
//
//	go run . -host http://127.0.0.1:7860 [-token TOKEN] [-lora NAME] [-steps 8] [-out DIR]
//
// It prints one line per thing it saw; module_test.go builds it as a
// separate module and runs it against a real `arenahost serve`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/sdk/client"
)

func main() {
	host := flag.String("host", "http://127.0.0.1:7860", "the host's address")
	token := flag.String("token", os.Getenv("ARENAHOST_TOKEN"), "the host's --token (mutating routes)")
	loraName := flag.String("lora", "", "the LoRA to apply (default: the first LoRA file the host lists)")
	steps := flag.Int("steps", 8, "steps of the job")
	out := flag.String("out", "", "a directory to write the preview frames to (none when empty)")
	wait := flag.Duration("wait", 2*time.Minute, "how long to wait for the host's plugins to serve")
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), *wait+5*time.Minute)
	defer cancel()
	if err := run(ctx, *host, *token, *loraName, *steps, *out, *wait); err != nil {
		fmt.Fprintln(os.Stderr, "go-client:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, host, token, loraName string, steps int, out string, wait time.Duration) error {
	c, err := client.New(host, client.WithToken(token))
	if err != nil {
		return err
	}
	models, err := c.Models(ctx)
	if err != nil {
		return err
	}
	if len(models) == 0 {
		return errors.New("the host has no model loaded (POST /v1/models first)")
	}
	for _, m := range models {
		fmt.Printf("model %s format=%s layout=%s weights=%d bytes=%d\n", m.Name, m.Format, m.Layout, m.Weights, m.Bytes)
	}

	if loraName == "" {
		files, err := c.LoRAs(ctx)
		if err != nil {
			return err
		}
		for _, f := range files {
			if f.Kind == api.FileKindLoRA {
				loraName = f.Name
				break
			}
		}
		if loraName == "" {
			return errors.New("the host's LoRA directory has no LoRA file")
		}
	}
	strength := 0.8
	req := api.ApplyRequest{Model: models[0].Name, LoRAs: []api.ApplyLoRA{{Name: loraName, Strength: &strength}}, Mode: api.ModeSide}
	res, err := retry(ctx, wait, func() (*api.LoRAResult, error) { return c.ApplyLoRAs(ctx, req) })
	if err != nil {
		return err
	}
	st, err := c.LoRAState(ctx, models[0].Name)
	if err != nil {
		return err
	}
	var applied []string
	for _, l := range st.LoRAs {
		applied = append(applied, fmt.Sprintf("%s:%g", l.Name, l.Strength))
	}
	fmt.Printf("lora applied model=%s mode=%s path=%s loras=%s binding_generation=%d\n", st.Model, st.Mode, res.Path, strings.Join(applied, ","), st.BindingGeneration)

	pipes, err := retry(ctx, wait, func() (*api.Pipelines, error) {
		p, err := c.Pipelines(ctx)
		if err == nil && p.Default == "" {
			return nil, &client.Error{Status: 503, Code: "plugin_unavailable", Detail: p.Reason, RetryAfter: time.Second}
		}
		return p, err
	})
	if err != nil {
		return err
	}
	job, err := c.CreateJob(ctx, api.JobSpec{Pipeline: pipes.Default,
		Params:  map[string]any{"steps": steps, "seed": 7, "width": 256, "height": 256},
		Preview: api.PreviewSpec{Format: "jpeg"}})
	if err != nil {
		return err
	}
	fmt.Printf("job %s created pipeline=%s state=%s\n", job.ID, job.Pipeline, job.State)

	// Events and previews stream side by side; each ends after the job's
	// final state.
	type counts struct {
		progress, frames int
		last             api.JobEvent
		err              error
	}
	evc := make(chan counts, 1)
	events, err := c.Events(ctx, job.ID)
	if err != nil {
		return err
	}
	go func() {
		defer events.Close()
		var n counts
		for {
			ev, err := events.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				n.err = err
				break
			}
			switch ev.Type {
			case api.EventProgress:
				n.progress++
			case api.EventFrame:
				n.frames++
			}
			n.last = ev.Data
		}
		evc <- n
	}()
	previews, err := c.Previews(ctx, job.ID)
	if err != nil {
		return err
	}
	frames := 0
	for {
		f, err := previews.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			previews.Close()
			return err
		}
		frames++
		fmt.Printf("preview frame=%d step=%d type=%s bytes=%d\n", f.ID, f.Step, f.ContentType, len(f.Data))
		if out != "" {
			if err := os.WriteFile(filepath.Join(out, fmt.Sprintf("frame-%03d.jpg", f.ID)), f.Data, 0o644); err != nil {
				previews.Close()
				return err
			}
		}
	}
	previews.Close()
	ev := <-evc
	if ev.err != nil {
		return ev.err
	}
	fmt.Printf("events progress=%d frame=%d final=%s\n", ev.progress, ev.frames, ev.last.State)
	final, err := c.Wait(ctx, job.ID)
	if err != nil {
		return err
	}
	fmt.Printf("job %s %s step=%d/%d previews=%d rendered=%d\n", final.ID, final.State, final.Step, final.Total, frames, final.Preview.Rendered)
	if final.State != api.JobDone {
		return fmt.Errorf("job %s ended %s: %s", final.ID, final.State, final.Error)
	}

	rm, err := c.RemoveLoRAs(ctx, models[0].Name)
	if err != nil {
		return err
	}
	fmt.Printf("lora removed model=%s loras=%d\n", rm.Model, len(rm.LoRAs))
	return nil
}

// retry calls fn until it succeeds, fails with anything but a 503 (the
// plugin it needs is still starting), or wait has passed; it sleeps the
// host's Retry-After between tries.
func retry[T any](ctx context.Context, wait time.Duration, fn func() (T, error)) (T, error) {
	deadline := time.Now().Add(wait)
	for {
		v, err := fn()
		var ce *client.Error
		if err == nil || !errors.As(err, &ce) || ce.Status != 503 || time.Now().After(deadline) {
			return v, err
		}
		d := ce.RetryAfter
		if d <= 0 || d > 2*time.Second {
			d = 500 * time.Millisecond
		}
		select {
		case <-ctx.Done():
			return v, ctx.Err()
		case <-time.After(d):
		}
	}
}
