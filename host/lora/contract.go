package lora

import "github.com/arenahost/arenahost/shared/lora/lorawire"

// PluginName is the plugin the coordinator calls by default. The methods'
// arguments and results are shared/lora/lorawire's, which the plugin
// imports too.
const PluginName = lorawire.PluginName

// Modes of an apply.
const (
	ModeSide = lorawire.ModeSide
	ModeFuse = lorawire.ModeFuse
)

// Side-factor storage dtypes of a request (Request.FactorDType).
const (
	FactorF32  = lorawire.FactorF32
	FactorBF16 = lorawire.FactorBF16
)

// CheckFactorDType returns a factor dtype's canonical spelling ("" is
// FactorF32) or an error naming it.
func CheckFactorDType(dt string) (string, error) { return lorawire.CheckFactorDType(dt) }
