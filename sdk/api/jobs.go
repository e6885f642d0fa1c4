package api

import "time"

// JobState is where a job is in its life.
type JobState string

// The job states. Done, Failed and Cancelled are final.
const (
	JobQueued    JobState = "queued"
	JobRunning   JobState = "running"
	JobDone      JobState = "done"
	JobFailed    JobState = "failed"
	JobCancelled JobState = "cancelled"
)

// Final reports whether the state is terminal.
func (s JobState) Final() bool { return s == JobDone || s == JobFailed || s == JobCancelled }

// Origins a job can name (JobSpec.Origin); other short labels are accepted.
const (
	OriginAPI     = "api"
	OriginConsole = "console"
	OriginA1111   = "a1111"
	OriginComfyUI = "comfyui"
)

// PreviewSpec is one job's preview settings.
type PreviewSpec struct {
	// Method is a method the preview plugin lists as render.<method>
	// ("factor", "taesd"), or "none"; "" means "factor".
	Method string `json:"method,omitempty"`
	// Plugin names the preview plugin; "" picks the first plugin of kind
	// "preview".
	Plugin string `json:"plugin,omitempty"`
	// EveryN renders only steps that are multiples of N (and the last);
	// 0 or 1: every step.
	EveryN int `json:"every_n,omitempty"`
	// MinIntervalMS skips a step published sooner than this after the last
	// one taken for rendering (the last step is always taken).
	MinIntervalMS int `json:"min_interval_ms,omitempty"`
	// MaxSide caps the longer side of a frame (0: the plugin's default, 512).
	MaxSide int `json:"max_side,omitempty"`
	// Format is "jpeg" (default) or "png"; Quality the JPEG quality 1..100.
	Format  string `json:"format,omitempty"`
	Quality int    `json:"quality,omitempty"`
	// Family overrides the model family the pipeline's payload names.
	Family string `json:"family,omitempty"`
}

// JobSpec is the body of POST /v1/jobs.
type JobSpec struct {
	// Pipeline names the pipeline plugin ("" = the default of
	// GET /v1/pipelines); Method its method ("" = "run"), which must be one
	// the manifest declares public.
	Pipeline string `json:"pipeline"`
	Method   string `json:"method,omitempty"`
	// Params are the method's parameters, sent as msgpack; "job_id" is set
	// to the job's id so the pipeline publishes under it.
	Params  map[string]any `json:"params,omitempty"`
	Preview PreviewSpec    `json:"preview"`
	// ClientID tags the job for delivery (ComfyUI websocket clientId).
	ClientID string `json:"client_id,omitempty"`
	// Origin says who started the job, for people reading the job list:
	// "console", "a1111", "comfyui", or "api" (the default) for a plain
	// POST /v1/jobs. It is a label; nothing depends on it.
	Origin string `json:"origin,omitempty"`
}

// PreviewCounters are a job's preview figures. Every published latent is
// either rendered or dropped (throttled, superseded by a newer step, failed
// to render, or left when the job ended): Published = Rendered + Dropped
// once the job is final.
type PreviewCounters struct {
	Published uint64 `json:"published"`
	Rendered  uint64 `json:"rendered"`
	Dropped   uint64 `json:"dropped"`
}

// PreviewInfo is the preview part of a Job.
type PreviewInfo struct {
	PreviewSpec
	PreviewCounters
	// Frame is the newest frame's id (0: none yet), FrameStep its step,
	// Generation the preview plugin generation that rendered it.
	Frame      uint64 `json:"frame"`
	FrameStep  int    `json:"frame_step"`
	Generation uint64 `json:"generation"`
	LastError  string `json:"last_error,omitempty"`
}

// Job is a job as the API shows it: an entry of GET /v1/jobs and the body
// of GET and DELETE /v1/jobs/{id}.
type Job struct {
	ID       string `json:"id"`
	Pipeline string `json:"pipeline"`
	Method   string `json:"method"`
	ClientID string `json:"client_id,omitempty"`
	Origin   string `json:"origin,omitempty"`
	// Params are the parameters the job was created with (without the
	// job_id the pipeline is given).
	Params   map[string]any `json:"params,omitempty"`
	State    JobState       `json:"state"`
	Step     int            `json:"step"`
	Total    int            `json:"total"`
	Progress float64        `json:"progress"` // 0..1
	ETA      float64        `json:"eta_seconds"`
	Elapsed  float64        `json:"elapsed_seconds"`
	Created  time.Time      `json:"created"`
	Started  time.Time      `json:"started,omitzero"`
	Ended    time.Time      `json:"ended,omitzero"`
	Error    string         `json:"error,omitempty"`
	Preview  PreviewInfo    `json:"preview"`
	// Result is what the pipeline's method returned (decoded from
	// msgpack), once the job is done.
	Result any `json:"result,omitempty"`
}

// JobCreated is the body of POST /v1/jobs: the job and where to watch it
// (links "self", "preview", "mjpeg", "events").
type JobCreated struct {
	Job
	Links map[string]string `json:"links"`
}

// Event types of GET /v1/jobs/{id}/events (the server-sent event's
// "event:" field).
const (
	EventProgress = "progress" // a step was published
	EventFrame    = "frame"    // a preview frame was rendered
	EventState    = "state"    // the job changed state
)

// JobEvent is the data of one server-sent event of
// GET /v1/jobs/{id}/events.
type JobEvent struct {
	Job string `json:"job"`
	// ClientID is the job's client_id (JobSpec), so a client following
	// several jobs' events picks out its own.
	ClientID   string   `json:"client_id,omitempty"`
	State      JobState `json:"state"`
	Step       int      `json:"step"`
	Total      int      `json:"total"`
	Progress   float64  `json:"progress"`
	ETA        float64  `json:"eta_seconds"`
	Frame      uint64   `json:"frame"`
	FrameStep  int      `json:"frame_step"`
	Generation uint64   `json:"generation"`
	Published  uint64   `json:"published"`
	Rendered   uint64   `json:"rendered"`
	Dropped    uint64   `json:"dropped"`
	Error      string   `json:"error,omitempty"`
	FrameURL   string   `json:"frame_url,omitempty"`
}
