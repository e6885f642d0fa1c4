// Package console owns arenahost's web console: plain HTML, CSS and
// JavaScript embedded in the binary with go:embed (no Node build), served at
// / by the HTTP API. The page is an operator's cockpit that talks only to
// the JSON API: loaded models (load from the models directory, unload,
// digest) and each model's applied LoRA set with live strength sliders;
// running, queued and finished jobs with cancel, a live MJPEG preview and a
// gallery; plugins with their state, restart budget, errors, log tail and
// reload; and the arena's memory over the last minutes with a breakdown by
// owner.
package console

import (
	"embed"
	"io/fs"
	"net/http"
)

//go:embed static
var files embed.FS

// Static is the console's file tree (index.html, app.js, style.css).
var Static, _ = fs.Sub(files, "static")

// Handler serves the console's files. Responses are marked no-cache so a
// rebuilt binary's console is picked up on reload; the files are small.
func Handler() http.Handler {
	fsrv := http.FileServerFS(Static)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-cache")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'")
		fsrv.ServeHTTP(w, r)
	})
}
