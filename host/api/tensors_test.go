package api

import (
	"encoding/json"
	"net/http"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	v1 "github.com/arenahost/arenahost/sdk/api"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// TestModelTensors: GET /v1/models/{name}/tensors answers the Host
// service's LookupTensors as JSON or binary protobuf, and names the bad
// query, model or tensor in a JSON error.
func TestModelTensors(t *testing.T) {
	f := newFixture(t, "", Options{})
	for _, tc := range []struct {
		name, path string
		status     int
		tensors    int // -1: every stored tensor of the sample (not its absmax side tensors)
		errCode    string
	}{
		{"every tensor", "/v1/models/sample/tensors", http.StatusOK, -1, ""},
		{"binary", "/v1/models/sample/tensors?format=proto&factors=1", http.StatusOK, -1, ""},
		{"by name", "/v1/models/sample/tensors?name=img_in.weight&name=img_in.bias", http.StatusOK, 2, ""},
		{"by prefix", "/v1/models/sample/tensors?prefix=double_blocks.0.img_attn.qkv.", http.StatusOK, 2, ""},
		{"unknown model", "/v1/models/nope/tensors", http.StatusNotFound, 0, "not_found"},
		{"unknown tensor", "/v1/models/sample/tensors?name=no.such.weight", http.StatusNotFound, 0, "not_found"},
		{"bad factors", "/v1/models/sample/tensors?factors=yes", http.StatusBadRequest, 0, "bad_request"},
		{"bad format", "/v1/models/sample/tensors?format=xml", http.StatusBadRequest, 0, "bad_request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, b, h := f.do(t, call{method: http.MethodGet, path: tc.path})
			if code != tc.status {
				t.Fatalf("status %d (%s), want %d", code, b, tc.status)
			}
			if tc.errCode != "" {
				var e v1.Error
				if err := json.Unmarshal(b, &e); err != nil || e.Code != tc.errCode || e.Detail == "" {
					t.Fatalf("error body %s, want code %s with a detail", b, tc.errCode)
				}
				return
			}
			resp := &pluginv1.LookupTensorsResponse{}
			var err error
			if h.Get("Content-Type") == contentProtobuf {
				err = proto.Unmarshal(b, resp)
			} else {
				err = protojson.Unmarshal(b, resp)
			}
			if err != nil {
				t.Fatalf("decode %s: %v", h.Get("Content-Type"), err)
			}
			want := tc.tensors
			if want == -1 {
				want = 100 // the sample: 42 NF4 weights (absmax inside their quant info) and 58 biases and norm scales
			}
			if len(resp.Tensors) != want {
				t.Fatalf("%d tensors, want %d", len(resp.Tensors), want)
			}
			for _, d := range resp.Tensors {
				if d.GetAccess() != pluginv1.Access_ACCESS_READ_ONLY || d.GetRegion().GetCpu().GetHostPid() == 0 {
					t.Errorf("%s: access %v region %v, want a read-only CPU region", d.GetName(), d.GetAccess(), d.GetRegion())
				}
			}
		})
	}
}
