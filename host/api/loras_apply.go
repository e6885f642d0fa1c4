package api

import (
	"errors"
	"net/http"
	"time"

	"github.com/arenahost/arenahost/host/lora"
	v1 "github.com/arenahost/arenahost/sdk/api"
)

// loraStatus answers LoRA errors with their class: a bad file or request
// is 422 bad_lora, an unsupported combination 409 unsupported.
func loraStatus(err error) error {
	switch {
	case errors.Is(err, lora.ErrBadLoRA):
		return &StatusError{Status: http.StatusUnprocessableEntity, Code: "bad_lora", Err: err}
	case errors.Is(err, lora.ErrUnsupported):
		return &StatusError{Status: http.StatusConflict, Code: "unsupported", Err: err}
	}
	return err
}

func (a *API) applyLoRAs(w http.ResponseWriter, r *http.Request) {
	var req v1.ApplyRequest
	if err := decode(r, &req); err != nil {
		a.fail(w, r, err)
		return
	}
	if req.LoRAs == nil {
		// Missing or null: never read as "remove every LoRA".
		a.fail(w, r, badRequest("loras: required (a list; send [] to remove every LoRA, or DELETE /v1/loras)"))
		return
	}
	if a.s.LoRAs == nil {
		a.fail(w, r, &StatusError{Status: http.StatusServiceUnavailable, Code: "no_lora_engine", Err: errors.New("this host runs no LoRA coordinator")})
		return
	}
	lr, err := a.checkApply(req)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	start := time.Now()
	res, err := a.s.LoRAs.Apply(r.Context(), lr)
	mode := req.Mode
	if mode == "" {
		mode = "side"
	}
	op := "apply"
	if err == nil && res.Path != "" {
		op = res.Path // apply, set_strengths or noop
	}
	a.Metrics.ObserveApply(op, mode, time.Since(start), err)
	if err != nil {
		a.fail(w, r, loraStatus(err))
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// checkApply turns an apply request into the coordinator's, checking
// each entry (a name, its path confined to the LoRA directory, a finite
// strength within bounds) before any file is opened.
// FuzzDecodeApply runs it.
func (a *API) checkApply(req v1.ApplyRequest) (lora.Request, error) {
	lr := lora.Request{Model: req.Model, Mode: req.Mode, Strict: req.Strict, FactorDType: req.FactorDType}
	if req.FactorDType != "" {
		if _, err := lora.CheckFactorDType(req.FactorDType); err != nil {
			return lora.Request{}, badRequest("%v", err)
		}
		if req.Mode == lora.ModeFuse {
			return lora.Request{}, badRequest("factor_dtype %q: side factors are stored in side mode only; a fused set has none", req.FactorDType)
		}
	}
	for i, l := range req.LoRAs {
		if l.Name == "" {
			return lora.Request{}, badRequest("loras[%d]: name is empty", i)
		}
		p, err := a.LoRAPath(l.Name)
		if err != nil {
			return lora.Request{}, err
		}
		s := 1.0
		if l.Strength != nil {
			s = *l.Strength
		}
		if err := checkStrength(s); err != nil {
			return lora.Request{}, badRequest("loras[%d] %q: strength: %v", i, l.Name, err)
		}
		lr.LoRAs = append(lr.LoRAs, v1.AppliedLoRA{Name: l.Name, Path: p, Strength: s})
	}
	return lr, nil
}

func (a *API) removeLoRAs(w http.ResponseWriter, r *http.Request) {
	if a.s.LoRAs == nil {
		a.fail(w, r, &StatusError{Status: http.StatusServiceUnavailable, Code: "no_lora_engine", Err: errors.New("this host runs no LoRA coordinator")})
		return
	}
	model := r.URL.Query().Get("model")
	mode := "side"
	if st, err := a.s.LoRAs.State(model); err == nil && st.Mode != "" {
		mode = st.Mode // the mode being removed, for the metric
	}
	start := time.Now()
	res, err := a.s.LoRAs.Remove(r.Context(), model)
	a.Metrics.ObserveApply("remove", mode, time.Since(start), err)
	if err != nil {
		a.fail(w, r, loraStatus(err))
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (a *API) loraState(w http.ResponseWriter, r *http.Request) {
	if a.s.LoRAs == nil {
		a.fail(w, r, &StatusError{Status: http.StatusServiceUnavailable, Code: "no_lora_engine", Err: errors.New("this host runs no LoRA coordinator")})
		return
	}
	st, err := a.s.LoRAs.State(r.URL.Query().Get("model"))
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}
