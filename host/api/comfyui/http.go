package comfyui

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
)

var uuidRe = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// postPrompt validates an API-format graph and queues it, answering
// {prompt_id, number, node_errors} or 400 {error, node_errors}.
func (s *Server) postPrompt(w http.ResponseWriter, r *http.Request) {
	var body map[string]json.RawMessage
	b, err := io.ReadAll(r.Body)
	if err == nil {
		err = objectBody(b)
	}
	if err == nil {
		err = json.Unmarshal(b, &body)
	}
	if err != nil {
		badRequest(w, "invalid_prompt", "Invalid prompt", fmt.Sprintf("read request body: %v (send a JSON object {\"prompt\": {…}})", err))
		return
	}
	rawPrompt, ok := body["prompt"]
	if !ok {
		badRequest(w, "no_prompt", "No prompt provided", "No prompt provided")
		return
	}
	var raw map[string]any
	if err := json.Unmarshal(rawPrompt, &raw); err != nil || raw == nil {
		badRequest(w, "invalid_prompt", "Invalid prompt", "prompt: want an object of nodes keyed by id (API format: Save (API Format) in ComfyUI)")
		return
	}
	graph := make(map[string]graphNode, len(raw))
	for id, v := range raw {
		b, _ := json.Marshal(v)
		var n graphNode
		if err := json.Unmarshal(b, &n); err != nil {
			badRequest(w, "invalid_prompt", "Invalid prompt", fmt.Sprintf("node %q: %v", id, err))
			return
		}
		if n.Inputs == nil {
			n.Inputs = map[string]any{}
		}
		graph[id] = n
	}
	promptID := newUUID()
	if v, ok := body["prompt_id"]; ok && string(v) != "null" {
		var id string
		if json.Unmarshal(v, &id) != nil || !uuidRe.MatchString(id) {
			writeJSON(w, http.StatusBadRequest, map[string]any{"error": apiError{Type: "invalid_prompt_id", Message: "prompt_id must be a valid UUID",
				Details: "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let the server generate one", ExtraInfo: map[string]any{}},
				"node_errors": map[string]any{}})
			return
		}
		promptID = id
	}
	extra := map[string]any{}
	if v, ok := body["extra_data"]; ok {
		if err := json.Unmarshal(v, &extra); err != nil || extra == nil {
			badRequest(w, "invalid_prompt", "Invalid prompt", "extra_data: want an object")
			return
		}
	}
	clientID := ""
	if v, ok := body["client_id"]; ok {
		_ = json.Unmarshal(v, &clientID)
		extra["client_id"] = clientID
	}
	var number float64
	if v, ok := body["number"]; ok {
		if err := json.Unmarshal(v, &number); err != nil {
			badRequest(w, "invalid_prompt", "Invalid prompt", "number: want a number")
			return
		}
	} else {
		var front bool
		if v, ok := body["front"]; ok {
			_ = json.Unmarshal(v, &front)
		}
		number = s.q.nextNumber(front)
	}
	v := s.validate(graph)
	if v.nodeErrors == nil {
		v.nodeErrors = map[string]any{}
	}
	if v.err != nil {
		s.log.Warn("comfyui: invalid prompt", "type", v.err.Type, "message", v.err.Message, "details", v.err.Details)
		writeJSON(w, http.StatusBadRequest, map[string]any{"error": v.err, "node_errors": v.nodeErrors})
		return
	}
	extra["create_time"] = nowMillis()
	s.q.put(&item{number: number, id: promptID, raw: raw, graph: graph, extra: extra, outputs: v.outputs, clientID: clientID})
	writeJSON(w, http.StatusOK, map[string]any{"prompt_id": promptID, "number": jsonNumber(number), "node_errors": v.nodeErrors})
}

func (s *Server) getPrompt(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, s.queueInfo())
}

func (s *Server) getQueue(w http.ResponseWriter, _ *http.Request) {
	running, pending := s.q.snapshot()
	writeJSON(w, http.StatusOK, map[string]any{"queue_running": running, "queue_pending": pending})
}

// readArgs reads a JSON body, or a form body as some clients send (e.g.
// comfy-catapult posts /queue and /free as form fields): repeated
// "delete" fields make a list.
func readArgs(r *http.Request) (map[string]any, error) {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		return nil, fmt.Errorf("read request body: %w", err)
	}
	out := map[string]any{}
	if len(bytes.TrimSpace(b)) == 0 {
		return out, nil
	}
	ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if ct == "application/x-www-form-urlencoded" {
		vals, err := url.ParseQuery(string(b))
		if err != nil {
			return nil, fmt.Errorf("read form body: %w", err)
		}
		for k, vs := range vals {
			switch k {
			case "delete":
				l := []any{}
				for _, v := range vs {
					l = append(l, v)
				}
				out[k] = l
			default:
				out[k] = vs[len(vs)-1] == "true" || vs[len(vs)-1] == "True" || vs[len(vs)-1] == "1"
			}
		}
		return out, nil
	}
	if err := objectBody(b); err != nil {
		return nil, fmt.Errorf("read request body: %w", err)
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, fmt.Errorf("read request body: %w (send a JSON object)", err)
	}
	return out, nil
}

// objectBody refuses a body that is not a JSON object by its first
// non-blank byte (null, an array, a number…: never read as "no
// arguments"); the decoder checks the rest.
func objectBody(b []byte) error {
	t := bytes.TrimLeft(b, " \t\r\n")
	if len(t) == 0 {
		return errors.New("empty body, want a JSON object")
	}
	if t[0] != '{' {
		return fmt.Errorf("want a JSON object, got %q…", t[:min(len(t), 16)])
	}
	return nil
}

func idList(v any) ([]string, error) {
	if v == nil {
		return nil, nil
	}
	l, ok := v.([]any)
	if !ok {
		return nil, errors.New("delete: want a list of prompt ids")
	}
	out := make([]string, 0, len(l))
	for _, x := range l {
		s, ok := x.(string)
		if !ok {
			return nil, errors.New("delete: want a list of prompt ids")
		}
		out = append(out, s)
	}
	return out, nil
}

// deleteArgs reads the {"delete": [ids], "clear": bool} body that POST
// /queue and POST /history share; on a bad body it answers 400 and ok is
// false.
func deleteArgs(w http.ResponseWriter, r *http.Request) (ids []string, clear, ok bool) {
	args, err := readArgs(r)
	if err == nil {
		ids, err = idList(args["delete"])
	}
	if err != nil {
		badRequest(w, "invalid_request", "Invalid request", err.Error())
		return nil, false, false
	}
	clear, _ = args["clear"].(bool)
	return ids, clear, true
}

// postQueue deletes pending prompts ({"delete": [ids]}) or all of them
// ({"clear": true}).
func (s *Server) postQueue(w http.ResponseWriter, r *http.Request) {
	ids, clear, ok := deleteArgs(w, r)
	if !ok {
		return
	}
	if clear || len(ids) > 0 {
		s.q.deletePending(ids, clear)
	}
	w.WriteHeader(http.StatusOK)
}

func (s *Server) getHistory(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	maxItems, offset := -1, -1
	for name, dst := range map[string]*int{"max_items": &maxItems, "offset": &offset} {
		if v := q.Get(name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				badRequest(w, "invalid_request", "Invalid request", fmt.Sprintf("%s=%q: want a count", name, v))
				return
			}
			*dst = n
		}
	}
	writeJSON(w, http.StatusOK, s.q.historyOf("", maxItems, offset))
}

func (s *Server) getHistoryID(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.q.historyOf(r.PathValue("id"), -1, -1))
}

func (s *Server) postHistory(w http.ResponseWriter, r *http.Request) {
	ids, clear, ok := deleteArgs(w, r)
	if !ok {
		return
	}
	s.q.deleteHistory(ids, clear)
	w.WriteHeader(http.StatusOK)
}

// postInterrupt stops the running prompt ({"prompt_id": id} only that one).
func (s *Server) postInterrupt(w http.ResponseWriter, r *http.Request) {
	args, err := readArgs(r)
	if err != nil {
		args = map[string]any{} // ComfyUI ignores a body it cannot read here
	}
	id, _ := args["prompt_id"].(string)
	s.q.interrupt(id)
	w.WriteHeader(http.StatusOK)
}

// postFree: unload_models removes the applied LoRAs (their side factors
// or fused bytes); the checkpoints stay in the arena, which other
// processes may map.
func (s *Server) postFree(w http.ResponseWriter, r *http.Request) {
	args, err := readArgs(r)
	if err != nil {
		badRequest(w, "invalid_request", "Invalid request", err.Error())
		return
	}
	if unload, _ := args["unload_models"].(bool); unload {
		if err := s.core.Free(r.Context()); err != nil {
			s.log.Warn("comfyui: free", "err", err)
			writeJSON(w, http.StatusInternalServerError, map[string]any{"error": err.Error()})
			return
		}
	}
	w.WriteHeader(http.StatusOK)
}

// folder returns the directory of a ComfyUI folder type.
func (s *Server) folder(typ string) (string, bool) {
	switch typ {
	case "", "output":
		return filepath.Join(s.opts.Dir, "output"), true
	case "input", "temp":
		return filepath.Join(s.opts.Dir, typ), true
	}
	return "", false
}

// confined joins subfolder and name under dir, refusing anything that
// leaves it.
func confined(dir, subfolder, name string) (string, bool) {
	if name == "" || strings.ContainsRune(name, 0) || strings.ContainsRune(subfolder, 0) {
		return "", false
	}
	p := filepath.Join(dir, filepath.FromSlash(subfolder), filepath.FromSlash(name))
	rel, err := filepath.Rel(dir, p)
	if err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) || filepath.IsAbs(rel) {
		return "", false
	}
	return p, true
}

// view serves a file of the output, input or temp folder.
func (s *Server) view(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	dir, ok := s.folder(q.Get("type"))
	if !ok {
		http.Error(w, "type: want output, input or temp", http.StatusBadRequest)
		return
	}
	p, ok := confined(dir, q.Get("subfolder"), q.Get("filename"))
	if !ok {
		http.Error(w, "filename/subfolder: want a file inside the folder", http.StatusBadRequest)
		return
	}
	f, err := os.Open(p)
	if err != nil {
		http.NotFound(w, r)
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		http.NotFound(w, r)
		return
	}
	if ct := mime.TypeByExtension(filepath.Ext(p)); ct != "" {
		w.Header().Set("Content-Type", ct)
	}
	w.Header().Set("Content-Disposition", fmt.Sprintf("filename=%q", filepath.Base(p)))
	http.ServeContent(w, r, filepath.Base(p), st.ModTime(), f)
}

// uploadImage stores a multipart "image" file in the input (or the
// "type") folder, renaming it "name (1).ext" when a different file of that
// name exists, and answers {name, subfolder, type}.
func (s *Server) uploadImage(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseMultipartForm(32 << 20); err != nil {
		http.Error(w, "read multipart form: "+err.Error(), http.StatusBadRequest)
		return
	}
	f, hdr, err := r.FormFile("image")
	if err != nil {
		http.Error(w, "image: a file field is required", http.StatusBadRequest)
		return
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, s.opts.MaxUpload+1))
	if err != nil || int64(len(data)) > s.opts.MaxUpload {
		http.Error(w, "image: too large or unreadable", http.StatusBadRequest)
		return
	}
	typ := r.FormValue("type")
	if typ == "" {
		typ = "input"
	}
	dir, ok := s.folder(typ)
	if !ok {
		http.Error(w, "type: want input, temp or output", http.StatusBadRequest)
		return
	}
	sub := r.FormValue("subfolder")
	name := filepath.Base(hdr.Filename)
	p, ok := confined(dir, sub, name)
	if !ok || name == "." || name == "/" {
		http.Error(w, "filename/subfolder: want a file inside the folder", http.StatusBadRequest)
		return
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		http.Error(w, "create folder: "+err.Error(), http.StatusInternalServerError)
		return
	}
	if ow := r.FormValue("overwrite"); ow != "true" && ow != "1" {
		ext := filepath.Ext(name)
		stem := strings.TrimSuffix(name, ext)
		for i := 1; ; i++ {
			old, err := os.ReadFile(p)
			if err != nil || bytes.Equal(old, data) {
				break // free, or the same file already there
			}
			name = fmt.Sprintf("%s (%d)%s", stem, i, ext)
			p = filepath.Join(filepath.Dir(p), name)
		}
	}
	if err := os.WriteFile(p, data, 0o644); err != nil {
		http.Error(w, "write: "+err.Error(), http.StatusInternalServerError)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"name": name, "subfolder": sub, "type": typ})
}

func (s *Server) systemStats(w http.ResponseWriter, _ *http.Request) {
	st := s.core.Stats()
	argv := st.Argv
	if argv == nil {
		argv = []string{}
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"system": map[string]any{
			"os": runtime.GOOS, "ram_total": st.RAMTotal, "ram_free": st.RAMFree, "comfyui_version": Version,
			"required_frontend_version": "", "installed_templates_version": nil, "required_templates_version": "",
			"comfy_package_versions": []any{}, "python_version": "arenahost (Go " + runtime.Version() + ")",
			"pytorch_version": "", "embedded_python": false, "deploy_environment": "arenahost", "argv": argv,
		},
		"devices": []any{map[string]any{
			"name": st.Device, "type": st.DeviceType, "index": st.DeviceIndex,
			"vram_total": st.DeviceTotal, "vram_free": st.DeviceFree, "torch_vram_total": st.DeviceTotal, "torch_vram_free": st.DeviceFree,
		}},
	})
}

func (s *Server) objectInfo(w http.ResponseWriter, _ *http.Request) {
	names := make([]string, 0, len(nodes))
	for n := range nodes {
		names = append(names, n)
	}
	sort.Strings(names)
	out := make(map[string]any, len(names))
	l := s.lists()
	for _, n := range names {
		out[n] = nodes[n].info(l)
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) objectInfoNode(w http.ResponseWriter, r *http.Request) {
	out := map[string]any{}
	if n := nodes[r.PathValue("node")]; n != nil {
		out[n.name] = n.info(s.lists())
	}
	writeJSON(w, http.StatusOK, out)
}
