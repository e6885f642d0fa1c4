package previewwire

import (
	"strings"
	"testing"

	"github.com/vmihailenco/msgpack/v5"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

func TestChecks(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want string // "" = ok
	}{
		{"max_side 0", CheckMaxSide(0), ""},
		{"max_side limit", CheckMaxSide(MaxSideLimit), ""},
		{"max_side over", CheckMaxSide(MaxSideLimit + 1), "8193 out of range [0, 8192]"},
		{"max_side negative", CheckMaxSide(-1), "out of range"},
		{"quality 100", CheckQuality(100), ""},
		{"quality 101", CheckQuality(101), "101 out of range [0, 100]"},
		{"quality -1", CheckQuality(-1), "out of range"},
	} {
		if tc.want == "" && tc.err != nil || tc.want != "" && (tc.err == nil || !strings.Contains(tc.err.Error(), tc.want)) {
			t.Errorf("%s: %v, want %q", tc.name, tc.err, tc.want)
		}
	}
	for in, want := range map[string]string{"": FormatJPEG, "jpg": FormatJPEG, "jpeg": FormatJPEG, "png": FormatPNG, "gif": ""} {
		got, err := NormalizeFormat(in)
		if got != want || (want == "") != (err != nil) {
			t.Errorf("NormalizeFormat(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if !LatentDType(pluginv1.DType_DTYPE_BF16) || LatentDType(pluginv1.DType_DTYPE_U8) {
		t.Error("LatentDType")
	}
}

func TestLatentPayload(t *testing.T) {
	for _, tc := range []struct {
		p              LatentPayload
		family, layout string
	}{
		{LatentPayload{}, "", LayoutCHW},
		{LatentPayload{Arch: "flux1", Layout: "packed"}, "flux", LayoutTokens},
		{LatentPayload{Family: "sdxl", Arch: "flux1"}, "sdxl", LayoutCHW},
		{LatentPayload{Arch: "unknown", Layout: "bnf"}, "", LayoutTokens},
	} {
		if f, l := tc.p.RenderFamily(), tc.p.RenderLayout(); f != tc.family || l != tc.layout {
			t.Errorf("%+v: family %q layout %q, want %q %q", tc.p, f, l, tc.family, tc.layout)
		}
	}
}

// The msgpack field names are the contract: a host and a plugin built
// from different trees must still agree on them.
func TestWireNames(t *testing.T) {
	b, err := msgpack.Marshal(RenderArgs{Family: "flux", Layout: LayoutTokens, GridH: 2, GridW: 3, MaxSide: 64, Format: FormatPNG, Quality: 9, Filter: "bilinear", Method: MethodTAESD})
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := msgpack.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"method", "family", "layout", "grid_h", "grid_w", "max_side", "format", "quality", "filter"} {
		if _, ok := m[k]; !ok {
			t.Errorf("RenderArgs lacks msgpack key %q: %v", k, m)
		}
	}
	b, _ = msgpack.Marshal(map[string]any{"image": []byte{1}, "format": "png", "width": 4, "height": 5, "render_ms": 1.5, "encode_ms": 0.5, "family": "flux", "method": "factor"})
	var r RenderResult
	if err := msgpack.Unmarshal(b, &r); err != nil || r.Width != 4 || r.Height != 5 || r.Format != "png" || r.RenderMS != 1.5 || r.Method != "factor" {
		t.Fatalf("RenderResult %+v, %v", r, err)
	}
}
