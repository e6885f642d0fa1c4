package api

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"image/jpeg"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestComfyWebsocketClient plays a ComfyUI websocket client: JSON status
// and progress messages, binary PREVIEW_IMAGE frames, execution_success.
func TestComfyWebsocketClient(t *testing.T) {
	f := newFixture(t, jobPlugins(t), Options{})
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	url := "ws" + strings.TrimPrefix(f.srv.URL, "http") + "/ws?clientId=me"
	c, _, err := websocket.Dial(ctx, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	// Another client's job is not sent to us.
	other, err := f.s.Jobs.Get(f.createJob(t, `{"pipeline": "test-pipeline", "client_id": "someone-else", "params": {"steps": 3, "step_ms": 1}}`))
	if err != nil {
		t.Fatal(err)
	}
	<-other.Done()
	id := f.createJob(t, `{"pipeline": "test-pipeline", "client_id": "me", "params": {"steps": 20, "step_ms": 20}}`)
	var frames, progress int
	var types []string
	for {
		typ, b, err := c.Read(ctx)
		if err != nil {
			t.Fatalf("read after %v: %v", types, err)
		}
		if typ == websocket.MessageBinary {
			if len(b) < 8 {
				t.Fatalf("binary message of %d bytes", len(b))
			}
			if ev, it := binary.BigEndian.Uint32(b[0:4]), binary.BigEndian.Uint32(b[4:8]); ev != 1 || it != 1 {
				t.Fatalf("binary event %d image type %d, want 1 (PREVIEW_IMAGE) and 1 (JPEG)", ev, it)
			}
			img, err := jpeg.Decode(bytes.NewReader(b[8:]))
			if err != nil {
				t.Fatalf("preview frame: %v", err)
			}
			if bd := img.Bounds(); bd.Dx() != 128 || bd.Dy() != 128 {
				t.Fatalf("preview frame %v", bd)
			}
			frames++
			continue
		}
		var m struct {
			Type string         `json:"type"`
			Data map[string]any `json:"data"`
		}
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatalf("text message %q: %v", b, err)
		}
		types = append(types, m.Type)
		if pid, ok := m.Data["prompt_id"]; ok && pid != id {
			t.Fatalf("message %s for job %v, want only %s", m.Type, pid, id)
		}
		if m.Type == "progress" {
			progress++
			if m.Data["max"] != float64(20) || m.Data["value"].(float64) < 1 {
				t.Fatalf("progress %v", m.Data)
			}
		}
		if m.Type == "execution_success" {
			break
		}
	}
	if types[0] != "status" || frames == 0 || progress == 0 {
		t.Fatalf("messages %v, %d frames, %d progress", types, frames, progress)
	}
}
