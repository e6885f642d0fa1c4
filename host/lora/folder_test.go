package lora_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/host/lora"
	"github.com/arenahost/arenahost/host/server"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/samples"
)

// shardedSample writes the sample model as a diffusers-style model folder:
// config.json and shards of at most maxBytes with their index, each 4-bit
// weight's tensors in one shard.
func shardedSample(t *testing.T, maxBytes int64) string {
	t.Helper()
	_, models, _ := fixtures(t)
	f, err := safetensors.Open(filepath.Join(models, samples.ModelFile))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var ts []safetensors.WriteTensor
	for _, ti := range f.Tensors {
		b, err := f.Data(ti.Name)
		if err != nil {
			t.Fatal(err)
		}
		ts = append(ts, safetensors.WriteTensor{Name: ti.Name, DType: ti.DType, Shape: ti.Shape, Data: b})
	}
	dir := filepath.Join(t.TempDir(), "flux-sample-folder")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	group := func(n string) string {
		if i := strings.Index(n, ".weight"); i >= 0 {
			return n[:i]
		}
		return n
	}
	if err := safetensors.WriteSharded(dir, "diffusion_pytorch_model", f.Metadata, ts, maxBytes, group); err != nil {
		t.Fatal(err)
	}
	cfg := `{"_class_name": "FluxTransformer2DModel", "num_layers": 2, "num_single_layers": 4, "in_channels": 64}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// A model loaded from a sharded folder fuses to exactly the bytes the same
// model from one file fuses to, its journal references the shards (no
// arena copy), and remove restores it byte for byte from them.
func TestShardedFolderFuseRemove(t *testing.T) {
	s := newHost(t)
	_, _, dir := fixtures(t)
	folder := shardedSample(t, 1<<20)
	m, err := s.Registry.Load(t.Context(), "folder", folder)
	if err != nil {
		t.Fatal(err)
	}
	if m.Container != "model-folder" || !strings.HasPrefix(m.Variant, "flux.1-dev") {
		t.Errorf("loaded as %s, variant %q", m.Container, m.Variant)
	}
	shards, _ := filepath.Glob(filepath.Join(folder, "*-of-*.safetensors"))
	if len(shards) < 3 {
		t.Fatalf("%d shards; the test wants several", len(shards))
	}
	origFile, origFolder := snapshot(t, s), snapshotOf(t, s, "folder")
	sameBytes(t, "folder vs file as loaded", origFile, origFolder)
	set := entries(dir, kohyaOracle(1), peftOracle(0.7))
	for _, model := range []string{server.DefaultModelName, "folder"} {
		res, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: model, LoRAs: set, Mode: lora.ModeFuse})
		if err != nil {
			t.Fatal(err)
		}
		if res.JournalFileBytes == 0 || res.JournalBytes != 0 {
			t.Errorf("%s: journal %d bytes in the arena, %d referenced in the source", model, res.JournalBytes, res.JournalFileBytes)
		}
	}
	sameBytes(t, "fused folder vs fused file", snapshot(t, s), snapshotOf(t, s, "folder"))
	if _, err := s.LoRAs.Remove(t.Context(), "folder"); err != nil {
		t.Fatal(err)
	}
	sameBytes(t, "remove on the folder", origFolder, snapshotOf(t, s, "folder"))
}

// A shard changed in place after the load: the journal notices when it
// takes references, and keeps arena copies instead; remove stays exact.
func TestShardedFolderShardChanged(t *testing.T) {
	s := newHost(t)
	_, _, dir := fixtures(t)
	folder := shardedSample(t, 1<<20)
	if _, err := s.Registry.Load(t.Context(), "folder", folder); err != nil {
		t.Fatal(err)
	}
	orig := snapshotOf(t, s, "folder")
	flipTensorByte(t, folder, "double_blocks.0.img_attn.qkv.weight")
	res, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: "folder", LoRAs: entries(dir, kohyaOracle(1)), Mode: lora.ModeFuse})
	if err != nil {
		t.Fatal(err)
	}
	if res.JournalBytes == 0 {
		t.Errorf("journal referenced changed shards: %d arena bytes, %d file bytes", res.JournalBytes, res.JournalFileBytes)
	}
	if _, err := s.LoRAs.Remove(t.Context(), "folder"); err != nil {
		t.Fatal(err)
	}
	sameBytes(t, "remove after a shard changed", orig, snapshotOf(t, s, "folder"))
}

// flipTensorByte inverts the first byte of tensor name in the shard of
// folder that holds it, in place.
func flipTensorByte(t *testing.T, folder, name string) {
	t.Helper()
	set, err := safetensors.OpenSet(folder)
	if err != nil {
		t.Fatal(err)
	}
	info, _ := set.Lookup(name)
	sh, _ := set.FileOf(name)
	path, off := sh.Path, sh.DataStart+info.Begin
	set.Close()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}
