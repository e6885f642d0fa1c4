package api

import (
	"crypto/sha256"
	"encoding/hex"
	"net/http"

	"github.com/arenahost/arenahost/host/registry"
)

// ModelDigest is the body of GET /v1/models/{name}/digest: SHA-256 of
// every stored tensor's bytes as the arena holds them now, and one digest
// over all of them. A UI or extension compares the digest taken before a
// LoRA apply with the one after removing it to check that the weights hold
// their original bytes again, and a digest of a model on the device with
// the same model loaded on the CPU.
type ModelDigest struct {
	Model string `json:"model"`
	// SHA256 hashes, in tensor-name order, each tensor's name, a NUL and its
	// own hex SHA-256, then a newline: it changes when any byte changes.
	SHA256  string `json:"sha256"`
	Tensors int    `json:"tensors"`
	Bytes   uint64 `json:"bytes"`
	// PerTensor lists each tensor's SHA-256 (with ?detail=1).
	PerTensor map[string]string `json:"per_tensor,omitempty"`
}

// digestModel hashes the tensors of model whose names start with prefix.
// Each tensor is read while the model cannot be unloaded; on device memory
// the registry downloads it through a bounded buffer first. A LoRA apply
// running at the same time may be seen half done: take digests when
// GET /v1/loras/state shows no apply in progress.
func digestModel(reg *registry.Registry, model, prefix string, detail bool) (ModelDigest, error) {
	ts, err := reg.Tensors(model, prefix)
	if err != nil {
		return ModelDigest{}, err
	}
	out := ModelDigest{Model: model}
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
			return ModelDigest{}, err
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
