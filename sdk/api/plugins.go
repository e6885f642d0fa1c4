package api

import "time"

// PluginState is where a plugin is in its life cycle.
type PluginState string

// The plugin states.
const (
	PluginStarting   PluginState = "starting"
	PluginServing    PluginState = "serving"
	PluginSwapping   PluginState = "swapping"
	PluginCrashed    PluginState = "crashed"
	PluginRestarting PluginState = "restarting"
	PluginFailed     PluginState = "failed"
	// PluginUnavailable: the manifest's "requires" are not met on this
	// machine (LastError says what is missing); the plugin was not
	// started. A swap (reload) checks again.
	PluginUnavailable PluginState = "unavailable"
	PluginStopped     PluginState = "stopped"
)

// Plugin kinds the host treats specially (PluginStatus.Kind, the
// manifest's "kind"). They are shared/manifest's, spelled out so that this
// package stays free of the plugin transport (a test checks they agree).
const (
	KindLoRA     = "lora"
	KindPipeline = "pipeline"
	KindPreview  = "preview"
)

// PluginStatus is a snapshot of one plugin: an entry of GET /v1/plugins
// and the body of POST /v1/plugins/{name}/reload.
type PluginStatus struct {
	Name       string      `json:"name"`
	Version    string      `json:"version"`
	Kind       string      `json:"kind"`
	Language   string      `json:"language"`
	Manifest   string      `json:"manifest"`
	State      PluginState `json:"state"`
	Generation uint64      `json:"generation"` // 0: none serving
	PID        int         `json:"pid"`
	Since      time.Time   `json:"since,omitzero"` // when the generation started
	InFlight   int         `json:"in_flight"`
	Restarts   int         `json:"restarts"`
	Crashes    int         `json:"crashes"` // within the crash window
	// CrashLimit crashes within CrashWindowSeconds mark the plugin
	// failed (the restart budget): it is not restarted until a reload
	// (POST /v1/plugins/NAME/reload) or a change to its files swaps it,
	// which also empties the crash count.
	CrashLimit         int     `json:"crash_limit"`
	CrashWindowSeconds float64 `json:"crash_window_seconds"`
	LastError          string  `json:"last_error,omitempty"`
	// LastErrorAt is when LastError was set (a failed start or swap, a
	// crash).
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
	// LastCallError is the newest failed call (not cancelled by its
	// caller) and LastCallErrorAt when it failed: a plugin that serves but
	// whose calls fail shows it here.
	LastCallError   string         `json:"last_call_error,omitempty"`
	LastCallErrorAt time.Time      `json:"last_call_error_at,omitzero"`
	Methods         []PluginMethod `json:"methods,omitempty"`
}

// PluginMethod is one method a plugin serves, from its Describe.
type PluginMethod struct {
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	Streaming   bool   `json:"streaming,omitempty"`
	// Public: HTTP clients may run it as a job (the manifest's
	// public_methods); every other method is for the host only.
	Public bool `json:"public,omitempty"`
}

// LogLine is one line a plugin wrote to stderr (or through the Host
// service's Log call): an entry of GET /v1/plugins/{name}/logs.
type LogLine struct {
	Time       time.Time `json:"time"`
	Generation uint64    `json:"generation"`
	Level      string    `json:"level"`
	Text       string    `json:"text"`
}

// RescanResult says what a rescan of the plugins directory changed: the
// body of POST /v1/plugins/rescan.
type RescanResult struct {
	// Added are the plugins found in new folders and started (a plugin
	// that failed to start is listed too, and stays registered as failed
	// with its error in /v1/plugins).
	Added []string `json:"added"`
	// Removed are the plugins whose folder (plugin.json) is gone; they
	// were drained and stopped.
	Removed []string `json:"removed"`
	// Errors are the manifests that could not be used (unparseable, a
	// name already taken) and the starts that failed.
	Errors []string `json:"errors,omitempty"`
}

// PipelineInfo is one pipeline plugin in GET /v1/pipelines.
type PipelineInfo struct {
	Name  string      `json:"name"`
	State PluginState `json:"state"`
	// Runnable: the plugin is serving, so a job on it starts now.
	Runnable bool `json:"runnable"`
	// Reason says why it cannot run (its last error; for an unavailable
	// plugin, the requirement that is not met).
	Reason string `json:"reason,omitempty"`
}

// Pipelines is the body of GET /v1/pipelines: every plugin of kind
// "pipeline" and the one txt2img, POST /v1/jobs without a pipeline and the
// console use.
type Pipelines struct {
	// Default is the pipeline used when a request names none; "" when none
	// can run (Reason says why).
	Default string `json:"default"`
	// Configured is --pipeline, when set.
	Configured string         `json:"configured,omitempty"`
	Reason     string         `json:"reason,omitempty"`
	Pipelines  []PipelineInfo `json:"pipelines"`
}
