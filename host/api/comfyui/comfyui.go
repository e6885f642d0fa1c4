// Package comfyui owns arenahost's ComfyUI compatibility surface: ComfyUI's
// server API (POST /prompt with API-format graphs, /queue, /history, /view,
// /upload/image, /interrupt, /free, /system_stats, /object_info,
// /embeddings, /extensions, /features) at the root and under /api/, and its
// websocket (/ws) with status, execution and progress messages and binary
// previews. It is a translator: a graph's nodes map onto arenahost's core
// services (checkpoints in the arena, LoRAs applied through the LoRA
// coordinator, sampling as pipeline jobs) reached through the Core
// interface, and it owns nothing else but ComfyUI's own bookkeeping (the
// prompt queue, the history, and the input/output/temp folders of files
// it wrote or was sent). docs/comfyui.md documents the node mapping.
package comfyui

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Version is the ComfyUI server version whose API shapes this package
// follows (the fixtures under testdata/ were captured from it).
const Version = "0.30.0"

// LoRA is one LoRA a MODEL carries: its name as the LoRA list shows it,
// its strength, and the apply mode ("side" or "fuse").
type LoRA struct {
	Name     string
	Strength float64
	Mode     string
}

// Sampling is one pipeline run with the LoRAs its model carries.
type Sampling struct {
	Model         string // registry name
	LoRAs         []LoRA // applied, all in one mode, just before the run (none: removed)
	Prompt        string
	Seed          int64
	Steps         int
	Width, Height int
}

// Events receives a sampling's progress and preview frames.
type Events struct {
	Progress func(step, total int)
	// Frame gets each preview frame: format "jpeg" or "png" and the bytes.
	Frame func(format string, data []byte)
}

// ErrInterrupted is what Sample returns when the job was cancelled.
var ErrInterrupted = errors.New("interrupted")

// Stats is what /system_stats reports of the host.
type Stats struct {
	RAMTotal, RAMFree uint64
	// Device is the arena: its backend and its capacity and free bytes.
	Device                  string
	DeviceTotal, DeviceFree uint64
	DeviceType              string // "cpu" or "cuda"
	DeviceIndex             int
	Argv                    []string
}

// Core is what the translator needs from arenahost.
type Core interface {
	// Checkpoints lists the checkpoints loader nodes may name.
	Checkpoints() ([]string, error)
	// LoadCheckpoint returns the registry name of a listed checkpoint,
	// loading it into the arena when it is not there.
	LoadCheckpoint(ctx context.Context, name string) (string, error)
	// LoRAs lists the LoRA names LoRA nodes may name.
	LoRAs() ([]string, error)
	// Sample makes exactly the sampling's LoRAs active on its model, runs
	// the pipeline once (the two together, so that no other generation
	// changes the LoRAs in between) and returns the final image at the
	// requested size; a cancelled job returns ErrInterrupted.
	Sample(ctx context.Context, s Sampling, ev Events) (image.Image, error)
	// Free removes the applied LoRAs (unload) as /free asks.
	Free(ctx context.Context) error
	// Stats reports memory for /system_stats.
	Stats() Stats
}

// Options configures a Server.
type Options struct {
	// Dir holds ComfyUI's input/, output/ and temp/ folders.
	Dir    string
	Logger *slog.Logger
	// MaxUpload bounds /upload/image bodies (default 64 MiB).
	MaxUpload int64
	// MaxHistory bounds the history kept (default 10000, as ComfyUI).
	MaxHistory int
	// Frontend is the static/ folder of comfyui-frontend-package, served
	// under /comfy/; "" serves a page saying how to install it.
	Frontend string
}

// Server serves ComfyUI's API over a Core.
type Server struct {
	core Core
	opts Options
	log  *slog.Logger
	hub  *hub
	q    *queue
	// imgMu serialises file naming in the output folders.
	imgMu sync.Mutex
}

// New returns a Server and starts its executor; Close stops it.
func New(core Core, o Options) (*Server, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.MaxUpload <= 0 {
		o.MaxUpload = 64 << 20
	}
	if o.MaxHistory <= 0 {
		o.MaxHistory = 10000
	}
	for _, d := range []string{"input", "output", "temp"} {
		if err := os.MkdirAll(filepath.Join(o.Dir, d), 0o755); err != nil {
			return nil, fmt.Errorf("comfyui: create %s folder: %w", d, err)
		}
	}
	s := &Server{core: core, opts: o, log: o.Logger, hub: newHub(o.Logger)}
	s.q = newQueue(s)
	go s.q.run()
	return s, nil
}

// Close stops the executor (the running prompt is interrupted).
func (s *Server) Close() { s.q.close() }

type route struct {
	pattern string
	h       http.HandlerFunc
}

// Register adds every route at /X and /api/X, as ComfyUI does, and under
// /comfy/api/X for the frontend served at /comfy/ (it builds its URLs from
// the page's path).
func (s *Server) Register(mux *http.ServeMux) {
	routes := []route{
		{"GET /ws", s.serveWS},
		{"POST /prompt", s.postPrompt},
		{"GET /prompt", s.getPrompt},
		{"GET /queue", s.getQueue},
		{"POST /queue", s.postQueue},
		{"GET /history", s.getHistory},
		{"GET /history/{id}", s.getHistoryID},
		{"POST /history", s.postHistory},
		{"POST /interrupt", s.postInterrupt},
		{"POST /free", s.postFree},
		{"GET /view", s.view},
		{"POST /upload/image", s.uploadImage},
		{"GET /system_stats", s.systemStats},
		{"GET /object_info", s.objectInfo},
		{"GET /object_info/{node}", s.objectInfoNode},
		{"GET /embeddings", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, 200, []string{}) }},
		{"GET /extensions", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, 200, []string{}) }},
		{"GET /features", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, 200, serverFeatures(s.opts.MaxUpload)) }},
	}
	fe := &frontend{s: s, static: s.opts.Frontend}
	routes = append(routes, fe.routes()...)
	for _, r := range routes {
		mux.HandleFunc(r.pattern, r.h)
		method, path, _ := strings.Cut(r.pattern, " ")
		mux.HandleFunc(method+" /api"+path, r.h)
		mux.HandleFunc(method+" /comfy/api"+path, r.h)
	}
	mux.HandleFunc("GET /comfy/ws", s.serveWS)
	mux.HandleFunc("GET /comfy/", fe.serveStatic)
	if fe.static != "" {
		// The frontend names some images by absolute paths.
		mux.HandleFunc("GET /assets/", fe.serveRootAssets)
	}
	mux.Handle("GET /comfy", http.RedirectHandler("/comfy/", http.StatusMovedPermanently))
}

// serverFeatures are the flags /features and the websocket answer with:
// ComfyUI's keys, true only for what arenahost does.
func serverFeatures(maxUpload int64) map[string]any {
	return map[string]any{"supports_preview_metadata": true, "supports_model_type_tags": false, "max_upload_size": maxUpload,
		"extension": map[string]any{"manager": map[string]any{"supports_v4": false}}, "node_replacements": false, "assets": false}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// apiError is ComfyUI's error object.
type apiError struct {
	Type      string         `json:"type"`
	Message   string         `json:"message"`
	Details   string         `json:"details"`
	ExtraInfo map[string]any `json:"extra_info"`
}

// badRequest answers ComfyUI's {error, node_errors} with status 400.
func badRequest(w http.ResponseWriter, typ, msg, details string) {
	writeJSON(w, http.StatusBadRequest, map[string]any{
		"error":       apiError{Type: typ, Message: msg, Details: details, ExtraInfo: map[string]any{}},
		"node_errors": map[string]any{},
	})
}

func nowMillis() int64 { return time.Now().UnixMilli() }
