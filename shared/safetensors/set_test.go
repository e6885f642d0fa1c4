package safetensors

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// shardFolder writes a model folder: shards maps a shard file name to its
// tensors (4-byte F32 scalars-by-shape [1]), index is the weight_map
// written beside them (nil: no index, for single-file folders).
func shardFolder(t *testing.T, dir string, shards map[string][]string, index map[string]string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, tensors := range shards {
		var ws []WriteTensor
		for i, tn := range tensors {
			ws = append(ws, WriteTensor{Name: tn, DType: F32, Shape: []int64{1}, Data: []byte{byte(i), 0, 0x80, 0x3f}})
		}
		if err := WriteFile(filepath.Join(dir, name), nil, ws); err != nil {
			t.Fatal(err)
		}
	}
	if index != nil {
		b, _ := json.Marshal(map[string]any{"metadata": map[string]any{"total_size": 16}, "weight_map": index})
		if err := os.WriteFile(filepath.Join(dir, "diffusion_pytorch_model.safetensors.index.json"), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"_class_name": "FluxTransformer2DModel"}`), 0o644); err != nil {
		t.Fatal(err)
	}
}

const (
	shard1 = "diffusion_pytorch_model-00001-of-00002.safetensors"
	shard2 = "diffusion_pytorch_model-00002-of-00002.safetensors"
)

func TestOpenSet(t *testing.T) {
	root := t.TempDir()
	// A sharded model folder.
	sharded := filepath.Join(root, "sharded")
	shardFolder(t, sharded, map[string][]string{shard1: {"a", "b"}, shard2: {"c"}},
		map[string]string{"a": shard1, "b": shard1, "c": shard2})
	// A pipeline folder around a single-file component.
	pipe := filepath.Join(root, "pipe")
	shardFolder(t, filepath.Join(pipe, "transformer"), map[string][]string{"diffusion_pytorch_model.safetensors": {"a", "b", "c"}}, nil)
	if err := os.WriteFile(filepath.Join(pipe, "model_index.json"), []byte(`{"_class_name": "FluxPipeline"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path      string
		container Container
		component string
		files     int
	}{
		{sharded, ContainerModelFolder, "", 2},
		{pipe, ContainerPipelineFolder, "transformer", 1},
		{filepath.Join(sharded, shard2), ContainerFile, "", 1},
	} {
		s, err := OpenSet(tc.path)
		if err != nil {
			t.Fatalf("%s: %v", tc.path, err)
		}
		if s.Container != tc.container || s.Component != tc.component || len(s.Files) != tc.files {
			t.Errorf("%s: container %s component %q files %d", tc.path, s.Container, s.Component, len(s.Files))
		}
		if tc.container != ContainerFile && (s.Config == nil || !strings.HasSuffix(s.ConfigPath, "config.json")) {
			t.Errorf("%s: config %q", tc.path, s.ConfigPath)
		}
		for _, tn := range []string{"c"} {
			info, ok := s.Lookup(tn)
			if !ok {
				t.Fatalf("%s: no tensor %s", tc.path, tn)
			}
			b, err := s.Data(tn)
			if err != nil || len(b) != 4 || b[3] != 0x3f {
				t.Errorf("%s: data %v %v", tc.path, b, err)
			}
			f, _ := s.FileOf(tn)
			if tc.files == 2 && filepath.Base(f.Path) != shard2 {
				t.Errorf("tensor c in %s", f.Path)
			}
			if err := s.CopyTensor(make([]byte, 4), info); err != nil {
				t.Error(err)
			}
		}
		if !s.Unchanged() {
			t.Errorf("%s: changed", tc.path)
		}
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	}
}

// Each way a folder can be broken gets an error naming what is wrong.
func TestOpenSetBadFolders(t *testing.T) {
	for _, tc := range []struct {
		name   string
		shards map[string][]string
		index  map[string]string
		setup  func(t *testing.T, dir string)
		want   []string
	}{
		{"missing shard", map[string][]string{shard1: {"a"}}, map[string]string{"a": shard1, "c": shard2},
			nil, []string{"shard " + shard2, "named by index", "no such file"}},
		{"tensor in two shards", map[string][]string{shard1: {"a", "c"}, shard2: {"c"}}, map[string]string{"a": shard1, "c": shard2},
			nil, []string{"tensor c is in two shards", shard1, shard2}},
		{"tensor outside the index", map[string][]string{shard1: {"a", "x"}}, map[string]string{"a": shard1},
			nil, []string{"shard " + shard1 + " holds tensor x", "does not name"}},
		{"tensor in the wrong shard", map[string][]string{shard1: {"a"}, shard2: {"c"}}, map[string]string{"a": shard2, "c": shard1},
			nil, []string{"holds tensor a, which index", "puts in " + shard2}},
		{"indexed tensor missing", map[string][]string{shard1: {"a"}}, map[string]string{"a": shard1, "b": shard1},
			nil, []string{"names tensors its shards do not hold: b (in " + shard1 + ")"}},
		{"shard outside the folder", map[string][]string{shard1: {"a"}}, map[string]string{"a": "../" + shard1},
			nil, []string{`"../` + shard1 + `"`, "not a file name inside the folder"}},
		{"absolute shard path", map[string][]string{shard1: {"a"}}, map[string]string{"a": "/etc/passwd"},
			nil, []string{`"/etc/passwd"`, "not a file name inside the folder"}},
		{"empty index", map[string][]string{shard1: {"a"}}, map[string]string{},
			nil, []string{"no weight_map entries"}},
		{"no weights", map[string][]string{}, nil, nil, []string{"no weights in", "diffusion_pytorch_model.safetensors.index.json"}},
		{"index and single file", map[string][]string{shard1: {"a"}, "diffusion_pytorch_model.safetensors": {"a"}}, map[string]string{"a": shard1},
			nil, []string{"both diffusion_pytorch_model.safetensors and the shard index"}},
		{"bad config", map[string][]string{"diffusion_pytorch_model.safetensors": {"a"}}, nil,
			func(t *testing.T, dir string) { os.WriteFile(filepath.Join(dir, "config.json"), []byte("{"), 0o644) }, []string{"config.json is not valid JSON"}},
		{"pipeline without component", map[string][]string{}, nil,
			func(t *testing.T, dir string) {
				os.WriteFile(filepath.Join(dir, "model_index.json"), []byte("{}"), 0o644)
			}, []string{"pipeline folder", "transformer/ or unet/"}},
		{"corrupt shard", map[string][]string{shard1: {"a"}}, map[string]string{"a": shard1},
			func(t *testing.T, dir string) {
				os.WriteFile(filepath.Join(dir, shard1), []byte("garbage!garbage!"), 0o644)
			}, []string{"shard " + shard1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "model")
			shardFolder(t, dir, tc.shards, tc.index)
			if tc.setup != nil {
				tc.setup(t, dir)
			}
			s, err := OpenSet(dir)
			if err == nil {
				s.Close()
				t.Fatal("opened")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

// TestOpenSetSideFilesCannotHang: a FIFO in place of a folder's config.json
// or shard index is refused as a bad path at once, never read (a read would
// block until something writes to it).
func TestOpenSetSideFilesCannotHang(t *testing.T) {
	for _, name := range []string{"config.json", "diffusion_pytorch_model.safetensors.index.json"} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			if err := syscall.Mkfifo(filepath.Join(dir, name), 0o600); err != nil {
				t.Skipf("mkfifo: %v", err)
			}
			done := make(chan error, 1)
			go func() {
				s, err := OpenSet(dir)
				if s != nil {
					s.Close()
				}
				done <- err
			}()
			select {
			case err := <-done:
				if !errors.Is(err, ErrBadPath) || !strings.Contains(err.Error(), name) {
					t.Fatalf("OpenSet with a FIFO %s: %v, want ErrBadPath naming it", name, err)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("OpenSet hung on a FIFO %s", name)
			}
		})
	}
}
