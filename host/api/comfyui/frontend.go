package comfyui

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// FrontendPackage is the comfyui-frontend-package version arenahost serves
// and tests; `make comfy-frontend` installs it.
const FrontendPackage = "comfyui-frontend-package==1.58.1"

// frontendSettings are settings every answer of GET /settings carries
// unless the user changed them: no tutorial dialog, no call to an
// external endpoint for version updates.
var frontendSettings = map[string]any{
	"Comfy.TutorialCompleted":                 true,
	"Comfy.Notification.ShowVersionUpdates":   false,
	"Comfy.Validation.Workflows":              true,
	"Comfy.InstalledVersion":                  strings.TrimPrefix(FrontendPackage, "comfyui-frontend-package=="),
	"Comfy.Workflow.ShowMissingModelsWarning": false,
	"Comfy.Workflow.ShowMissingNodesWarning":  true,
}

// frontend serves ComfyUI's web frontend: its static files under /comfy/
// and the routes it calls besides the server API (users, settings,
// userdata, i18n, jobs, …). Settings and userdata files live in
// DIR/user/default, as ComfyUI keeps them.
type frontend struct {
	s      *Server
	static string // the package's static/ folder; "" when not installed
	mu     sync.Mutex
}

func (f *frontend) userDir() string { return filepath.Join(f.s.opts.Dir, "user", "default") }

func (f *frontend) routes() []route {
	return []route{
		{"GET /users", func(w http.ResponseWriter, _ *http.Request) {
			writeJSON(w, 200, map[string]any{"storage": "server", "migrated": true})
		}},
		{"GET /settings", f.getSettings},
		{"GET /settings/{id}", f.getSetting},
		{"POST /settings", f.postSettings},
		{"POST /settings/{id}", f.postSetting},
		{"GET /userdata", f.listUserdata},
		{"GET /userdata/{file}", f.getUserdata},
		{"POST /userdata/{file}", f.postUserdata},
		{"DELETE /userdata/{file}", f.deleteUserdata},
		{"POST /userdata/{file}/move/{dest}", f.moveUserdata},
		{"GET /i18n", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, 200, map[string]any{}) }},
		{"GET /experiment/models", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, 200, []any{}) }},
		{"GET /experiment/models/{folder}", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, 200, []any{}) }},
		{"GET /global_subgraphs", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, 200, map[string]any{}) }},
		{"GET /workflow_templates", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, 200, map[string]any{}) }},
		{"GET /node_replacements", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, 200, map[string]any{}) }},
		{"GET /jobs", f.jobs},
	}
}

func (f *frontend) settings() map[string]any {
	out := map[string]any{}
	for k, v := range frontendSettings {
		out[k] = v
	}
	if b, err := os.ReadFile(filepath.Join(f.userDir(), "comfy.settings.json")); err == nil {
		var stored map[string]any
		if json.Unmarshal(b, &stored) == nil {
			for k, v := range stored {
				out[k] = v
			}
		}
	}
	return out
}

func (f *frontend) getSettings(w http.ResponseWriter, _ *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	writeJSON(w, 200, f.settings())
}

func (f *frontend) getSetting(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	writeJSON(w, 200, f.settings()[r.PathValue("id")])
}

// storeSettings merges updates into the stored settings.
func (f *frontend) storeSettings(updates map[string]any) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	stored := map[string]any{}
	p := filepath.Join(f.userDir(), "comfy.settings.json")
	if b, err := os.ReadFile(p); err == nil {
		_ = json.Unmarshal(b, &stored)
	}
	for k, v := range updates {
		stored[k] = v
	}
	b, _ := json.MarshalIndent(stored, "", "    ")
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	return writeFileAtomic(p, b)
}

func (f *frontend) postSettings(w http.ResponseWriter, r *http.Request) {
	var v map[string]any
	b, err := io.ReadAll(r.Body)
	if err == nil {
		err = objectBody(b)
	}
	if err == nil {
		err = json.Unmarshal(b, &v)
	}
	if err != nil {
		http.Error(w, "settings: want a JSON object: "+err.Error(), http.StatusBadRequest)
		return
	}
	if err := f.storeSettings(v); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.WriteHeader(200)
}

func (f *frontend) postSetting(w http.ResponseWriter, r *http.Request) {
	var v any
	if err := json.NewDecoder(r.Body).Decode(&v); err != nil {
		http.Error(w, "setting: want a JSON value", http.StatusBadRequest)
		return
	}
	if err := f.storeSettings(map[string]any{r.PathValue("id"): v}); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.WriteHeader(200)
}

// userPath confines a userdata path (URL-decoded by the mux) to the user
// folder.
func (f *frontend) userPath(rel string) (string, bool) {
	return confined(f.userDir(), "", rel)
}

// listUserdata lists files under ?dir= (relative paths; full_info: path,
// size, modified; split: [path, parts…]). A folder that does not exist
// yet is empty (ComfyUI answers 404, which the frontend logs as an
// error on every start).
func (f *frontend) listUserdata(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	dir := q.Get("dir")
	if dir == "" {
		http.Error(w, "Directory not provided", http.StatusBadRequest)
		return
	}
	root, ok := f.userPath(dir)
	if !ok {
		http.Error(w, "Invalid directory", http.StatusForbidden)
		return
	}
	recurse, full, split := q.Get("recurse") == "true", q.Get("full_info") == "true", q.Get("split") == "true"
	out := []any{}
	_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.IsDir() {
			if p != root && !recurse {
				return filepath.SkipDir
			}
			return nil
		}
		rel, _ := filepath.Rel(root, p)
		rel = filepath.ToSlash(rel)
		switch {
		case full:
			st, err := d.Info()
			if err == nil {
				out = append(out, map[string]any{"path": rel, "size": st.Size(), "modified": float64(st.ModTime().UnixNano()) / 1e9})
			}
		case split:
			out = append(out, append([]any{rel}, toAny(strings.Split(rel, "/"))...))
		default:
			out = append(out, rel)
		}
		return nil
	})
	writeJSON(w, 200, out)
}

func toAny(s []string) []any {
	out := make([]any, len(s))
	for i, v := range s {
		out[i] = v
	}
	return out
}

// getUserdata serves a userdata file as an attachment (never inline,
// as ComfyUI). user.css, missing, is an empty stylesheet.
func (f *frontend) getUserdata(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("file")
	p, ok := f.userPath(name)
	if !ok {
		http.Error(w, "Invalid path", http.StatusForbidden)
		return
	}
	b, err := os.ReadFile(p)
	if err != nil {
		switch name {
		case "user.css": // the frontend asks for it on every start
			w.Header().Set("Content-Type", "text/css")
			w.WriteHeader(200)
			return
		case "comfy.templates.json": // no workflow templates are installed
			writeJSON(w, 200, []any{})
			return
		}
		http.NotFound(w, r)
		return
	}
	w.Header().Set("X-Content-Type-Options", "nosniff")
	if name == "user.css" {
		w.Header().Set("Content-Type", "text/css")
	} else {
		w.Header().Set("Content-Type", "application/octet-stream")
		if strings.HasSuffix(name, ".json") {
			w.Header().Set("Content-Type", "application/json")
		}
		w.Header().Set("Content-Disposition", "attachment")
	}
	_, _ = w.Write(b)
}

func (f *frontend) postUserdata(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("file")
	p, ok := f.userPath(name)
	if !ok {
		http.Error(w, "Invalid path", http.StatusForbidden)
		return
	}
	if r.URL.Query().Get("overwrite") == "false" {
		if _, err := os.Stat(p); err == nil {
			http.Error(w, "File already exists", http.StatusConflict)
			return
		}
	}
	b, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, "read body: "+err.Error(), http.StatusBadRequest)
		return
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	if err := writeFileAtomic(p, b); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	if r.URL.Query().Get("full_info") == "true" {
		st, _ := os.Stat(p)
		writeJSON(w, 200, map[string]any{"path": filepath.ToSlash(name), "size": st.Size(), "modified": float64(st.ModTime().UnixNano()) / 1e9})
		return
	}
	writeJSON(w, 200, filepath.ToSlash(name))
}

func (f *frontend) deleteUserdata(w http.ResponseWriter, r *http.Request) {
	p, ok := f.userPath(r.PathValue("file"))
	if !ok {
		http.Error(w, "Invalid path", http.StatusForbidden)
		return
	}
	if err := os.Remove(p); err != nil {
		http.NotFound(w, r)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (f *frontend) moveUserdata(w http.ResponseWriter, r *http.Request) {
	src, ok1 := f.userPath(r.PathValue("file"))
	dst, ok2 := f.userPath(r.PathValue("dest"))
	if !ok1 || !ok2 {
		http.Error(w, "Invalid path", http.StatusForbidden)
		return
	}
	if _, err := os.Stat(src); err != nil {
		http.NotFound(w, r)
		return
	}
	if r.URL.Query().Get("overwrite") == "false" {
		if _, err := os.Stat(dst); err == nil {
			http.Error(w, "File already exists", http.StatusConflict)
			return
		}
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err == nil {
		err = os.Rename(src, dst)
		if err == nil {
			writeJSON(w, 200, r.PathValue("dest"))
			return
		}
	}
	http.Error(w, "move failed", http.StatusInternalServerError)
}

func writeFileAtomic(p string, b []byte) error {
	tmp := p + ".tmp-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// jobs answers ComfyUI's /api/jobs from the queue and the history:
// {"jobs": [{id, status, priority, create_time, …}], "pagination"}.
func (f *frontend) jobs(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	want := map[string]bool{}
	for _, s := range strings.Split(q.Get("status"), ",") {
		if s = strings.TrimSpace(s); s != "" {
			switch s {
			case "pending", "in_progress", "completed", "failed", "cancelled":
				want[s] = true
			default:
				writeJSON(w, 400, map[string]any{"error": fmt.Sprintf("Invalid status value(s): %s. Valid values: pending, in_progress, completed, failed, cancelled", s)})
				return
			}
		}
	}
	var jobs []map[string]any
	add := func(j map[string]any) {
		if len(want) == 0 || want[j["status"].(string)] {
			jobs = append(jobs, j)
		}
	}
	fq := f.s.q
	fq.mu.Lock()
	if fq.running != nil {
		add(queueJob(fq.running, "in_progress"))
	}
	for _, it := range fq.pending {
		add(queueJob(it, "pending"))
	}
	for _, id := range fq.order {
		add(historyJob(id, fq.history[id]))
	}
	fq.mu.Unlock()
	sort.SliceStable(jobs, func(i, j int) bool {
		ci, _ := jobs[i]["create_time"].(int64)
		cj, _ := jobs[j]["create_time"].(int64)
		if q.Get("sort_order") == "asc" {
			return ci < cj
		}
		return ci > cj
	})
	total := len(jobs)
	offset, _ := strconv.Atoi(q.Get("offset"))
	offset = min(max(offset, 0), total)
	jobs = jobs[offset:]
	limit := total
	if l, err := strconv.Atoi(q.Get("limit")); err == nil && l > 0 {
		limit = l
	}
	if len(jobs) > limit {
		jobs = jobs[:limit]
	}
	if jobs == nil {
		jobs = []map[string]any{}
	}
	var lim any
	if q.Get("limit") != "" {
		lim = limit
	}
	writeJSON(w, 200, map[string]any{"jobs": jobs, "pagination": map[string]any{"offset": offset, "limit": lim, "total": total, "has_more": offset+len(jobs) < total}})
}

func createTime(extra map[string]any) int64 {
	switch v := extra["create_time"].(type) {
	case int64:
		return v
	case float64:
		return int64(v)
	}
	return 0
}

func queueJob(it *item, status string) map[string]any {
	return map[string]any{"id": it.id, "status": status, "priority": it.list()[0], "create_time": createTime(it.extra), "outputs_count": 0}
}

func historyJob(id string, h *histEntry) map[string]any {
	extra, _ := h.Prompt[3].(map[string]any)
	j := map[string]any{"id": id, "priority": h.Prompt[0], "create_time": createTime(extra), "outputs_count": 0}
	status := "completed"
	for _, m := range h.Status.Messages {
		data, _ := m[1].(map[string]any)
		switch m[0] {
		case "execution_start":
			j["execution_start_time"] = data["timestamp"]
		case "execution_success", "execution_error", "execution_interrupted":
			j["execution_end_time"] = data["timestamp"]
			if m[0] == "execution_error" {
				status, j["execution_error"] = "failed", data
			} else if m[0] == "execution_interrupted" {
				status = "cancelled"
			}
		}
	}
	j["status"] = status
	n := 0
	ids := make([]string, 0, len(h.Outputs))
	for nid := range h.Outputs {
		ids = append(ids, nid)
	}
	sort.Slice(ids, func(a, b int) bool { return lessID(ids[a], ids[b]) })
	for _, nid := range ids {
		out, _ := h.Outputs[nid].(map[string]any)
		imgs, _ := out["images"].([]map[string]any)
		n += len(imgs)
		if len(imgs) > 0 && j["preview_output"] == nil {
			p := map[string]any{"nodeId": nid, "mediaType": "images"}
			for k, v := range imgs[0] {
				p[k] = v
			}
			j["preview_output"] = p
		}
	}
	j["outputs_count"] = n
	return j
}

// serveRootAssets serves the files the frontend names by absolute paths
// (/assets/images/…, /assets/favicon.ico) from its static/assets folder.
func (f *frontend) serveRootAssets(w http.ResponseWriter, r *http.Request) {
	p, ok := confined(filepath.Join(f.static, "assets"), "", strings.TrimPrefix(r.URL.Path, "/assets/"))
	if !ok {
		http.NotFound(w, r)
		return
	}
	if st, err := os.Stat(p); err != nil || st.IsDir() {
		http.NotFound(w, r)
		return
	}
	http.ServeFile(w, r, p)
}

// serveStatic serves the frontend's files under /comfy/, or a page that
// says how to install them.
func (f *frontend) serveStatic(w http.ResponseWriter, r *http.Request) {
	if f.static == "" {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.WriteHeader(http.StatusNotFound)
		fmt.Fprintf(w, `<!doctype html><title>ComfyUI frontend not installed</title>
<h1>ComfyUI's web frontend is not installed</h1>
<p>arenahost serves ComfyUI's own frontend here when it is installed. Install it with
<code>make comfy-frontend</code> (or <code>pip install %s</code>) and start
<code>arenahost serve --comfy-frontend DIR</code>, DIR being the package's <code>static</code> folder
(<code>python -c "import comfyui_frontend_package, os; print(os.path.join(os.path.dirname(comfyui_frontend_package.__file__), 'static'))"</code>).</p>
<p>The ComfyUI API clients need none of this: they use <code>/prompt</code>, <code>/ws</code> … at the root.</p>`, FrontendPackage)
		return
	}
	rel := strings.TrimPrefix(r.URL.Path, "/comfy")
	if rel == "/user.css" {
		w.Header().Set("Content-Type", "text/css")
		return
	}
	if rel == "" || rel == "/" {
		w.Header().Set("Cache-Control", "no-store, must-revalidate")
		http.ServeFile(w, r, filepath.Join(f.static, "index.html"))
		return
	}
	p, ok := confined(f.static, "", strings.TrimPrefix(rel, "/"))
	if !ok {
		http.NotFound(w, r)
		return
	}
	if st, err := os.Stat(p); err != nil || st.IsDir() {
		http.NotFound(w, r)
		return
	}
	http.ServeFile(w, r, p)
}
