// Package api owns arenahost's HTTP interface: the JSON routes under /v1
// that UIs and scripts call, the A1111-compatible routes under /sdapi/v1,
// Prometheus metrics at /metrics, the embedded web console at /, and the
// safe defaults every request passes through (bearer token on mutating
// routes, body size limit, per-request write deadlines, paths confined to
// their directories). Every error is JSON {error, code, detail}, and every
// /v1 body a type of sdk/api. It serves a Backend (backend.go: small
// interfaces over the host's parts) and holds no state of its own beyond
// what requests need.
package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/arenahost/arenahost/host/api/comfyui"
	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/console"
	"github.com/arenahost/arenahost/host/plugin"
	"github.com/arenahost/arenahost/host/registry"
	v1 "github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// Options configures the HTTP layer. Zero fields take the defaults below.
type Options struct {
	// Token, when set, is required on every mutating route (any method but
	// GET, HEAD and OPTIONS) as "Authorization: Bearer TOKEN" or
	// "X-Arenahost-Token: TOKEN".
	Token string
	// MaxBody bounds request bodies (413 beyond); DefaultMaxBody when 0.
	MaxBody int64
	// WriteTimeout bounds how long a non-streaming route may take to answer
	// (set per request with http.ResponseController); streaming routes
	// (MJPEG, SSE, websockets) get none. DefaultWriteTimeout when 0.
	WriteTimeout time.Duration
	// ModelsDir and LoRAsDir confine request paths; the Backend's
	// directories when empty.
	ModelsDir string
	LoRAsDir  string
	// Pipeline is the pipeline plugin txt2img, POST /v1/jobs without a
	// pipeline and the console run; "" picks the first serving plugin of
	// kind "pipeline" (never an unavailable or failed one).
	Pipeline string
	// Listen is the address the server listens on: its host is accepted
	// in Host and Origin headers besides the loopback names.
	Listen string
	// AllowedHosts are further host names (or HOST:PORT) accepted in Host
	// and Origin headers (guard.go).
	AllowedHosts []string
	// MaxImages bounds the images one txt2img request may ask for;
	// DefaultMaxImages when 0.
	MaxImages int
	// Metrics receives observations; a new one over the server when nil.
	Metrics *Metrics
	// ComfyFrontend is comfyui-frontend-package's static/ folder, served
	// under /comfy/ ("": a page says how to install it).
	ComfyFrontend string
}

// Defaults for Options.
const (
	DefaultMaxBody      = 1 << 20
	DefaultWriteTimeout = 10 * time.Minute
)

// API serves one Backend over HTTP.
type API struct {
	s    Backend
	log  *slog.Logger
	mux  *http.ServeMux
	opts Options
	// Metrics is where routes and the job engine report what they observe.
	Metrics *Metrics
	loras   loraCache
	hosts   hostPolicy
	history *arenaHistory   // console_routes.go
	a1      a1111State      // a1111_routes.go
	comfy   *comfyui.Server // comfy.go
	gen     genLock         // generate.go
}

// New returns the HTTP handler for s with default Options.
func New(s Backend, log *slog.Logger) *API { return NewWithOptions(s, log, Options{}) }

// NewWithOptions returns the HTTP handler for s.
func NewWithOptions(s Backend, log *slog.Logger, o Options) *API {
	if log == nil {
		log = slog.Default()
	}
	if o.MaxBody <= 0 {
		o.MaxBody = DefaultMaxBody
	}
	if o.MaxImages <= 0 {
		o.MaxImages = DefaultMaxImages
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = DefaultWriteTimeout
	}
	if o.ModelsDir == "" {
		o.ModelsDir = s.ModelsDir
	}
	if o.LoRAsDir == "" {
		o.LoRAsDir = s.LoRAsDir
	}
	if o.Metrics == nil {
		o.Metrics = NewMetrics(s)
	}
	a := &API{s: s, log: log, mux: http.NewServeMux(), opts: o, Metrics: o.Metrics, hosts: newHostPolicy(o.Listen, o.AllowedHosts)}
	a.mux.HandleFunc("GET /v1/health", a.health)
	a.mux.HandleFunc("GET /v1/arena", a.arena)
	a.mux.HandleFunc("GET /v1/models", a.models)
	a.mux.HandleFunc("POST /v1/models", a.loadModel)
	a.mux.HandleFunc("DELETE /v1/models/{name}", a.unloadModel)
	a.mux.HandleFunc("GET /v1/models/{name}/digest", a.modelDigest)
	a.mux.HandleFunc("GET /v1/plugins", a.plugins)
	a.mux.HandleFunc("GET /v1/pipelines", a.pipelines)
	a.mux.HandleFunc("POST /v1/plugins/{name}/reload", a.reload)
	a.mux.HandleFunc("POST /v1/plugins/rescan", a.rescanPlugins) // plugins_rescan.go
	a.mux.HandleFunc("GET /v1/plugins/{name}/logs", a.pluginLogs)
	a.mux.HandleFunc("GET /v1/loras", a.listLoRAs)
	a.mux.HandleFunc("POST /v1/loras/apply", a.applyLoRAs)
	a.mux.HandleFunc("DELETE /v1/loras", a.removeLoRAs)
	a.mux.HandleFunc("GET /v1/loras/state", a.loraState)
	a.mux.HandleFunc("GET /sdapi/v1/loras", a.sdapiLoRAs)
	a.mux.HandleFunc("POST /sdapi/v1/txt2img", a.txt2img)
	a.a1111Routes() // a1111_routes.go: sd-models, options, samplers, memory, skip …
	a.mux.Handle("GET /metrics", a.Metrics.Handler())
	a.jobRoutes()     // jobs.go: jobs, previews, A1111 progress
	a.consoleRoutes() // console_routes.go: model files, arena usage and history
	a.comfyRoutes()   // comfy.go: ComfyUI's server API and websocket (package comfyui)
	a.tensorRoutes()  // tensors.go: descriptors for processes outside the plugins (the ComfyUI pack)
	a.mux.HandleFunc("/v1/", a.notFound)
	a.mux.HandleFunc("/sdapi/", a.notFound)
	a.mux.Handle("/", a.consoleOr404(console.Handler()))
	return a
}

// consoleOr404 serves the console's files to GET and HEAD and a JSON 404 to
// anything else outside the API's routes.
func (a *API) consoleOr404(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			a.notFound(w, r)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// ServeHTTP applies the safe defaults, then routes.
func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.ContentLength > a.opts.MaxBody {
		a.fail(w, r, &StatusError{Status: http.StatusRequestEntityTooLarge, Code: "too_large",
			Err: fmt.Errorf("request body of %d bytes exceeds the %d-byte limit (raise --max-body)", r.ContentLength, a.opts.MaxBody)})
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, a.opts.MaxBody)
	if err := a.hosts.check(r); err != nil {
		a.fail(w, r, err)
		return
	}
	if mutating(r.Method) {
		if err := a.authorize(r); err != nil {
			a.fail(w, r, err)
			return
		}
	} else if strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		// A websocket is not subject to CORS: its page's origin is
		// checked like a mutating request's.
		if err := a.hosts.checkOrigin(r); err != nil {
			a.fail(w, r, err)
			return
		}
	}
	if !streaming(r) {
		// Streaming routes keep no write deadline; every other route has
		// WriteTimeout to answer. Errors mean the writer cannot take
		// deadlines (e.g. in tests with a recorder), which is harmless.
		_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(a.opts.WriteTimeout))
	}
	a.mux.ServeHTTP(w, r)
}

// StatusError is an error with the HTTP status and code it answers with.
type StatusError struct {
	Status int
	Code   string
	Err    error
}

func (e *StatusError) Error() string { return e.Err.Error() }
func (e *StatusError) Unwrap() error { return e.Err }

func badRequest(format string, args ...any) error {
	return &StatusError{Status: http.StatusBadRequest, Code: "bad_request", Err: fmt.Errorf(format, args...)}
}

// writeJSON answers v as indented JSON. It encodes before writing the
// status, so a value JSON cannot carry (a NaN or an infinity in a report)
// answers a JSON 500 naming the problem rather than an empty 200.
func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		status = http.StatusInternalServerError
		b, _ = json.MarshalIndent(v1.Error{Error: http.StatusText(status), Code: "encode",
			Detail: fmt.Sprintf("encode the %T answer: %v", v, err)}, "", "  ")
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// statusOf maps an error to its HTTP status and code.
func statusOf(err error) (int, string) {
	var se *StatusError
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &se):
		return se.Status, se.Code
	case errors.As(err, &mbe):
		return http.StatusRequestEntityTooLarge, "too_large"
	case errors.Is(err, plugin.ErrUnknownPlugin), errors.Is(err, registry.ErrNotFound), errors.Is(err, errNoFile):
		return http.StatusNotFound, "not_found"
	case errors.Is(err, registry.ErrExists):
		return http.StatusConflict, "conflict"
	case errors.Is(err, plugin.ErrUnavailable):
		// The manifest's needs are not met: no retry helps until they are.
		return http.StatusServiceUnavailable, "unavailable"
	case errors.Is(err, plugin.ErrNotServing), errors.Is(err, plugin.ErrPluginExited):
		return http.StatusServiceUnavailable, "plugin_unavailable"
	case errors.Is(err, arena.ErrCapacity):
		return http.StatusInsufficientStorage, "arena_full"
	case errors.Is(err, errOutside), errors.Is(err, errBadPath), errors.Is(err, safetensors.ErrBadPath), errors.Is(err, safetensors.ErrOutsideRoot):
		return http.StatusBadRequest, "bad_path"
	}
	return http.StatusInternalServerError, "internal"
}

// fail writes err with the status its class implies.
func (a *API) fail(w http.ResponseWriter, r *http.Request, err error) {
	status, code := statusOf(err)
	lvl := slog.LevelWarn
	if status >= 500 {
		lvl = slog.LevelError
	}
	a.log.Log(r.Context(), lvl, "request failed", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
	if status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="arenahost"`)
	}
	if code == "plugin_unavailable" {
		w.Header().Set("Retry-After", retryAfter)
	}
	writeJSON(w, status, v1.Error{Error: http.StatusText(status), Code: code, Detail: err.Error()})
}

// decode reads a JSON body into v (decodeBody).
func decode(r *http.Request, v any) error {
	data, err := readBody(r)
	if err != nil {
		return err
	}
	return decodeBody(data, v)
}

// readBody reads the whole request body (bounded by --max-body): too long
// is 413, any other read error 400.
func readBody(r *http.Request) ([]byte, error) {
	data, err := io.ReadAll(r.Body)
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, fmt.Errorf("read request body: %w", err)
		}
		return nil, badRequest("read request body: %v", err)
	}
	return data, nil
}

// decodeLenient reads a JSON object into v, ignoring unknown fields (the
// A1111 routes, whose clients send many); anything but an object is 400.
func decodeLenient(r *http.Request, v any) error {
	data, err := readBody(r)
	if err != nil {
		return err
	}
	if err := requireObject(data); err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return badRequest("read request body: %v", err)
	}
	return nil
}

// requireObject refuses a body that is not a JSON object (by its first
// non-blank byte; the decoder checks the rest).
func requireObject(data []byte) error {
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	if len(trimmed) == 0 {
		return badRequest("read request body: empty (send one JSON object; see docs/api.md)")
	}
	if trimmed[0] != '{' {
		return badRequest("read request body: want a JSON object, got %s (see docs/api.md)", jsonKind(trimmed[0]))
	}
	return nil
}

// decodeBody decodes one JSON object into v, rejecting anything that is not
// an object (null, an array, a number: a `null` body must never read as
// "all defaults"), unknown fields and trailing data.
func decodeBody(data []byte, v any) error {
	if err := requireObject(data); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return badRequest("read request body: %v (send one JSON object; see docs/api.md)", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return badRequest("read request body: data after the JSON object")
	}
	return nil
}

// jsonKind names the JSON value that starts with c.
func jsonKind(c byte) string {
	switch {
	case c == 'n':
		return "null"
	case c == '[':
		return "an array"
	case c == '"':
		return "a string"
	case c == 't' || c == 'f':
		return "a boolean"
	case c == '-' || c >= '0' && c <= '9':
		return "a number"
	}
	return fmt.Sprintf("%q", c)
}

func (a *API) notFound(w http.ResponseWriter, r *http.Request) {
	a.fail(w, r, &StatusError{Status: http.StatusNotFound, Code: "not_found",
		Err: fmt.Errorf("no route %s %s (see docs/api.md)", r.Method, r.URL.Path)})
}

func (a *API) health(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, v1.Health{Status: "ok"})
}

func (a *API) arena(w http.ResponseWriter, _ *http.Request) {
	st := a.s.Arena.Stats()
	writeJSON(w, http.StatusOK, v1.ArenaStats{Backend: st.Backend, Capacity: uint64(st.Capacity), Allocated: uint64(st.Allocated),
		Peak: uint64(st.Peak), LargestFree: uint64(st.LargestFree), Fragmentation: st.Fragmentation, Segments: st.Segments, Regions: st.Regions})
}

func (a *API) plugins(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, a.s.Plugins.Status())
}

func (a *API) reload(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if _, err := a.s.Plugins.PluginStatus(name); errors.Is(err, plugin.ErrUnknownPlugin) {
		a.discoverPlugins(r) // plugins_rescan.go: a folder added since the last poll
	}
	if _, err := a.s.Plugins.PluginStatus(name); err != nil {
		a.fail(w, r, err)
		return
	}
	if err := a.s.Plugins.Swap(r.Context(), name); err != nil {
		a.fail(w, r, reloadErr(name, err)) // plugins_rescan.go
		return
	}
	st, err := a.s.Plugins.PluginStatus(name)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// maxLogLines bounds ?n= of the logs route.
const maxLogLines = 1000

func (a *API) pluginLogs(w http.ResponseWriter, r *http.Request) {
	n := 200
	if q := r.URL.Query().Get("n"); q != "" {
		v, err := strconv.Atoi(q)
		if err != nil || v < 1 || v > maxLogLines {
			a.fail(w, r, badRequest("query n=%q: want a line count from 1 to %d", q, maxLogLines))
			return
		}
		n = v
	}
	lines, err := a.s.Plugins.Logs(r.PathValue("name"), n)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, lines)
}
