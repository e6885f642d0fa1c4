package lora

import (
	"math"
	"strings"
	"testing"
)

func TestReportSetFit(t *testing.T) {
	for _, c := range []struct {
		name                string
		dot, norm, diff     float64
		retention, relError float64
		warned              bool
	}{
		{"kept", 3.6, 4, 0.16, 0.9, 0.2, false},
		{"erased", 1, 4, 9, 0.25, 1.5, true},
		{"nothing fused", 0, 0, 0, 0, 0, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := &Report{Layers: make([]LayerReport, 2)}
			r.SetLayerFit(1, "blk.0", c.dot, c.norm, c.diff, DefaultWarnRetention)
			r.SetFit(c.dot, c.norm, c.diff)
			lr := r.Layers[1]
			if math.Abs(lr.Retention-c.retention) > 1e-12 || math.Abs(lr.RelError-c.relError) > 1e-12 ||
				lr.Retention != r.Retention || lr.RelError != r.RelError || r.Layers[0] != (LayerReport{}) {
				t.Fatalf("layer %+v, report %v %v; want %v %v", lr, r.Retention, r.RelError, c.retention, c.relError)
			}
			if warned := len(r.Warnings) == 1 && strings.HasPrefix(r.Warnings[0], "blk.0: retention 0.250 below 0.50") && lr.Warning != ""; warned != c.warned || (!c.warned && len(r.Warnings) != 0) {
				t.Fatalf("warnings %q, layer warning %q", r.Warnings, lr.Warning)
			}
		})
	}
}
