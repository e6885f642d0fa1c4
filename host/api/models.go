package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"

	"github.com/arenahost/arenahost/host/registry"
	v1 "github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/safetensors"
)

func modelInfo(m *registry.Model) v1.ModelInfo {
	info := v1.ModelInfo{Name: m.Name, Source: m.Source, Format: string(m.Format), Layout: m.Layout,
		Variant: m.Variant, Container: m.Container, Tensors: len(m.Tensors), Weights: len(m.Weights), Params: m.Params(), Bytes: m.Bytes,
		Notes: m.Notes}
	for _, c := range m.Components {
		info.Components = append(info.Components, v1.ModelComponent{Kind: c.Kind, Label: c.Label, Prefix: c.Prefix, Source: c.Source,
			Tensors: c.Tensors, Bytes: c.Bytes, Weights: c.Weights})
	}
	return info
}

func (a *API) models(w http.ResponseWriter, _ *http.Request) {
	out := []v1.ModelInfo{}
	for _, m := range a.s.Registry.Models() {
		out = append(out, modelInfo(m))
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *API) loadModel(w http.ResponseWriter, r *http.Request) {
	var req v1.LoadModelRequest
	if err := decode(r, &req); err != nil {
		a.fail(w, r, err)
		return
	}
	path, name, err := a.checkLoadModel(req)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	m, err := a.s.Registry.Load(r.Context(), name, path, safetensors.Within(a.opts.ModelsDir))
	if err != nil {
		if st, _ := statusOf(err); st == http.StatusInternalServerError && !errors.Is(err, context.Canceled) {
			// The file failed validation: the client's bad input.
			err = &StatusError{Status: http.StatusBadRequest, Code: "bad_model", Err: err}
		}
		a.fail(w, r, err)
		return
	}
	// On a device arena the LoRA plugin opens the model's memory now, in
	// the background, rather than in the first fused apply.
	a.s.Prepare(name)
	writeJSON(w, http.StatusCreated, modelInfo(m))
}

// checkLoadModel is a load request's checks before any file is opened:
// the path confined to the models directory, and the model's name (the
// file name without extension by default). FuzzDecodeLoadModel runs it.
func (a *API) checkLoadModel(req v1.LoadModelRequest) (path, name string, err error) {
	path, err = confineModel(a.opts.ModelsDir, req.Path)
	if err != nil {
		return "", "", fmt.Errorf("load model: %w", err)
	}
	name = req.Name
	if name == "" {
		name = strings.TrimSuffix(filepath.Base(req.Path), filepath.Ext(req.Path))
	}
	if err := checkName(name); err != nil {
		return "", "", err
	}
	return path, name, nil
}

func (a *API) unloadModel(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if err := a.s.Registry.Unload(name); err != nil {
		a.fail(w, r, err)
		return
	}
	if a.s.LoRAs != nil {
		// Free the model's LoRA factors and fuse journal now, not at the
		// next apply.
		a.s.LoRAs.Forget(name)
	}
	writeJSON(w, http.StatusOK, v1.Unloaded{Unloaded: name})
}

// checkName accepts model names that are safe in URLs and logs.
func checkName(name string) error {
	if name == "" || len(name) > 128 {
		return badRequest("model name %q: want 1 to 128 characters", name)
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return badRequest("model name %q: character %q is not allowed (use letters, digits, '-', '_', '.')", name, c)
		}
	}
	return nil
}
