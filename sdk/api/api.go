// Package api owns the request and response types of arenahost's HTTP API
// under /v1: models, arena, LoRAs, jobs and their events, plugins,
// pipelines and the JSON error body. The host serves exactly these types
// and sdk/client sends and decodes them, so a Go tool or UI outside the
// repository imports them instead of declaring its own copies.
// docs/api.md describes every route; the JSON field names here are that
// contract.
//
// The package holds data only: no behaviour beyond small helpers on the
// types (JobState.Final), and it imports nothing of the host.
package api

// Error is the JSON body of every error response: Error is the HTTP status
// text, Code a stable machine-readable class ("bad_request", "not_found",
// "swap_refused", "plugin_unavailable" …; docs/api.md lists them), Detail
// what went wrong in words.
type Error struct {
	Error  string `json:"error"`
	Code   string `json:"code"`
	Detail string `json:"detail,omitempty"`
}

// Health is the body of GET /v1/health.
type Health struct {
	Status string `json:"status"`
}
