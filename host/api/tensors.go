package api

import (
	"net/http"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// Content types of GET /v1/models/{name}/tensors.
const (
	contentProtobuf = "application/x-protobuf"
)

// tensorRoutes serves arena tensor descriptors to processes outside the
// host's plugins (a ComfyUI node pack built on the Python SDK): the same
// read-only descriptors and bound LoRA side factors the Host service's
// LookupTensors gives a plugin, so such a process maps the weights zero-copy.
func (a *API) tensorRoutes() {
	a.mux.HandleFunc("GET /v1/models/{name}/tensors", a.modelTensors)
}

// modelTensors answers a LookupTensorsResponse for ?name=N (repeatable),
// ?prefix=P (every tensor when neither is given) and ?factors=1 (bound side
// factors too), as protobuf JSON or, with ?format=proto, binary protobuf.
func (a *API) modelTensors(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	factors, format := q.Get("factors"), q.Get("format")
	if factors != "" && factors != "0" && factors != "1" {
		a.fail(w, r, badRequest("query factors=%q: want 0 or 1", factors))
		return
	}
	if format != "" && format != "json" && format != "proto" {
		a.fail(w, r, badRequest("query format=%q: want json or proto", format))
		return
	}
	req := &pluginv1.LookupTensorsRequest{Model: r.PathValue("name"), Names: q["name"], Prefix: q.Get("prefix"), IncludeFactors: factors == "1"}
	resp, err := a.s.LookupTensors(r.Context(), req)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	var b []byte
	if format == "proto" {
		b, err = proto.Marshal(resp)
		w.Header().Set("Content-Type", contentProtobuf)
	} else {
		b, err = protojson.MarshalOptions{UseProtoNames: true}.Marshal(resp)
		w.Header().Set("Content-Type", "application/json")
	}
	if err != nil {
		a.fail(w, r, err)
		return
	}
	_, _ = w.Write(b)
}
