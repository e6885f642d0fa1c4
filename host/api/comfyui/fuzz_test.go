package comfyui

import (
	"bytes"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// FuzzPostPrompt covers POST /prompt's decoder and validation: whatever the
// body, the answer is 200 (queued) or 400, never a panic or a 500, and only
// a JSON object is ever queued.
func FuzzPostPrompt(f *testing.F) {
	f.Add([]byte(`{"prompt": {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "model.safetensors"}}}, "client_id": "c"}`))
	f.Add([]byte(`{"prompt": {"1": {"class_type": "KSampler", "inputs": {"model": ["9", 0]}}}}`))
	f.Add([]byte(`{"prompt": null, "prompt_id": "not-a-uuid"}`))
	f.Add([]byte(`{"prompt": {}, "extra_data": [], "number": "x"}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`[{"prompt": {}}]`))
	s, err := New(&fakeCore{}, Options{Dir: f.TempDir(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(s.Close)
	f.Fuzz(func(t *testing.T, data []byte) {
		w := httptest.NewRecorder()
		s.postPrompt(w, httptest.NewRequest(http.MethodPost, "/prompt", bytes.NewReader(data)))
		switch w.Code {
		case http.StatusOK:
			if !strings.HasPrefix(strings.TrimLeft(string(data), " \t\r\n"), "{") {
				t.Fatalf("POST /prompt %q: queued a body that is not an object", data)
			}
		case http.StatusBadRequest:
		default:
			t.Fatalf("POST /prompt %q: %d %s, want 200 or 400", data, w.Code, w.Body)
		}
	})
}
