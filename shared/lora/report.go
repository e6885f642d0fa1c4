package lora

import (
	"path/filepath"

	"github.com/arenahost/arenahost/shared/lora/lorareport"
)

// The report shapes live in shared/lora/lorareport (dependency-free, so
// sdk/api builds on every platform); these aliases keep lora's names.
type (
	LoRAReport  = lorareport.LoRAReport
	LayerReport = lorareport.LayerReport
	Report      = lorareport.Report
	Phase       = lorareport.Phase
)

// DefaultWarnRetention is the retention below which a fused layer gets a
// warning when FuseOptions.WarnRetention is 0.
const DefaultWarnRetention = lorareport.DefaultWarnRetention

func newReport(maps []*Mapping, strengths []float64, mode string) *Report {
	r := &Report{Mode: mode}
	for i, m := range maps {
		types := map[NetType]bool{}
		var ts []NetType
		for _, t := range m.File.Modules {
			if !types[t.Type] {
				types[t.Type] = true
				ts = append(ts, t.Type)
			}
		}
		r.LoRAs = append(r.LoRAs, LoRAReport{
			File: filepath.Base(m.File.Path), Format: m.File.Format, Types: ts, Meta: m.File.Meta,
			Strength: strengths[i], Matched: len(m.Targets), Unmatched: m.Unmatched,
		})
	}
	return r
}
