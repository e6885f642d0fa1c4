package checkpoint

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/safetensors"
)

// moveOut moves rel (inside pipe) to outside and leaves a symlink to it in
// its place; it returns the link's path.
func moveOut(t *testing.T, pipe, outside, rel string) string {
	t.Helper()
	link := filepath.Join(pipe, rel)
	dst := filepath.Join(outside, strings.ReplaceAll(rel, "/", "_"))
	if err := os.Rename(link, dst); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(dst, link); err != nil {
		t.Fatal(err)
	}
	return link
}

// firstShard is the first shard of a sharded folder, relative to pipe.
func firstShard(t *testing.T, pipe, sub string) string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(pipe, sub, "*-00001-of-*.safetensors"))
	if err != nil || len(m) == 0 {
		t.Fatalf("no first shard in %s/%s: %v", pipe, sub, err)
	}
	rel, _ := filepath.Rel(pipe, m[0])
	return rel
}

// TestOpenModelWithinRefusesSymlinksOut: every file a pipeline folder's
// model opens (a transformer shard, a component folder, config.json, a
// shard index, model_index.json, a bare file) that a symlink takes out of
// the models folder is refused under Within, naming the file; the same
// folder opens without Within, so the refusal is the confinement's.
func TestOpenModelWithinRefusesSymlinksOut(t *testing.T) {
	cases := []struct {
		name string
		out  func(t *testing.T, pipe string) string // which file to move out
		path func(pipe string) string               // the model path opened
	}{
		{"transformer shard", func(t *testing.T, pipe string) string { return firstShard(t, pipe, "transformer") }, nil},
		{"text encoder shard", func(t *testing.T, pipe string) string { return firstShard(t, pipe, "text_encoder_2") }, nil},
		{"component folder", func(*testing.T, string) string { return "text_encoder" }, nil},
		{"vae folder", func(*testing.T, string) string { return "vae" }, nil},
		{"transformer folder", func(*testing.T, string) string { return "transformer" }, nil},
		{"config.json", func(*testing.T, string) string { return "transformer/config.json" }, nil},
		{"component config.json", func(*testing.T, string) string { return "text_encoder/config.json" }, nil},
		{"shard index", func(*testing.T, string) string { return "transformer/diffusion_pytorch_model.safetensors.index.json" }, nil},
		{"component shard index", func(*testing.T, string) string { return "text_encoder_2/model.safetensors.index.json" }, nil},
		{"model_index.json", func(*testing.T, string) string { return "model_index.json" }, nil},
		{"model folder's shard", func(t *testing.T, pipe string) string { return firstShard(t, pipe, "transformer") },
			func(pipe string) string { return filepath.Join(pipe, "transformer") }},
		{"bare file", func(*testing.T, string) string { return "vae/diffusion_pytorch_model.safetensors" },
			func(pipe string) string { return filepath.Join(pipe, "vae", "diffusion_pytorch_model.safetensors") }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			models, outside := t.TempDir(), t.TempDir()
			pipe := filepath.Join(models, "pipe")
			if err := os.Rename(pipelineFolder(t), pipe); err != nil {
				t.Fatal(err)
			}
			link := moveOut(t, pipe, outside, c.out(t, pipe))
			path := pipe
			if c.path != nil {
				path = c.path(pipe)
			}
			s, _, err := OpenModel(path) // unconfined (the CLI on a user's path)
			if err != nil {
				t.Fatalf("unconfined open: %v", err)
			}
			_ = s.Close()

			s, _, err = OpenModel(path, safetensors.Within(models))
			if err == nil {
				_ = s.Close()
				t.Fatalf("OpenModel(Within) accepted %s leading out of %s", link, models)
			}
			if !errors.Is(err, safetensors.ErrOutsideRoot) || !strings.Contains(err.Error(), filepath.Base(link)) || !strings.Contains(err.Error(), "leaves the models folder") {
				t.Fatalf("error %q: want ErrOutsideRoot naming %s", err, filepath.Base(link))
			}
		})
	}
}

// TestOpenModelWithinFollowsSymlinksInside: a Hugging Face cache layout,
// every file of the pipeline a relative symlink into blobs/ beside it, all
// inside the models folder, opens under Within with the same tensors as
// unconfined; so does a models folder named through a symlink.
func TestOpenModelWithinFollowsSymlinksInside(t *testing.T) {
	models := t.TempDir()
	snap := filepath.Join(models, "hub", "snapshots", "0123abc")
	blobs := filepath.Join(models, "hub", "blobs")
	for _, d := range []string{filepath.Dir(snap), blobs} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Rename(pipelineFolder(t), snap); err != nil {
		t.Fatal(err)
	}
	n := 0
	err := filepath.WalkDir(snap, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		n++
		blob := filepath.Join(blobs, fmt.Sprintf("sha%04d", n))
		if err := os.Rename(p, blob); err != nil {
			return err
		}
		rel, err := filepath.Rel(filepath.Dir(p), blob) // ../../blobs/sha…
		if err != nil {
			return err
		}
		return os.Symlink(rel, p)
	})
	if err != nil {
		t.Fatal(err)
	}
	want, _, err := OpenModel(snap)
	if err != nil {
		t.Fatal(err)
	}
	defer want.Close()
	link := filepath.Join(t.TempDir(), "models-link")
	if err := os.Symlink(models, link); err != nil {
		t.Fatal(err)
	}
	for _, root := range []string{models, link} {
		s, _, err := OpenModel(snap, safetensors.Within(root))
		if err != nil {
			t.Fatalf("Within(%s): %v", root, err)
		}
		if len(s.Tensors) != len(want.Tensors) || len(s.Components) != len(want.Components) || len(s.Components) != 3 {
			t.Errorf("Within(%s): %d tensors, %d components; want %d, %d (3)", root, len(s.Tensors), len(s.Components), len(want.Tensors), len(want.Components))
		}
		_ = s.Close()
	}
}
