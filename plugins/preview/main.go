// Command preview is arenahost's preview plugin (kind "preview"): it renders
// a published latent, read in place through its descriptor, into a JPEG or
// PNG preview with package render. Its methods are in methods.go; this file
// only wires them up.
//
// The factor method (latent-to-RGB factors, ComfyUI's Latent2RGB) is always
// served. The TAESD/TAEF1 method is served only when ARENAHOST_PREVIEW_DECODER
// names a decoder weights file (safetensors) that loads; Describe lists the
// render.<method> entries the host may pick for a job.
package main

import (
	"log/slog"
	"os"
	"strconv"

	"github.com/arenahost/arenahost/sdk"
)

// EnvDecoder names the TAESD/TAEF1 decoder weights file.
const EnvDecoder = "ARENAHOST_PREVIEW_DECODER"

// EnvNice sets the plugin's nice value (default DefaultNice; 0 keeps the
// host's priority). Previews must never slow generation: at a lower
// priority, rendering takes only the CPU time a CPU-bound pipeline leaves.
const EnvNice = "ARENAHOST_PREVIEW_NICE"

// DefaultNice is the preview plugin's default nice value: the lowest
// priority. Against a pipeline that keeps both cores of a 2-core machine
// busy, rendering every 20 ms step cost it +3.1–3.9 % at nice 10 and
// +2.0–3.6 % at nice 19 (bench/results.md); with a pipeline that waits on
// an accelerator the renderer gets the CPU it needs either way, and
// publish-to-frame latency is unchanged.
const DefaultNice = 19

func main() {
	log := slog.New(sdk.NewLogHandler(os.Stderr, slog.LevelInfo))
	p := sdk.New("preview", "0.1.0", "preview")
	p.Logger = log
	nice := DefaultNice
	if v := os.Getenv(EnvNice); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > 19 {
			log.Error("ignoring "+EnvNice+": want 0..19", "value", v)
		} else {
			nice = n
		}
	}
	if nice > 0 {
		if err := lowerPriority(nice); err != nil {
			log.Warn("previews run at the host's priority", "err", err)
		}
	}
	r := &renderer{}
	if path := os.Getenv(EnvDecoder); path != "" {
		if err := r.loadDecoder(path); err != nil {
			// Previews still work with the factor method; the missing taesd
			// method makes jobs that ask for it fail at creation, not mid-run.
			log.Error("taesd method disabled", "env", EnvDecoder, "err", err)
		}
	}
	r.register(p)
	sdk.Serve(p)
}
