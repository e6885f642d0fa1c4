package lora

import slora "github.com/arenahost/arenahost/shared/lora"

// The msgpack arguments and results of the lora-nf4 plugin's methods, as
// plugins/lora-nf4/wire.go defines them (the host imports no plugin code);
// the tests run the real plugin binary, so a drift fails them.

// PluginName is the plugin the coordinator calls by default.
const PluginName = "lora-nf4"

// Modes of an apply.
const (
	ModeSide = "side"
	ModeFuse = "fuse"
)

func journalPacked(w string) string { return "journal/" + w + "/packed" }
func journalAbsmax(w string) string { return "journal/" + w + "/absmax" }
func factorA(w string) string       { return "factors/" + w + "/A" }
func factorB(w string) string       { return "factors/" + w + "/B" }

type loraSpec struct {
	Path     string  `msgpack:"path"`
	Strength float64 `msgpack:"strength"`
}

type applyArgs struct {
	Model     string     `msgpack:"model"`
	LoRAs     []loraSpec `msgpack:"loras"`
	Mode      string     `msgpack:"mode"`
	Strict    bool       `msgpack:"strict"`
	TileElems int        `msgpack:"tile_elems"`
}

type planResult struct {
	Weights []string `msgpack:"weights"`
}

type factor struct {
	Weight string `msgpack:"weight"`
	A      string `msgpack:"a"`
	B      string `msgpack:"b"`
	Rank   int    `msgpack:"rank"`
	Out    int    `msgpack:"out"`
	In     int    `msgpack:"in"`
}

type applyResult struct {
	Report  *slora.Report `msgpack:"report"`
	Factors []factor      `msgpack:"factors"`
	Fused   []string      `msgpack:"fused"`
}

type setStrengthsArgs struct {
	Model     string    `msgpack:"model"`
	Strengths []float64 `msgpack:"strengths"`
}

type setStrengthsResult struct {
	Touched []slora.Touched `msgpack:"touched"`
	Report  *slora.Report   `msgpack:"report"`
}

type removeArgs struct {
	Model string `msgpack:"model"`
}
