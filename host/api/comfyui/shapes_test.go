package comfyui

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// idKeyed are the fields whose keys are ids or names (prompt ids, node
// ids, node classes), recorded as {"map": shape} (as the capture script).
var idKeyed = map[string]bool{"history": true, "history/{id}": true, "outputs": true, "meta": true, "node_errors": true, "object_info": true, "nodes": true}

// opaque objects hold the caller's data (a node's inputs): {"map": null}.
var opaque = map[string]bool{"inputs": true}

// shapeOf is scripts/capture-comfy-shapes.py's shape() in Go.
func shapeOf(v any, keyIsID bool) any { return shapeIn(v, keyIsID, "") }

func shapeIn(v any, keyIsID bool, parent string) any {
	switch x := v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case float64:
		return "number"
	case string:
		return "string"
	case []any:
		if len(x) == 0 {
			return map[string]any{"array": nil}
		}
		shapes := make([]any, len(x))
		same := true
		for i, e := range x {
			// An entry [number, prompt_id, graph, extra_data, outputs]: the graph is id-keyed.
			shapes[i] = shapeIn(e, parent == "prompt" && i == 2, "")
			same = same && fmt.Sprint(shapes[i]) == fmt.Sprint(shapes[0])
		}
		if same {
			return map[string]any{"array": shapes[0]}
		}
		return map[string]any{"tuple": shapes}
	case map[string]any:
		if keyIsID {
			for _, e := range x {
				return map[string]any{"map": shapeOf(e, false)}
			}
			return map[string]any{"map": nil}
		}
		out := map[string]any{}
		for k, e := range x {
			if _, isObj := e.(map[string]any); isObj && opaque[k] {
				out[k] = map[string]any{"map": nil}
				continue
			}
			out[k] = shapeIn(e, idKeyed[k], k)
		}
		return map[string]any{"object": out}
	}
	panic(fmt.Sprintf("shape of %T", v))
}

// compare reports where got lacks a field of want or has another type.
// A reference null matches anything (ComfyUI sends null where a value is
// optional); an empty reference array or map matches any; fields arenahost
// adds are allowed.
func compare(path string, want, got any) []string {
	if want == "null" || want == nil {
		return nil
	}
	ws, wIsStr := want.(string)
	if wIsStr {
		if gs, ok := got.(string); !ok || gs != ws {
			return []string{fmt.Sprintf("%s: %v, ComfyUI has %s", path, got, ws)}
		}
		return nil
	}
	wm := want.(map[string]any)
	gm, ok := got.(map[string]any)
	if !ok {
		return []string{fmt.Sprintf("%s: %v, ComfyUI has %v", path, got, kind(want))}
	}
	var out []string
	switch {
	case wm["object"] != nil:
		wo := wm["object"].(map[string]any)
		gobj, ok := gm["object"].(map[string]any)
		if !ok {
			return []string{fmt.Sprintf("%s: %s, ComfyUI has an object", path, kind(got))}
		}
		keys := make([]string, 0, len(wo))
		for k := range wo {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			g, present := gobj[k]
			if !present {
				out = append(out, fmt.Sprintf("%s.%s: missing", path, k))
				continue
			}
			out = append(out, compare(path+"."+k, wo[k], g)...)
		}
	case hasKey(wm, "map"):
		if !hasKey(gm, "map") {
			return []string{fmt.Sprintf("%s: %s, ComfyUI has a map keyed by id", path, kind(got))}
		}
		if gm["map"] != nil {
			out = append(out, compare(path+"[*]", wm["map"], gm["map"])...)
		}
	case hasKey(wm, "array"):
		switch {
		case hasKey(gm, "array"):
			if gm["array"] != nil {
				out = append(out, compare(path+"[]", wm["array"], gm["array"])...)
			}
		case hasKey(gm, "tuple"):
			for i, g := range gm["tuple"].([]any) {
				out = append(out, compare(fmt.Sprintf("%s[%d]", path, i), wm["array"], g)...)
			}
		default:
			out = append(out, fmt.Sprintf("%s: %s, ComfyUI has an array", path, kind(got)))
		}
	case hasKey(wm, "tuple"):
		if hasKey(gm, "array") && gm["array"] == nil {
			return nil // an empty list is a value of any list type
		}
		wt := wm["tuple"].([]any)
		gt, ok := gm["tuple"].([]any)
		if !ok {
			if a, isArr := gm["array"]; isArr {
				gt = make([]any, len(wt))
				for i := range gt {
					gt[i] = a
				}
			} else {
				return []string{fmt.Sprintf("%s: %s, ComfyUI has a list of %d", path, kind(got), len(wt))}
			}
		}
		if len(gt) != len(wt) {
			out = append(out, fmt.Sprintf("%s: a list of %d, ComfyUI has %d", path, len(gt), len(wt)))
		}
		for i := range min(len(gt), len(wt)) {
			out = append(out, compare(fmt.Sprintf("%s[%d]", path, i), wt[i], gt[i])...)
		}
	}
	return out
}

func hasKey(m map[string]any, k string) bool { _, ok := m[k]; return ok }

func kind(s any) string {
	if m, ok := s.(map[string]any); ok {
		for k := range m {
			return k
		}
	}
	return fmt.Sprint(s)
}

type reference struct {
	Status int `json:"status"`
	Shape  any `json:"shape"`
}

// TestShapesMatchComfyUI compares arenahost's answers with the shapes
// scripts/capture-comfy-shapes.py recorded from ComfyUI 0.30's server, field
// by field (names and JSON types, not values).
func TestShapesMatchComfyUI(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("testdata", "comfy-shapes.json"))
	if err != nil {
		t.Fatal(err)
	}
	var ref map[string]json.RawMessage
	if err := json.Unmarshal(raw, &ref); err != nil {
		t.Fatal(err)
	}
	_, srv := newTestServer(t, &fakeCore{})
	got := map[string]reference{}
	do := func(name, method, path string, body any, keyIsID bool, pick func(any) any) {
		var rd io.Reader
		if body != nil {
			b, _ := json.Marshal(body)
			rd = bytes.NewReader(b)
		}
		req, _ := http.NewRequest(method, srv.URL+path, rd)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var v any
		if len(bytes.TrimSpace(b)) > 0 {
			if err := json.Unmarshal(b, &v); err != nil {
				t.Fatalf("%s: %v: %s", name, err, b)
			}
		}
		if pick != nil {
			v = pick(v)
		}
		got[name] = reference{Status: resp.StatusCode, Shape: shapeOf(v, keyIsID)}
	}
	for _, n := range []string{"system_stats", "prompt", "queue", "embeddings", "extensions", "features"} {
		do("GET /"+n, "GET", "/"+n, nil, false, nil)
	}
	do("GET /object_info/KSampler", "GET", "/object_info/KSampler", nil, false, func(v any) any { return v.(map[string]any)["KSampler"] })
	do("GET /object_info/NoSuchNode", "GET", "/object_info/NoSuchNode", nil, false, nil)
	do("POST /prompt missing_node_type", "POST", "/prompt", map[string]any{"prompt": graph(map[string]any{"9": map[string]any{"class_type": "NoSuchNode", "inputs": map[string]any{}}})}, false, nil)
	do("POST /prompt no_prompt", "POST", "/prompt", map[string]any{"client_id": "x"}, false, nil)
	do("POST /prompt prompt_outputs_failed_validation", "POST", "/prompt", map[string]any{"prompt": graph(map[string]any{
		"3": map[string]any{"class_type": "EmptyLatentImage", "inputs": map[string]any{"width": -5, "height": 32, "batch_size": 1}}})}, false, nil)

	sid := "shapes-client"
	ws := dial(t, srv, "clientId="+sid, map[string]any{"supports_preview_metadata": true})
	ws.until(t, "feature_flags")
	var ticket map[string]any
	do("POST /prompt", "POST", "/prompt", map[string]any{"prompt": graph(nil), "client_id": sid}, false, nil)
	_, ticket = post(t, srv.URL+"/prompt", map[string]any{"prompt": graph(nil), "client_id": sid})
	pid := ticket["prompt_id"].(string)
	for {
		m := ws.until(t, "executing")
		if d := m["data"].(map[string]any); d["node"] == nil && d["prompt_id"] == pid {
			break
		}
	}
	seen := map[string]bool{}
	for _, m := range ws.text {
		typ := m["type"].(string)
		if !seen[typ] {
			seen[typ] = true
			got["ws "+typ] = reference{Status: 0, Shape: shapeOf(any(m), false)}
		}
	}
	do("GET /history/{id}", "GET", "/history/"+pid, nil, true, nil)
	do("GET /history?max_items=1", "GET", "/history?max_items=1", nil, true, nil)

	var b bytes.Buffer
	mw := multipart.NewWriter(&b)
	fw, _ := mw.CreateFormFile("image", "up.png")
	fw.Write([]byte("png"))
	mw.Close()
	resp, err := http.Post(srv.URL+"/upload/image", mw.FormDataContentType(), &b)
	if err != nil {
		t.Fatal(err)
	}
	var up any
	json.NewDecoder(resp.Body).Decode(&up)
	resp.Body.Close()
	got["POST /upload/image"] = reference{Status: resp.StatusCode, Shape: shapeOf(up, false)}

	// Message types ComfyUI sends that arenahost does not (docs/api.md).
	notSent := map[string]bool{}
	names := make([]string, 0, len(ref))
	for k := range ref {
		names = append(names, k)
	}
	sort.Strings(names)
	checked := 0
	for _, name := range names {
		if strings.HasPrefix(name, "_") || notSent[name] {
			continue
		}
		var want reference
		if err := json.Unmarshal(ref[name], &want); err != nil {
			t.Fatal(err)
		}
		if s, ok := want.Shape.(string); ok && (s == "bytes" || s == "empty") {
			continue // status-only routes, covered by the other tests
		}
		g, ok := got[name]
		if !ok {
			t.Errorf("%s: arenahost sent nothing to compare", name)
			continue
		}
		checked++
		if g.Status != want.Status {
			t.Errorf("%s: status %d, ComfyUI %d", name, g.Status, want.Status)
		}
		for _, d := range compare(name, want.Shape, g.Shape) {
			t.Error(d)
		}
	}
	if checked < 15 {
		t.Fatalf("compared only %d answers: is the fixture stale?", checked)
	}
}
