package api

import (
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/arenahost/arenahost/host/plugin"
)

// PipelineInfo is one pipeline plugin in GET /v1/pipelines.
type PipelineInfo struct {
	Name  string       `json:"name"`
	State plugin.State `json:"state"`
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

// choosePipeline picks the pipeline a request that names none runs: the
// configured one when set (an error naming its state when it cannot run),
// else the first serving plugin of kind "pipeline" by name. A plugin that
// is unavailable, failed, starting or crashed is never chosen. The error,
// when none can run, lists every pipeline with its state and reason.
func choosePipeline(configured string, ps []plugin.Status) (string, error) {
	var why []string
	for _, p := range ps {
		if configured != "" && p.Name != configured {
			continue
		}
		if configured == "" && p.Kind != plugin.KindPipeline {
			continue
		}
		if p.State == plugin.StateServing {
			return p.Name, nil
		}
		w := fmt.Sprintf("%s is %s", p.Name, p.State)
		if p.LastError != "" {
			w += ": " + p.LastError
		}
		why = append(why, w)
	}
	switch {
	case configured != "" && len(why) == 0:
		return "", &StatusError{Status: http.StatusServiceUnavailable, Code: "unavailable",
			Err: fmt.Errorf("pipeline %q (--pipeline) is not installed under --plugins", configured)}
	case configured != "":
		return "", &StatusError{Status: http.StatusServiceUnavailable, Code: "unavailable",
			Err: fmt.Errorf("pipeline %q (--pipeline) cannot run: %s", configured, strings.Join(why, "; "))}
	case len(why) == 0:
		return "", &StatusError{Status: http.StatusServiceUnavailable, Code: "unavailable",
			Err: errors.New("no pipeline plugin is installed (install one under --plugins, or name it with --pipeline)")}
	}
	return "", &StatusError{Status: http.StatusServiceUnavailable, Code: "unavailable",
		Err: fmt.Errorf("no pipeline plugin can run: %s", strings.Join(why, "; "))}
}

// pipeline returns the pipeline a request that names none runs.
func (a *API) pipeline() (string, error) {
	return choosePipeline(a.opts.Pipeline, a.s.Plugins.Status())
}

// pipelines answers GET /v1/pipelines.
func (a *API) pipelines(w http.ResponseWriter, _ *http.Request) {
	ps := a.s.Plugins.Status()
	out := Pipelines{Configured: a.opts.Pipeline, Pipelines: []PipelineInfo{}}
	for _, p := range ps {
		if p.Kind != plugin.KindPipeline && p.Name != a.opts.Pipeline {
			continue
		}
		pi := PipelineInfo{Name: p.Name, State: p.State, Runnable: p.State == plugin.StateServing}
		if !pi.Runnable {
			pi.Reason = p.LastError
		}
		out.Pipelines = append(out.Pipelines, pi)
	}
	if name, err := choosePipeline(a.opts.Pipeline, ps); err != nil {
		out.Reason = err.Error()
	} else {
		out.Default = name
	}
	writeJSON(w, http.StatusOK, out)
}
