package api

import (
	"context"
	"sync"
)

// genLock serialises generations that set LoRAs and then run a pipeline
// job (A1111's txt2img, a ComfyUI sampler node): the LoRA set is the
// model's, so another generation applying its own set between the apply
// and the job would run this job with the wrong LoRAs. Waiting for it can
// be cancelled.
type genLock struct {
	once sync.Once
	ch   chan struct{}
}

// acquire waits for the lock (or ctx) and returns its release.
func (g *genLock) acquire(ctx context.Context) (func(), error) {
	g.once.Do(func() { g.ch = make(chan struct{}, 1) })
	select {
	case g.ch <- struct{}{}:
		return func() { <-g.ch }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}
