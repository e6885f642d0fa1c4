package layout

import (
	"encoding/json"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
)

// Every parameter of SD1.5- and SDXL-structured UNets (names from
// diffusers, testdata/unet_names.json, written by testdata/unet_ldm_oracle.py
// names) maps to an LDM name with UNetToLDM and back; diffusers' own
// single-file converter, fed a checkpoint under those LDM names, puts every
// tensor back under its original diffusers name.
func TestUNetNamesAgainstDiffusersConverter(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("testdata", "unet_names.json"))
	if err != nil {
		t.Fatal(err)
	}
	var names map[string][]string
	if err := json.Unmarshal(raw, &names); err != nil {
		t.Fatal(err)
	}
	kinds := map[string]Layout{"sd15": SD15, "sdxl": SDXL}
	mapping := map[string]map[string]string{}
	for kind, l := range kinds {
		mapping[kind] = map[string]string{}
		if len(names[kind]) < 600 {
			t.Fatalf("%s: only %d names in the fixture", kind, len(names[kind]))
		}
		for _, n := range names[kind] {
			i := strings.LastIndex(n, ".")
			mod, param := n[:i], n[i:]
			ldm, ok := UNetToLDM(l, mod)
			if !ok {
				t.Errorf("%s: no LDM name for %s", kind, n)
				continue
			}
			if back, ok := UNetToDiffusers(l, ldm); !ok || back != mod {
				t.Errorf("%s: %s → %s → %q", kind, mod, ldm, back)
			}
			mapping[kind][n] = ldm + param
		}
	}
	if t.Failed() {
		return
	}
	py := testenv.TorchPython(t)
	dir := t.TempDir()
	in, out := filepath.Join(dir, "in.json"), filepath.Join(dir, "out.json")
	b, _ := json.Marshal(mapping)
	if err := os.WriteFile(in, b, 0o644); err != nil {
		t.Fatal(err)
	}
	testenv.RunPython(t, py, filepath.Join("testdata", "unet_ldm_oracle.py"), "convert", in, out)
	b, err = os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var conv map[string]map[string]int
	if err := json.Unmarshal(b, &conv); err != nil {
		t.Fatal(err)
	}
	for kind := range kinds {
		diffNames := make([]string, 0, len(mapping[kind]))
		for n := range mapping[kind] {
			diffNames = append(diffNames, n)
		}
		sort.Strings(diffNames) // the script numbers tensors in this order
		if len(conv[kind]) != len(diffNames) {
			t.Errorf("%s: converter produced %d tensors from %d", kind, len(conv[kind]), len(diffNames))
		}
		for i, n := range diffNames {
			if got, ok := conv[kind][n]; !ok || got != i {
				t.Errorf("%s: diffusers put tensor %d (%s, LDM %s) under another name (got %d, present %v)", kind, i, n, mapping[kind][n], got, ok)
			}
		}
	}
}
