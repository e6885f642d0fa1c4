package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/lora/lorawire"
	"github.com/arenahost/arenahost/shared/samples"
)

func sampleLoRAModel(t *testing.T) *lora.Model {
	t.Helper()
	m, err := samples.LoRAModel()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestMapSetParallel: a set parsed several files at a time maps exactly
// as one parsed file by file, in the set's order, and a set with bad files
// reports the first bad one in the set's order, whichever worker met it.
func TestMapSetParallel(t *testing.T) {
	m := sampleLoRAModel(t)
	dir := t.TempDir()
	var good []string
	for i := range 5 {
		p := filepath.Join(dir, fmt.Sprintf("l%d.safetensors", i))
		if err := samples.WriteKohyaLoRA(p, samples.LoRAOptions{Rank: 4 + i, Seed: uint64(10 + i)}); err != nil {
			t.Fatal(err)
		}
		good = append(good, p)
	}
	truncated := filepath.Join(dir, "truncated.safetensors")
	raw, err := os.ReadFile(good[0])
	if err == nil {
		err = os.WriteFile(truncated, raw[:len(raw)/2], 0o644)
	}
	if err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.safetensors")
	spec := func(paths ...string) []lorawire.LoRASpec {
		var s []lorawire.LoRASpec
		for i, p := range paths {
			s = append(s, lorawire.LoRASpec{Path: p, Strength: 0.5 + float64(i)})
		}
		return s
	}
	seq, par := newEngine(), newEngine()
	seq.parseWorkers, par.parseWorkers = 1, 4
	ms, ss, err := seq.mapSet(m, spec(good...), true, false)
	if err != nil {
		t.Fatal(err)
	}
	mp, sp, err := par.mapSet(m, spec(good...), true, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(mp) != len(ms) || len(sp) != len(ss) {
		t.Fatalf("parallel: %d maps %d strengths, sequential %d %d", len(mp), len(sp), len(ms), len(ss))
	}
	for i := range ms {
		if mp[i].File.Path != good[i] || sp[i] != ss[i] || len(mp[i].Targets) != len(ms[i].Targets) || mp[i].File.Modules[0].Rank != 4+i {
			t.Errorf("LoRA %d: parallel %s strength %v %d targets rank %d, sequential %s %v %d", i,
				mp[i].File.Path, sp[i], len(mp[i].Targets), mp[i].File.Modules[0].Rank, ms[i].File.Path, ss[i], len(ms[i].Targets))
		}
	}
	for _, c := range []struct {
		paths []string
		want  string
	}{
		{[]string{good[0], good[1], truncated, good[2], missing}, "truncated.safetensors"},
		{[]string{good[0], missing, good[1], truncated, good[2]}, "missing.safetensors"},
		{[]string{missing, truncated}, "missing.safetensors"},
	} {
		for _, e := range []*engine{seq, par} {
			_, _, err := e.mapSet(m, spec(c.paths...), false, false)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("%d workers, set %v: error %v, want one naming %s", e.parseWorkers, c.paths, err, c.want)
			}
		}
	}
}
