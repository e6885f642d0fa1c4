// Command pipeline is a test pipeline plugin (kind "pipeline"): its "run"
// method works for a fixed time per step and publishes each step's latent,
// written into one of two host regions it alternates between (as real
// pipelines reuse buffers), so job tests do not depend on Python timing.
package main

import (
	"context"
	"fmt"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/arenahost/arenahost/sdk"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// RunArgs are the msgpack parameters of run.
type RunArgs struct {
	JobID    string  `msgpack:"job_id"`
	Steps    int     `msgpack:"steps"`
	StepMS   float64 `msgpack:"step_ms"`
	Spin     bool    `msgpack:"spin"` // busy-wait instead of sleeping
	Channels int     `msgpack:"channels"`
	Height   int     `msgpack:"height"`
	Width    int     `msgpack:"width"`
	Layout   string  `msgpack:"layout"` // "chw" or "tokens" ([H·W, C])
	Arch     string  `msgpack:"arch"`
}

// RunResult reports the measured step times.
type RunResult struct {
	Steps  int       `msgpack:"steps"`
	StepMS []float64 `msgpack:"step_ms"`
	MeanMS float64   `msgpack:"mean_step_ms"`
	// PublishMS is the mean time of the Publish call alone.
	PublishMS float64 `msgpack:"mean_publish_ms"`
	Accepted  int     `msgpack:"accepted"`
}

func run(ctx context.Context, c *sdk.Call, a RunArgs) (RunResult, error) {
	if a.Steps < 1 || a.Steps > 100000 {
		return RunResult{}, fmt.Errorf("args.steps: %d out of range: %w", a.Steps, sdk.ErrInvalidArgument)
	}
	if a.Channels == 0 {
		a.Channels = 16
	}
	if a.Height == 0 {
		a.Height = 16
	}
	if a.Width == 0 {
		a.Width = 16
	}
	if a.Arch == "" {
		a.Arch = "flux1"
	}
	shape := []int64{int64(a.Channels), int64(a.Height), int64(a.Width)}
	if a.Layout == "tokens" {
		shape = []int64{int64(a.Height * a.Width), int64(a.Channels)}
	}
	var bufs [2]*pluginv1.TensorDescriptor
	for i := range bufs {
		d, err := c.Host().Allocate(ctx, fmt.Sprintf("%s/latent-%d", a.JobID, i), pluginv1.DType_DTYPE_F32, shape)
		if err != nil {
			return RunResult{}, fmt.Errorf("allocate latent: %w", err)
		}
		bufs[i] = d
	}
	defer c.Host().Free(context.WithoutCancel(ctx), bufs[0].GetRegion(), bufs[1].GetRegion())
	payload, _ := msgpack.Marshal(map[string]any{"arch": a.Arch, "layout": a.Layout})
	res := RunResult{Steps: a.Steps}
	var sum float64
	for i := range a.Steps {
		if err := ctx.Err(); err != nil {
			return RunResult{}, fmt.Errorf("job %s: step %d: %w", a.JobID, i, err)
		}
		t0 := time.Now()
		d := bufs[i%2]
		xs, err := c.Float32s(d)
		if err != nil {
			return RunResult{}, err
		}
		// A smooth pattern that changes with the step.
		v := float32(i+1) / float32(a.Steps)
		for k := range xs {
			xs[k] = v * float32((k%7)-3) / 3
		}
		work := time.Duration(a.StepMS * float64(time.Millisecond))
		if a.Spin {
			for time.Since(t0) < work {
			}
		} else {
			time.Sleep(work - time.Since(t0))
		}
		tp := time.Now()
		ok, err := c.Host().Publish(ctx, &pluginv1.PublishRequest{JobId: a.JobID, Topic: "latent", Step: int32(i + 1), Total: int32(a.Steps),
			Payload: payload, Tensors: []*pluginv1.TensorDescriptor{d}})
		if err != nil {
			return RunResult{}, fmt.Errorf("publish step %d: %w", i+1, err)
		}
		res.PublishMS += float64(time.Since(tp).Microseconds()) / 1000
		if ok {
			res.Accepted++
		}
		ms := float64(time.Since(t0).Microseconds()) / 1000
		res.StepMS = append(res.StepMS, ms)
		sum += ms
	}
	res.MeanMS = sum / float64(a.Steps)
	res.PublishMS /= float64(a.Steps)
	return res, nil
}

func main() {
	p := sdk.New("test-pipeline", "0.1.0", "pipeline")
	sdk.Method(p, "run", run, sdk.Doc("publish a latent per step at a fixed step time"))
	sdk.Serve(p)
}
