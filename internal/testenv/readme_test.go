package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestReadmeNamesEveryPackage keeps the README's architecture table
// complete: every package of the module is named in it in backquotes (a
// row may name several, and "`sdk/`" names the sdk root).
func TestReadmeNamesEveryPackage(t *testing.T) {
	root := RepoRoot(t)
	readme, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "list", "-f", "{{.Dir}}", "./...")
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var missing []string
	for _, dir := range strings.Fields(string(out)) {
		rel, err := filepath.Rel(root, dir)
		if err != nil {
			t.Fatal(err)
		}
		rel = filepath.ToSlash(rel)
		if !strings.Contains(string(readme), "`"+rel+"`") && !strings.Contains(string(readme), "`"+rel+"/`") {
			missing = append(missing, rel)
		}
	}
	if len(missing) > 0 {
		t.Errorf("README.md's architecture table names no row for %d package(s): %s", len(missing), strings.Join(missing, ", "))
	}
}
