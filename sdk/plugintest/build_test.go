package plugintest_test

import (
	"os"
	"testing"

	"github.com/arenahost/arenahost/sdk/plugintest"
)

// TestRemoveIsItsOwn: a Binary's Remove deletes its own binary and leaves
// the others of the shared cache; Clean deletes them all.
func TestRemoveIsItsOwn(t *testing.T) {
	one := plugintest.NewBinary("./testdata/tiny", "one")
	two := plugintest.NewBinary("./testdata/tiny", "two")
	p1, p2 := one.Path(t), two.Path(t)
	t.Cleanup(plugintest.Clean)
	one.Remove()
	if _, err := os.Stat(p1); !os.IsNotExist(err) {
		t.Errorf("after one.Remove, %s: %v, want gone", p1, err)
	}
	if _, err := os.Stat(p2); err != nil {
		t.Fatalf("one.Remove removed two's binary: %v", err)
	}
	if p := one.Path(t); p == "" {
		t.Fatal("one.Path after Remove: empty")
	} else if _, err := os.Stat(p); err != nil {
		t.Fatalf("one.Path after Remove did not build again: %v", err)
	}
	plugintest.Clean()
	if _, err := os.Stat(p2); !os.IsNotExist(err) {
		t.Errorf("after Clean, %s: %v, want gone", p2, err)
	}
}
