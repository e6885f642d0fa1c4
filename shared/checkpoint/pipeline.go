package checkpoint

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/arenahost/arenahost/shared/safetensors"
)

// pipelineParts are the component folders of a diffusers pipeline that
// OpenModel carries beside its transformer/UNet, in order. Each class
// model_index.json may name in the folder gets the prefix a Forge/ComfyUI
// single file bundles that model under (shared/layout's components), so
// every consumer of a bundled file's encoders (the LoRA mapping of text
// encoder keys, the diffusers pipeline) finds a folder's the same way.
var pipelineParts = []struct {
	folder  string
	classes map[string]string // model_index.json class → name prefix
}{
	{"text_encoder", map[string]string{"CLIPTextModel": "text_encoders.clip_l.transformer.", "CLIPTextModelWithProjection": "text_encoders.clip_l.transformer."}},
	{"text_encoder_2", map[string]string{"T5EncoderModel": "text_encoders.t5xxl.transformer.", "CLIPTextModelWithProjection": "text_encoder_2."}},
	{"text_encoder_3", map[string]string{"T5EncoderModel": "text_encoders.t5xxl.transformer."}},
	{"vae", map[string]string{"AutoencoderKL": "vae."}},
}

// OpenModel opens the model at path (safetensors.OpenSet) and, for a
// diffusers pipeline folder, also maps its text encoders and VAE in place
// (safetensors.Set.AddComponent; sharded ones with their index validated)
// under the prefixes a bundled single file uses for them:
// text_encoder/ (CLIP-L) as text_encoders.clip_l.transformer., a T5
// text_encoder_2/ or text_encoder_3/ as text_encoders.t5xxl.transformer.,
// SDXL's and SD3's CLIP-G text_encoder_2/ as text_encoder_2. (the
// diffusers name LoRA files use for it), and
// vae/ as vae.. A component that model_index.json does not name, whose
// class is not one of those, or whose folder holds no safetensors weights
// (pickled .bin files) is left out, with a note saying why (the pipeline
// then loads it from the folder itself); a component folder with a broken
// shard index, an unreadable file or a name clash is an error naming it.
// With safetensors.Within(root) every file it opens (model_index.json and
// the components' weights, indexes and config.json included) must resolve
// inside root.
func OpenModel(path string, opts ...safetensors.Option) (*safetensors.Set, []string, error) {
	s, err := safetensors.OpenSet(path, opts...)
	if err != nil {
		return nil, nil, err
	}
	if s.Container != safetensors.ContainerPipelineFolder {
		return s, nil, nil
	}
	notes, err := addPipelineParts(s)
	if err != nil {
		_ = s.Close()
		return nil, nil, err
	}
	return s, notes, nil
}

func addPipelineParts(s *safetensors.Set) ([]string, error) {
	idxPath := filepath.Join(s.Path, "model_index.json")
	b, err := s.ReadSide(idxPath)
	if err != nil {
		return nil, fmt.Errorf("open model %s: %w", s.Path, err)
	}
	var index map[string]any
	if err := json.Unmarshal(b, &index); err != nil {
		return nil, fmt.Errorf("open model %s: %s: %w", s.Path, idxPath, err)
	}
	var notes []string
	for _, p := range pipelineParts {
		entry, _ := index[p.folder].([]any)
		if len(entry) != 2 || entry[1] == nil {
			continue // not part of this pipeline
		}
		class, _ := entry[1].(string)
		dir := filepath.Join(s.Path, p.folder)
		if st, err := os.Stat(dir); err != nil || !st.IsDir() {
			notes = append(notes, fmt.Sprintf("%s: model_index.json names %s but there is no %s/ folder", s.Path, p.folder, p.folder))
			continue
		}
		prefix, ok := p.classes[class]
		if !ok {
			notes = append(notes, fmt.Sprintf("%s/: class %q is not carried in the arena (the pipeline loads it from the folder)", dir, class))
			continue
		}
		if err := s.AddComponent(p.folder, dir, prefix); err != nil {
			if errors.Is(err, safetensors.ErrNoWeights) {
				notes = append(notes, fmt.Sprintf("%s/: no safetensors weights, not carried in the arena (the pipeline loads it with from_pretrained, which refuses pickled .bin files)", dir))
				continue
			}
			return nil, fmt.Errorf("open model %s: %w", s.Path, err)
		}
	}
	return notes, nil
}
