package lora

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/layout"
)

// FuzzLoRAKey: the key parser (suffix split, component prefix, kohya
// flattening) never panics, and a split key is its module plus a known
// suffix.
func FuzzLoRAKey(f *testing.F) {
	f.Add("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight")
	f.Fuzz(func(t *testing.T, key string) {
		module, r, ok := splitKey(key)
		if !ok {
			return
		}
		if module == "" || r == "" || !strings.HasPrefix(key, module) || len(module) >= len(key) {
			t.Fatalf("splitKey(%q) = %q, %q", key, module, r)
		}
		comp, path, _ := resolve(module)
		if comp == "" {
			t.Fatalf("resolve(%q): no component", module)
		}
		_ = layout.KohyaName("", path)
		_ = formatOf(&Module{Key: module})
	})
}

// FuzzLoRAFile: Parse of arbitrary bytes never panics and fails naming the
// file.
func FuzzLoRAFile(f *testing.F) {
	f.Add([]byte("\x10\x00\x00\x00\x00\x00\x00\x00{\"__metadata__\":{}}"))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(dir, "fuzz.safetensors")
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		file, err := Parse(path)
		if err != nil {
			if !strings.Contains(err.Error(), "fuzz.safetensors") {
				t.Fatalf("Parse error does not name the file: %v", err)
			}
			return
		}
		for _, m := range file.Modules {
			if m.Key == "" {
				t.Fatalf("module without a key")
			}
		}
	})
}
