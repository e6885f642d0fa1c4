package comfyui

import (
	"bytes"
	"errors"
	"fmt"
	"image"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// outputsFor fills a node's outputs: the MODEL it made, and the pipeline's
// own CLIP and VAE where the node has those outputs.
func outputsFor(def *node, m modelVal) []any {
	out := make([]any, len(def.outputs))
	for i, t := range def.outputs {
		switch t {
		case "MODEL":
			out[i] = m
		case "CLIP":
			out[i] = clipVal{}
		case "VAE":
			out[i] = vaeVal{}
		}
	}
	return out
}

func runLoadModel(field string) func(x *execution, id string, in map[string]any) ([]any, map[string]any, error) {
	return func(x *execution, id string, in map[string]any) ([]any, map[string]any, error) {
		name, _ := in[field].(string)
		m, err := x.s.core.LoadCheckpoint(x.ctx, name)
		if err != nil {
			return nil, nil, fmt.Errorf("%s %q: %w", field, name, err)
		}
		return outputsFor(nodes[x.it.graph[id].ClassType], modelVal{model: m}), nil, nil
	}
}

func runLoRA(strengthField, modeField string) func(x *execution, id string, in map[string]any) ([]any, map[string]any, error) {
	return func(x *execution, id string, in map[string]any) ([]any, map[string]any, error) {
		m, ok := in["model"].(modelVal)
		if !ok {
			return nil, nil, errors.New("model: not a MODEL")
		}
		mode := "side"
		if modeField != "" {
			mode, _ = in[modeField].(string)
		}
		name, _ := in["lora_name"].(string)
		s, _ := in[strengthField].(float64)
		next := modelVal{model: m.model, loras: append(append([]LoRA{}, m.loras...), LoRA{Name: name, Strength: s, Mode: mode})}
		return outputsFor(nodes[x.it.graph[id].ClassType], next), nil, nil
	}
}

func runKSampler(x *execution, id string, in map[string]any) ([]any, map[string]any, error) {
	m, _ := in["model"].(modelVal)
	pos, _ := in["positive"].(condVal)
	lat, _ := in["latent_image"].(latentVal)
	if lat.images != nil {
		return nil, nil, errors.New("latent_image: arenahost samples from noise only; link an empty latent (EmptyLatentImage)")
	}
	if cfg, _ := in["cfg"].(float64); cfg != 1 {
		x.s.log.Info("comfyui: KSampler cfg is not used by the pipelines", "prompt_id", x.it.id, "node", id, "cfg", cfg)
	}
	imgs, err := x.sample(id, m, pos.text, seedOf(in["seed"]), asInt(in["steps"]), lat.width, lat.height, lat.batch)
	if err != nil {
		return nil, nil, err
	}
	return []any{latentVal{width: lat.width, height: lat.height, batch: len(imgs), images: imgs}}, nil, nil
}

func runArenahostSampler(x *execution, id string, in map[string]any) ([]any, map[string]any, error) {
	m, _ := in["model"].(modelVal)
	prompt, _ := in["prompt"].(string)
	w, h, n := asInt(in["width"]), asInt(in["height"]), asInt(in["batch_size"])
	imgs, err := x.sample(id, m, prompt, seedOf(in["seed"]), asInt(in["steps"]), w, h, n)
	if err != nil {
		return nil, nil, err
	}
	return []any{latentVal{width: w, height: h, batch: len(imgs), images: imgs}}, nil, nil
}

// seedOf maps ComfyUI's 64-bit seed into the pipelines' 0..2^63-1.
func seedOf(v any) int64 {
	f, _ := v.(float64)
	return int64(math.Mod(f, math.Exp2(63)))
}

func runDecode(_ *execution, _ string, in map[string]any) ([]any, map[string]any, error) {
	lat, _ := in["samples"].(latentVal)
	if lat.images == nil {
		return nil, nil, errors.New("samples: an empty latent; link a sampler's output")
	}
	return []any{imagesVal(lat.images)}, nil, nil
}

// sample applies the model's LoRAs and runs one pipeline job per image,
// streaming progress and previews to the prompt's client.
func (x *execution) sample(id string, m modelVal, prompt string, seed int64, steps, w, h, n int) ([]image.Image, error) {
	if m.model == "" {
		return nil, errors.New("model: no checkpoint loaded")
	}
	for _, l := range m.loras[min(1, len(m.loras)):] {
		if l.Mode != m.loras[0].Mode {
			return nil, fmt.Errorf("model: LoRAs %q (%s) and %q (%s): one model chain applies its LoRAs in one mode", m.loras[0].Name, m.loras[0].Mode, l.Name, l.Mode)
		}
	}
	c := x.s.hub.get(x.it.clientID)
	previews := c != nil && c.wantsPreviews(x.it.extra)
	var imgs []image.Image
	for i := range max(n, 1) {
		ev := Events{Progress: func(step, total int) {
			x.s.hub.send(x.it.clientID, "progress", map[string]any{"value": step, "max": total, "prompt_id": x.it.id, "node": id})
			x.progressState(id, "running", step, total)
		}}
		if previews {
			ev.Frame = func(format string, data []byte) { c.preview(format, data, x.it.id, id) }
		}
		img, err := x.s.core.Sample(x.ctx, Sampling{Model: m.model, LoRAs: m.loras, Prompt: prompt, Seed: seed + int64(i), Steps: steps, Width: w, Height: h}, ev)
		if err != nil {
			return nil, err
		}
		imgs = append(imgs, img)
	}
	x.progressState(id, "finished", steps, steps)
	return imgs, nil
}

// progressState sends ComfyUI's progress_state for the sampling node (the
// frontend draws node progress bars from it).
func (x *execution) progressState(id, state string, value, max int) {
	x.s.hub.send(x.it.clientID, "progress_state", map[string]any{"prompt_id": x.it.id, "nodes": map[string]any{
		id: map[string]any{"value": value, "max": max, "state": state, "node_id": id, "prompt_id": x.it.id,
			"display_node_id": id, "parent_node_id": nil, "real_node_id": id},
	}})
}

// prefixRe keeps file-name prefixes to safe characters.
var prefixRe = regexp.MustCompile(`[^A-Za-z0-9._/-]`)

func runSave(kind string) func(x *execution, id string, in map[string]any) ([]any, map[string]any, error) {
	return func(x *execution, id string, in map[string]any) ([]any, map[string]any, error) {
		imgs, _ := in["images"].(imagesVal)
		prefix := "ComfyUI"
		if kind == "temp" {
			prefix = "ComfyUI_temp_" + x.it.id[:8]
		} else if p, ok := in["filename_prefix"].(string); ok && p != "" {
			prefix = p
		}
		files, err := x.s.save(kind, prefix, imgs)
		if err != nil {
			return nil, nil, err
		}
		return []any{}, map[string]any{"images": files}, nil
	}
}

// save writes images as PNG into the kind folder as ComfyUI names them:
// PREFIX_00001_.png, the counter one past the highest already there. A
// prefix may name a subfolder ("sub/name"); it may not leave the folder.
func (s *Server) save(kind, prefix string, imgs []image.Image) ([]map[string]any, error) {
	prefix = prefixRe.ReplaceAllString(prefix, "_")
	sub, base := filepath.Split(filepath.Clean("/" + prefix))
	sub = strings.Trim(sub, "/")
	if base == "" || base == "." {
		base = "ComfyUI"
	}
	dir := filepath.Join(s.opts.Dir, kind, filepath.FromSlash(sub))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("save images: %w", err)
	}
	s.imgMu.Lock()
	defer s.imgMu.Unlock()
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("save images: %w", err)
	}
	counter := 1
	for _, e := range ents {
		n := e.Name()
		if rest, ok := strings.CutPrefix(n, base+"_"); ok {
			if num, ok := strings.CutSuffix(rest, "_.png"); ok {
				if v, err := strconv.Atoi(num); err == nil && v >= counter {
					counter = v + 1
				}
			}
		}
	}
	out := []map[string]any{}
	for _, img := range imgs {
		name := fmt.Sprintf("%s_%05d_.png", base, counter)
		counter++
		var buf bytes.Buffer
		if err := png.Encode(&buf, img); err != nil {
			return nil, fmt.Errorf("save %s: %w", name, err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), buf.Bytes(), 0o644); err != nil {
			return nil, fmt.Errorf("save %s: %w", name, err)
		}
		out = append(out, map[string]any{"filename": name, "subfolder": sub, "type": kind})
	}
	return out, nil
}
