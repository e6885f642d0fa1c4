package api

import (
	"crypto/sha256"
	"encoding/hex"
	"net/http"

	"github.com/arenahost/arenahost/host/registry"
	v1 "github.com/arenahost/arenahost/sdk/api"
)

// digestModel hashes the tensors of model whose names start with prefix.
// Each tensor is read while the model cannot be unloaded; on device memory
// the registry downloads it through a bounded buffer first. A LoRA apply
// running at the same time may be seen half done: take digests when
// GET /v1/loras/state shows no apply in progress.
func digestModel(reg Registry, model, prefix string, detail bool) (v1.ModelDigest, error) {
	ts, err := reg.Tensors(model, prefix)
	if err != nil {
		return v1.ModelDigest{}, err
	}
	out := v1.ModelDigest{Model: model}
	if detail {
		out.PerTensor = make(map[string]string, len(ts))
	}
	all := sha256.New()
	for _, t := range ts { // sorted by name
		var sum [sha256.Size]byte
		err := reg.View(model, t.Name, func(_ *registry.Tensor, b []byte) error {
			sum = sha256.Sum256(b)
			return nil
		})
		if err != nil {
			return v1.ModelDigest{}, err
		}
		h := hex.EncodeToString(sum[:])
		all.Write([]byte(t.Name))
		all.Write([]byte{0})
		all.Write([]byte(h))
		all.Write([]byte{'\n'})
		out.Tensors++
		out.Bytes += t.NBytes
		if detail {
			out.PerTensor[t.Name] = h
		}
	}
	out.SHA256 = hex.EncodeToString(all.Sum(nil))
	return out, nil
}

func (a *API) modelDigest(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	detail := q.Get("detail")
	if detail != "" && detail != "0" && detail != "1" {
		a.fail(w, r, badRequest("query detail=%q: want 0 or 1", detail))
		return
	}
	d, err := digestModel(a.s.Registry, r.PathValue("name"), q.Get("prefix"), detail == "1")
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}
