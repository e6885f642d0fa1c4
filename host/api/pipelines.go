package api

import (
	"errors"
	"fmt"
	"net/http"
	"strings"

	v1 "github.com/arenahost/arenahost/sdk/api"
)

// choosePipeline picks the pipeline a request that names none runs: the
// configured one when set (an error naming its state when it cannot run),
// else the first serving plugin of kind "pipeline" by name. A plugin that
// is unavailable, failed, starting or crashed is never chosen. The error,
// when none can run, lists every pipeline with its state and reason.
func choosePipeline(configured string, ps []v1.PluginStatus) (string, error) {
	var why []string
	for _, p := range ps {
		if configured != "" && p.Name != configured {
			continue
		}
		if configured == "" && p.Kind != v1.KindPipeline {
			continue
		}
		if p.State == v1.PluginServing {
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
	out := v1.Pipelines{Configured: a.opts.Pipeline, Pipelines: []v1.PipelineInfo{}}
	for _, p := range ps {
		if p.Kind != v1.KindPipeline && p.Name != a.opts.Pipeline {
			continue
		}
		pi := v1.PipelineInfo{Name: p.Name, State: p.State, Runnable: p.State == v1.PluginServing}
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
