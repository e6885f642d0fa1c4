// Command lora-nf4 is arenahost's LoRA plugin (kind "lora"): it applies
// LoRA files to the host's bitsandbytes NF4 models through package
// shared/lora, in side mode (exact factors A_cat/B_cat in host regions,
// bound to the layers by the host) or fuse mode (the NF4 bytes rewritten in
// place, journaled by the host first), on CPU segments or, when the host's
// arena is on the GPU, on CUDA slabs through shared/gpu's kernels. Its
// methods and their msgpack arguments are in methods.go and
// shared/lora/lorawire; this file only wires them up.
package main

import (
	"context"
	"log/slog"
	"os"

	"github.com/arenahost/arenahost/sdk"
)

func main() {
	log := slog.New(sdk.NewLogHandler(os.Stderr, slog.LevelInfo))
	p := sdk.New("lora-nf4", "0.1.0", "lora")
	p.Logger = log
	e := newEngine()
	e.register(p)
	err := p.Serve(context.Background())
	if cerr := e.Close(); cerr != nil {
		log.Error("close device", "err", cerr)
	}
	if err != nil {
		log.Error("plugin stopped", "err", err)
		os.Exit(1)
	}
}
