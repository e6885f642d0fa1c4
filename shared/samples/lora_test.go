package samples

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/lora"
)

// The sample LoRAs parse as their formats and land on the sample model with
// every key matched: the kohya file on the BFL names directly, the PEFT file
// through the diffusers → BFL row maps.
func TestSampleLoRAs(t *testing.T) {
	dir := t.TempDir()
	if err := WriteLoRAs(dir, 1); err != nil {
		t.Fatal(err)
	}
	m, err := LoRAModel()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		file   string
		format lora.KeyFormat
		rank   int
		scale  float64
		prefix string
	}{
		{KohyaLoRAFile, lora.FormatKohya, 8, 0.5, "lora_unet_"},
		{PEFTLoRAFile, "diffusers", 4, 1, "transformer."},
	} {
		f, err := lora.Parse(filepath.Join(dir, c.file))
		if err != nil {
			t.Fatal(err)
		}
		if f.Format != c.format || len(f.Modules) == 0 || len(f.Unknown) != 0 {
			t.Errorf("%s: format %q, %d modules, unknown %v", c.file, f.Format, len(f.Modules), f.Unknown)
		}
		for _, mod := range f.Modules {
			if mod.Rank != c.rank || mod.Scale != c.scale || !strings.HasPrefix(mod.Key, c.prefix) {
				t.Fatalf("%s: module %s rank %d scale %v", c.file, mod.Key, mod.Rank, mod.Scale)
			}
		}
		mp, err := m.Map(f)
		if err != nil {
			t.Fatal(err)
		}
		if len(mp.Unmatched) != 0 || len(mp.Targets) != len(f.Modules) {
			t.Errorf("%s: %d of %d modules placed, unmatched %v", c.file, len(mp.Targets), len(f.Modules), mp.Unmatched)
		}
	}
}
