package client

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/arenahost/arenahost/sdk/api"
)

// Health answers GET /v1/health.
func (c *Client) Health(ctx context.Context) (api.Health, error) {
	return get[api.Health](ctx, c, "/v1/health")
}

// Arena answers GET /v1/arena: the arena's capacity and use.
func (c *Client) Arena(ctx context.Context) (api.ArenaStats, error) {
	return get[api.ArenaStats](ctx, c, "/v1/arena")
}

// ArenaUsage answers GET /v1/arena/usage: the arena's bytes by owner.
func (c *Client) ArenaUsage(ctx context.Context) (api.ArenaUsage, error) {
	return get[api.ArenaUsage](ctx, c, "/v1/arena/usage")
}

// ArenaHistory returns the arena samples the host recorded after since
// (the zero time: all it keeps, about ten minutes) (GET /v1/arena/history).
func (c *Client) ArenaHistory(ctx context.Context, since time.Time) (*api.ArenaHistory, error) {
	p := "/v1/arena/history"
	if !since.IsZero() {
		p += "?" + url.Values{"since": {since.UTC().Format(time.RFC3339Nano)}}.Encode()
	}
	return call[api.ArenaHistory](ctx, c, http.MethodGet, p, nil)
}

// Models lists the loaded models (GET /v1/models).
func (c *Client) Models(ctx context.Context) ([]api.ModelInfo, error) {
	return get[[]api.ModelInfo](ctx, c, "/v1/models")
}

// ModelFiles lists the loadable files of the models directory
// (GET /v1/models/files).
func (c *Client) ModelFiles(ctx context.Context) ([]api.ModelFile, error) {
	return get[[]api.ModelFile](ctx, c, "/v1/models/files")
}

// LoadModel loads a checkpoint into the arena (POST /v1/models).
func (c *Client) LoadModel(ctx context.Context, req api.LoadModelRequest) (*api.ModelInfo, error) {
	return call[api.ModelInfo](ctx, c, http.MethodPost, "/v1/models", req)
}

// UnloadModel removes a model from the arena (DELETE /v1/models/{name}).
func (c *Client) UnloadModel(ctx context.Context, name string) error {
	_, err := call[api.Unloaded](ctx, c, http.MethodDelete, "/v1/models/"+seg(name), nil)
	return err
}

// DigestQuery selects what GET /v1/models/{name}/digest answers: Detail
// adds each tensor's hash; Prefix hashes only the tensors whose names start
// with it ("" = every tensor).
type DigestQuery struct {
	Detail bool
	Prefix string
}

// ModelDigest hashes a model's tensors as the arena holds them
// (GET /v1/models/{name}/digest).
func (c *Client) ModelDigest(ctx context.Context, name string, q DigestQuery) (*api.ModelDigest, error) {
	p := "/v1/models/" + seg(name) + "/digest"
	v := url.Values{}
	if q.Detail {
		v.Set("detail", "1")
	}
	if q.Prefix != "" {
		v.Set("prefix", q.Prefix)
	}
	if len(v) > 0 {
		p += "?" + v.Encode()
	}
	return call[api.ModelDigest](ctx, c, http.MethodGet, p, nil)
}

// LoRAs lists the LoRA directory's files (GET /v1/loras).
func (c *Client) LoRAs(ctx context.Context) ([]api.LoRAFile, error) {
	return get[[]api.LoRAFile](ctx, c, "/v1/loras")
}

// ApplyLoRAs makes req's set the model's LoRAs (POST /v1/loras/apply); an
// empty, non-nil LoRAs removes them all. A nil LoRAs is refused here, as the
// host refuses a missing list: removing every LoRA takes RemoveLoRAs or an
// explicit empty slice, never a forgotten field.
func (c *Client) ApplyLoRAs(ctx context.Context, req api.ApplyRequest) (*api.LoRAResult, error) {
	if req.LoRAs == nil {
		return nil, errors.New("arenahost POST /v1/loras/apply: ApplyRequest.LoRAs is nil; to remove every LoRA call RemoveLoRAs or pass an empty, non-nil slice")
	}
	return call[api.LoRAResult](ctx, c, http.MethodPost, "/v1/loras/apply", req)
}

// RemoveLoRAs removes every LoRA of model ("" = the default model) and
// restores its original bytes (DELETE /v1/loras).
func (c *Client) RemoveLoRAs(ctx context.Context, model string) (*api.LoRAResult, error) {
	return call[api.LoRAResult](ctx, c, http.MethodDelete, "/v1/loras"+modelQuery(model), nil)
}

// LoRAState is what model ("" = the default model) holds now
// (GET /v1/loras/state).
func (c *Client) LoRAState(ctx context.Context, model string) (*api.LoRAState, error) {
	return call[api.LoRAState](ctx, c, http.MethodGet, "/v1/loras/state"+modelQuery(model), nil)
}

func modelQuery(model string) string {
	if model == "" {
		return ""
	}
	return "?" + url.Values{"model": {model}}.Encode()
}

// Plugins lists the plugins and their state (GET /v1/plugins).
func (c *Client) Plugins(ctx context.Context) ([]api.PluginStatus, error) {
	return get[[]api.PluginStatus](ctx, c, "/v1/plugins")
}

// ReloadPlugin hot-swaps a plugin to the files now in its folder
// (POST /v1/plugins/{name}/reload). A refused new version is an *Error
// with Code "swap_refused" and the old version keeps serving.
func (c *Client) ReloadPlugin(ctx context.Context, name string) (*api.PluginStatus, error) {
	return call[api.PluginStatus](ctx, c, http.MethodPost, "/v1/plugins/"+seg(name)+"/reload", nil)
}

// RescanPlugins reads the plugins directory now: new folders' plugins
// start, removed folders' plugins stop (POST /v1/plugins/rescan).
func (c *Client) RescanPlugins(ctx context.Context) (*api.RescanResult, error) {
	return call[api.RescanResult](ctx, c, http.MethodPost, "/v1/plugins/rescan", nil)
}

// PluginLogs returns a plugin's last n log lines (0: the host's default,
// 200) (GET /v1/plugins/{name}/logs).
func (c *Client) PluginLogs(ctx context.Context, name string, n int) ([]api.LogLine, error) {
	p := "/v1/plugins/" + seg(name) + "/logs"
	if n > 0 {
		p += "?n=" + strconv.Itoa(n)
	}
	return get[[]api.LogLine](ctx, c, p)
}

// Pipelines lists the pipeline plugins and the default one
// (GET /v1/pipelines).
func (c *Client) Pipelines(ctx context.Context) (*api.Pipelines, error) {
	return call[api.Pipelines](ctx, c, http.MethodGet, "/v1/pipelines", nil)
}

// CreateJob starts a job (POST /v1/jobs).
func (c *Client) CreateJob(ctx context.Context, spec api.JobSpec) (*api.JobCreated, error) {
	return call[api.JobCreated](ctx, c, http.MethodPost, "/v1/jobs", spec)
}

// Job returns a job's snapshot (GET /v1/jobs/{id}).
func (c *Client) Job(ctx context.Context, id string) (*api.Job, error) {
	return call[api.Job](ctx, c, http.MethodGet, "/v1/jobs/"+seg(id), nil)
}

// Jobs lists the queued, running and finished jobs (GET /v1/jobs).
func (c *Client) Jobs(ctx context.Context) ([]api.Job, error) {
	return get[[]api.Job](ctx, c, "/v1/jobs")
}

// CancelJob cancels a job and returns its snapshot once it has ended (or
// after the host's few seconds of waiting) (DELETE /v1/jobs/{id}).
func (c *Client) CancelJob(ctx context.Context, id string) (*api.Job, error) {
	return call[api.Job](ctx, c, http.MethodDelete, "/v1/jobs/"+seg(id), nil)
}
