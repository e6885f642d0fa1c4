package api

import (
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/arenahost/arenahost/host/inspect"
	v1 "github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// loraCache keeps inspect results keyed by path, size and modification
// time, so listing a directory re-reads only files that changed. Each
// complete listing drops the entries of files it no longer found (keep),
// so the cache holds at most the directory's files, however many come and
// go over the host's life.
type loraCache struct {
	mu sync.Mutex
	m  map[string]v1.LoRAFile
}

func (c *loraCache) get(path string, st fs.FileInfo) (v1.LoRAFile, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[path]
	return e, ok && e.Bytes == st.Size() && e.Modified.Equal(st.ModTime())
}

func (c *loraCache) put(path string, e v1.LoRAFile) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]v1.LoRAFile{}
	}
	c.m[path] = e
}

// keep drops every entry whose path is not in seen.
func (c *loraCache) keep(seen map[string]bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for p := range c.m {
		if !seen[p] {
			delete(c.m, p)
		}
	}
}

// len is the number of cached entries.
func (c *loraCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}

// LoRAName turns a path relative to the LoRA directory into its name.
func LoRAName(rel string) string {
	return strings.TrimSuffix(filepath.ToSlash(rel), ".safetensors")
}

// LoRAs lists the *.safetensors files under the LoRA directory, with their
// inspect report. Symlinks are followed only when they stay inside the
// directory; files that fail to inspect are listed with their error.
func (a *API) LoRAs() ([]v1.LoRAFile, error) {
	dir := a.opts.LoRAsDir
	root, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return nil, fmt.Errorf("list LoRAs in %s: %w", dir, err)
	}
	out := []v1.LoRAFile{}
	seen := map[string]bool{}
	err = walkConfined(root, isSafetensors, func(rel, real string, st fs.FileInfo) error {
		seen[real] = true
		if e, ok := a.loras.get(real, st); ok {
			e.Name, e.Path = LoRAName(rel), filepath.ToSlash(rel)
			out = append(out, e)
			return nil
		}
		e := v1.LoRAFile{Name: LoRAName(rel), Path: filepath.ToSlash(rel), Bytes: st.Size(), Modified: st.ModTime()}
		if rep, err := inspect.File(real); err != nil {
			e.Error = err.Error()
		} else {
			e.Kind, e.LoRA = string(rep.Kind), rep.LoRA
		}
		if f, err := safetensors.Open(real); err == nil {
			e.Metadata = f.Metadata
			f.Close()
		}
		a.loras.put(real, e)
		out = append(out, e)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list LoRAs in %s: %w", dir, err)
	}
	a.loras.keep(seen)
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// LoRAPath resolves a LoRA name or relative path (with or without
// ".safetensors") to its real path inside the LoRA directory. The apply
// route uses it so every LoRA path is confined.
func (a *API) LoRAPath(name string) (string, error) {
	p := filepath.FromSlash(name)
	if !strings.HasSuffix(p, ".safetensors") {
		p += ".safetensors"
	}
	real, err := confine(a.opts.LoRAsDir, p)
	if errors.Is(err, errNoFile) {
		return "", fmt.Errorf("LoRA %q: %w in %s", name, errNoFile, a.opts.LoRAsDir)
	}
	return real, err
}

func (a *API) listLoRAs(w http.ResponseWriter, r *http.Request) {
	ls, err := a.LoRAs()
	if err != nil {
		a.fail(w, r, err)
		return
	}
	for i := range ls {
		ls[i].Metadata = nil // the sdapi route serves metadata; keep this listing small
	}
	writeJSON(w, http.StatusOK, ls)
}

// SDAPILoRA is one entry of GET /sdapi/v1/loras, as A1111 and SD.Next
// serve it.
type SDAPILoRA struct {
	Name     string            `json:"name"`
	Alias    string            `json:"alias"`
	Path     string            `json:"path"`
	Metadata map[string]string `json:"metadata"`
}

func (a *API) sdapiLoRAs(w http.ResponseWriter, r *http.Request) {
	ls, err := a.LoRAs()
	if err != nil {
		a.fail(w, r, err)
		return
	}
	root, _ := filepath.Abs(a.opts.LoRAsDir)
	out := make([]SDAPILoRA, 0, len(ls))
	for _, e := range ls {
		if e.Kind != v1.FileKindLoRA {
			continue
		}
		alias := filepath.Base(e.Name)
		if v := e.Metadata["ss_output_name"]; v != "" {
			alias = v // A1111 uses kohya's output name as the alias when present
		}
		md := e.Metadata
		if md == nil {
			md = map[string]string{}
		}
		// A1111's name is the bare file name; tags resolve it (and the
		// alias) when it is unique, or a path relative to the directory.
		out = append(out, SDAPILoRA{Name: filepath.Base(e.Name), Alias: alias, Path: filepath.Join(root, filepath.FromSlash(e.Path)), Metadata: md})
	}
	writeJSON(w, http.StatusOK, out)
}
