package api

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestDocsCoverEveryRoute keeps docs/api.md honest: every route registered
// in this package's source has a section "### `METHOD /path`" there (a
// section may list several routes).
func TestDocsCoverEveryRoute(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "api.md"))
	if err != nil {
		t.Fatal(err)
	}
	var headings []string
	for _, line := range strings.Split(string(doc), "\n") {
		if strings.HasPrefix(line, "### ") {
			headings = append(headings, line)
		}
	}
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	route := regexp.MustCompile(`mux\.Handle(?:Func)?\("([A-Z]+) (/[^"]*)"`)
	n := 0
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range route.FindAllStringSubmatch(string(src), -1) {
			n++
			method, path := m[1], m[2]
			if path == "/" {
				continue // the console
			}
			want := "`" + method + " " + path
			found := false
			for _, h := range headings {
				if strings.Contains(h, want+"`") || strings.Contains(h, want+"?") {
					found = true
				}
			}
			if !found {
				t.Errorf("%s: route %s %s has no \"### `%s %s`\" section in docs/api.md", f, method, path, method, path)
			}
		}
	}
	if n < 10 {
		t.Fatalf("found only %d routes in the source: the pattern is stale", n)
	}
}
