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
