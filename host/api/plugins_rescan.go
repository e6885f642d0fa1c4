package api

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/arenahost/arenahost/host/plugin"
)

// rescanPlugins serves POST /v1/plugins/rescan: the plugins directory is
// read now, new folders' plugins are started and removed folders' plugins
// stopped (the host also does this on its own within about two seconds).
func (a *API) rescanPlugins(w http.ResponseWriter, r *http.Request) {
	res, err := a.s.Plugins.Rescan(r.Context())
	if errors.Is(err, plugin.ErrNoPluginsDir) {
		a.fail(w, r, &StatusError{Status: http.StatusConflict, Code: "no_plugins_dir",
			Err: errors.New("rescan plugins: this host runs without a plugins directory (start it with --plugins DIR)")})
		return
	}
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// discoverPlugins rescans before a reload of a name the host does not know,
// so a folder copied in since the last poll can be reloaded at once.
func (a *API) discoverPlugins(r *http.Request) {
	if _, err := a.s.Plugins.Rescan(r.Context()); err != nil && !errors.Is(err, plugin.ErrNoPluginsDir) {
		a.log.Warn("rescan plugins before reload", "err", err)
	}
}

// reloadErr classes a failed reload: a refused swap (the new version did
// not start, check or warm up) is the plugin author's error, 422 with the
// plugin's own words first; the rest keep their class.
func reloadErr(name string, err error) error {
	if errors.Is(err, plugin.ErrSwapRefused) {
		return &StatusError{Status: http.StatusUnprocessableEntity, Code: "swap_refused", Err: err}
	}
	return fmt.Errorf("reload plugin %s: %w", name, err)
}
