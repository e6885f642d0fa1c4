package registry

import (
	"errors"
	"slices"
	"sync"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
)

type freeLog struct {
	mu    sync.Mutex
	freed []arena.Region
	fail  bool
}

func (f *freeLog) Free(r arena.Region) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail {
		return errors.New("free refused")
	}
	f.freed = append(f.freed, r)
	return nil
}

func fac(w string, seg uint32) Factors {
	return Factors{Weight: w, A: arena.Region{Segment: seg, Offset: 0, Length: 4 * 4 * 8, Generation: 1},
		B: arena.Region{Segment: seg, Offset: 4096, Length: 4 * 16 * 4, Generation: 2}, Rank: 4, Out: 16, In: 8}
}

func TestBindingsSwap(t *testing.T) {
	fl := &freeLog{}
	b := NewBindings(fl)
	g1, err := b.Swap("m", []Factors{fac("a.weight", 1), fac("b.weight", 2)})
	if err != nil || g1 == 0 {
		t.Fatalf("swap: %d %v", g1, err)
	}
	if f, g, ok := b.Get("m", "a.weight"); !ok || g != g1 || f.A.Segment != 1 {
		t.Fatalf("get: %+v %d %v", f, g, ok)
	}
	// Swapping in a new set frees the old regions, after the swap.
	g2, err := b.Swap("m", []Factors{fac("a.weight", 3)})
	if err != nil || g2 <= g1 {
		t.Fatalf("second swap: %d %v", g2, err)
	}
	if len(fl.freed) != 4 {
		t.Errorf("freed %v, want the 4 regions of the old set", fl.freed)
	}
	if _, _, ok := b.Get("m", "b.weight"); ok {
		t.Error("b.weight still bound after the swap")
	}
	// Touch keeps regions, changes the generation.
	g3 := b.Touch("m")
	if f, g, _ := b.Get("m", "a.weight"); g != g3 || g3 <= g2 || f.A.Segment != 3 {
		t.Errorf("touch: gen %d (was %d), factors %+v", g3, g2, f)
	}
	// A set that reuses a region does not free it.
	keep := fac("a.weight", 3)
	fl.freed = nil
	if _, err := b.Swap("m", []Factors{keep}); err != nil {
		t.Fatal(err)
	}
	if len(fl.freed) != 0 {
		t.Errorf("freed reused regions %v", fl.freed)
	}
	if err := b.Drop("m"); err != nil {
		t.Fatal(err)
	}
	if g, fs := b.Current("m"); g != 0 || fs != nil {
		t.Errorf("after drop: %d %v", g, fs)
	}
	if !slices.Contains(fl.freed, keep.A) || !slices.Contains(fl.freed, keep.B) {
		t.Errorf("drop freed %v", fl.freed)
	}
}

func TestBindingsRejectBadSets(t *testing.T) {
	b := NewBindings(&freeLog{})
	small := fac("a.weight", 1)
	small.A.Length = 8
	for name, set := range map[string][]Factors{
		"duplicate":    {fac("a.weight", 1), fac("a.weight", 2)},
		"region small": {small},
		"zero rank":    {{Weight: "x.weight", Out: 1, In: 1}},
	} {
		if _, err := b.Swap("m", set); err == nil {
			t.Errorf("%s: swap accepted", name)
		}
		if g, _ := b.Current("m"); g != 0 {
			t.Errorf("%s: a rejected set was bound", name)
		}
	}
}

func TestBindingsConcurrentReaders(t *testing.T) {
	b := NewBindings(&freeLog{})
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for r := 0; r < 4; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				// A reader sees one whole set: both weights from the same swap.
				fa, ga, oka := b.Get("m", "a.weight")
				g, fs := b.Current("m")
				if oka && len(fs) == 2 && g == ga && fs[0].A.Segment != fa.A.Segment {
					t.Error("mixed binding sets")
					return
				}
			}
		}()
	}
	for i := uint32(1); i < 200; i++ {
		if _, err := b.Swap("m", []Factors{fac("a.weight", i), fac("b.weight", i)}); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
}
