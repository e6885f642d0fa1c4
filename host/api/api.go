// Package api owns arenahost's HTTP interface: the JSON routes under /v1
// that UIs and scripts call, and the uniform JSON error shape
// {error, code, detail}. It serves a *server.Server and holds no state of
// its own beyond what requests need.
package api

import (
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"

	"github.com/arenahost/arenahost/host/plugin"
	"github.com/arenahost/arenahost/host/registry"
	"github.com/arenahost/arenahost/host/server"
)

// API serves one Server over HTTP.
type API struct {
	s   *server.Server
	log *slog.Logger
	mux *http.ServeMux
}

// New returns the HTTP handler for s.
func New(s *server.Server, log *slog.Logger) *API {
	if log == nil {
		log = slog.Default()
	}
	a := &API{s: s, log: log, mux: http.NewServeMux()}
	a.mux.HandleFunc("GET /v1/health", a.health)
	a.mux.HandleFunc("GET /v1/arena", a.arena)
	a.mux.HandleFunc("GET /v1/models", a.models)
	a.mux.HandleFunc("GET /v1/plugins", a.plugins)
	a.mux.HandleFunc("POST /v1/plugins/{name}/reload", a.reload)
	a.mux.HandleFunc("GET /v1/plugins/{name}/logs", a.pluginLogs)
	return a
}

func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) { a.mux.ServeHTTP(w, r) }

// Error is the JSON body of every error response.
type Error struct {
	Error  string `json:"error"`
	Code   string `json:"code"`
	Detail string `json:"detail,omitempty"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// fail writes err with the status its class implies.
func (a *API) fail(w http.ResponseWriter, r *http.Request, err error) {
	status, code := http.StatusInternalServerError, "internal"
	switch {
	case errors.Is(err, plugin.ErrUnknownPlugin), errors.Is(err, registry.ErrNotFound):
		status, code = http.StatusNotFound, "not_found"
	}
	a.log.Warn("request failed", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
	writeJSON(w, status, Error{Error: http.StatusText(status), Code: code, Detail: err.Error()})
}

func (a *API) health(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// ArenaStats is the body of GET /v1/arena.
type ArenaStats struct {
	Backend       string  `json:"backend"`
	Capacity      uint64  `json:"capacity"`
	Allocated     uint64  `json:"allocated"`
	Peak          uint64  `json:"peak"`
	LargestFree   uint64  `json:"largest_free"`
	Fragmentation float64 `json:"fragmentation"`
	Segments      int     `json:"segments"`
	Regions       int     `json:"regions"`
}

func (a *API) arena(w http.ResponseWriter, _ *http.Request) {
	st := a.s.Arena.Stats()
	writeJSON(w, http.StatusOK, ArenaStats{Backend: st.Backend, Capacity: uint64(st.Capacity), Allocated: uint64(st.Allocated),
		Peak: uint64(st.Peak), LargestFree: uint64(st.LargestFree), Fragmentation: st.Fragmentation, Segments: st.Segments, Regions: st.Regions})
}

// ModelInfo is one entry of GET /v1/models.
type ModelInfo struct {
	Name    string `json:"name"`
	Source  string `json:"source"`
	Format  string `json:"format"`
	Layout  string `json:"layout"`
	Tensors int    `json:"tensors"`
	Weights int    `json:"weights"`
	Params  int64  `json:"params"`
	Bytes   uint64 `json:"bytes"`
}

func (a *API) models(w http.ResponseWriter, _ *http.Request) {
	out := []ModelInfo{}
	for _, m := range a.s.Registry.Models() {
		out = append(out, ModelInfo{Name: m.Name, Source: m.Source, Format: string(m.Format), Layout: m.Layout,
			Tensors: len(m.Tensors), Weights: len(m.Weights), Params: m.Params(), Bytes: m.Bytes})
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *API) plugins(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, a.s.Plugins.Status())
}

func (a *API) reload(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if err := a.s.Plugins.Swap(r.Context(), name); err != nil {
		a.fail(w, r, err)
		return
	}
	st, err := a.s.Plugins.PluginStatus(name)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (a *API) pluginLogs(w http.ResponseWriter, r *http.Request) {
	lines, err := a.s.Plugins.Logs(r.PathValue("name"), 200)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, lines)
}
