// Package console owns arenahost's web console: plain HTML, CSS and
// JavaScript embedded in the binary with go:embed (no Node build), served at
// / by the HTTP API. The page talks only to the JSON API: arena gauge,
// plugins table with reload, LoRA list with strengths, mode, apply/remove
// and the last report, and a job launcher with a live MJPEG preview and SSE
// progress.
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
