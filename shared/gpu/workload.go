package gpu

import (
	"strings"

	"github.com/arenahost/arenahost/shared/layout"
)

// BlockLinears returns the Linear layers inside the double and single
// blocks of a Flux model in BFL layout: the layers LoRAs train and the GPU
// check merges into (304 for FLUX.1-dev; the 10 head and tail linears of
// the 314 in layout.FluxConfig.Linears are left out).
func BlockLinears(c layout.FluxConfig) ([]layout.Linear, error) {
	all, err := c.Linears(layout.FluxBFL)
	if err != nil {
		return nil, err
	}
	var out []layout.Linear
	for _, l := range all {
		if strings.HasPrefix(l.Name, "double_blocks.") || strings.HasPrefix(l.Name, "single_blocks.") {
			out = append(out, l)
		}
	}
	return out, nil
}
