package arena

import (
	"cmp"
	"math/rand/v2"
	"slices"
	"testing"
)

// TestTreapAgainstSortedSlice drives the treap and a sorted slice with the
// same random operations and compares every answer.
func TestTreapAgainstSortedSlice(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	tr := newTreap(cmp.Compare[int])
	var ref []int
	for i := range 20000 {
		k := rng.IntN(500)
		pos, found := slices.BinarySearch(ref, k)
		switch op := rng.IntN(3); op {
		case 0:
			if got := tr.Insert(k); got != !found {
				t.Fatalf("op %d: insert %d = %v, present %v", i, k, got, found)
			}
			if !found {
				ref = slices.Insert(ref, pos, k)
			}
		case 1:
			if got := tr.Delete(k); got != found {
				t.Fatalf("op %d: delete %d = %v, present %v", i, k, got, found)
			}
			if found {
				ref = slices.Delete(ref, pos, pos+1)
			}
		default:
			c, ok := tr.Ceil(k)
			if wantOK := pos < len(ref); ok != wantOK || (ok && c != ref[pos]) {
				t.Fatalf("op %d: ceil %d = %d %v", i, k, c, ok)
			}
			f, ok := tr.Floor(k)
			fi := pos - 1
			if found {
				fi = pos
			}
			if wantOK := fi >= 0; ok != wantOK || (ok && f != ref[fi]) {
				t.Fatalf("op %d: floor %d = %d %v", i, k, f, ok)
			}
		}
		if tr.Len() != len(ref) {
			t.Fatalf("op %d: len %d, want %d", i, tr.Len(), len(ref))
		}
	}
	var got []int
	tr.Ascend(func(k int) bool { got = append(got, k); return true })
	if !slices.Equal(got, ref) {
		t.Fatalf("ascend: %d keys, want %d", len(got), len(ref))
	}
	if m, ok := tr.Max(); len(ref) > 0 && (!ok || m != ref[len(ref)-1]) {
		t.Fatalf("max %d", m)
	}
	if d := depth(tr.root); d > 60 {
		t.Errorf("depth %d for %d keys: unbalanced", d, tr.Len())
	}
}

func depth[K any](n *tnode[K]) int {
	if n == nil {
		return 0
	}
	return 1 + max(depth(n.left), depth(n.right))
}

func TestByteSize(t *testing.T) {
	tests := []struct {
		b    ByteSize
		want string
	}{
		{0, "0 B"}, {255, "255 B"}, {1023, "1023 B"}, {1024, "1.0 KiB"}, {1536, "1.5 KiB"},
		{64 << 20, "64.0 MiB"}, {3 << 30, "3.0 GiB"}, {1 << 40, "1.0 TiB"}, {^ByteSize(0), "16.0 EiB"},
	}
	for _, tc := range tests {
		if got := tc.b.String(); got != tc.want {
			t.Errorf("ByteSize(%d) = %q, want %q", uint64(tc.b), got, tc.want)
		}
	}
}
