package api

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"net/http"
	"time"

	"github.com/coder/websocket"

	"github.com/arenahost/arenahost/host/job"
)

// ComfyUI's binary event and image types (server.py BinaryEventTypes).
const (
	comfyPreviewImage = 1
	comfyImageJPEG    = 1
	comfyImagePNG     = 2
)

// wsMessage is a ComfyUI JSON message.
type wsMessage struct {
	Type string `json:"type"`
	Data any    `json:"data"`
}

// comfyFrame encodes a frame as ComfyUI's PREVIEW_IMAGE binary message:
// big-endian uint32 event type 1, big-endian uint32 image type (1 JPEG,
// 2 PNG), then the image bytes.
func comfyFrame(f *job.Frame) []byte {
	out := make([]byte, 8+len(f.Data))
	binary.BigEndian.PutUint32(out[0:], comfyPreviewImage)
	it := uint32(comfyImageJPEG)
	if f.Format == "png" {
		it = comfyImagePNG
	}
	binary.BigEndian.PutUint32(out[4:], it)
	copy(out[8:], f.Data)
	return out
}

// comfyMessages translates a job event into ComfyUI websocket messages.
func comfyMessages(e job.Event, queue int) []wsMessage {
	s := e.Job
	ms := time.Now().UnixMilli()
	switch e.Type {
	case job.EventProgress:
		return []wsMessage{{"progress", map[string]any{"value": s.Step, "max": s.Total, "prompt_id": s.ID, "node": s.Pipeline}}}
	case job.EventState:
		status := wsMessage{"status", map[string]any{"status": map[string]any{"exec_info": map[string]any{"queue_remaining": queue}}}}
		switch s.State {
		case job.StateRunning:
			return []wsMessage{status, {"execution_start", map[string]any{"prompt_id": s.ID, "timestamp": ms}},
				{"executing", map[string]any{"node": s.Pipeline, "display_node": s.Pipeline, "prompt_id": s.ID}}}
		case job.StateDone:
			return []wsMessage{{"executing", map[string]any{"node": nil, "prompt_id": s.ID}},
				{"execution_success", map[string]any{"prompt_id": s.ID, "timestamp": ms}}, status}
		case job.StateFailed:
			return []wsMessage{{"execution_error", map[string]any{"prompt_id": s.ID, "node_id": s.Pipeline, "node_type": s.Pipeline,
				"exception_message": s.Error, "exception_type": "PipelineError", "timestamp": ms}}, status}
		case job.StateCancelled:
			return []wsMessage{{"execution_interrupted", map[string]any{"prompt_id": s.ID, "node_id": s.Pipeline, "node_type": s.Pipeline, "timestamp": ms}}, status}
		}
		return []wsMessage{status}
	}
	return nil
}

// comfyWS serves ComfyUI's websocket protocol: JSON status, progress and
// execution messages, and binary PREVIEW_IMAGE frames, for jobs created
// with this clientId or with none. Each client has a bounded queue that
// drops its oldest events when it falls behind.
func (a *API) comfyWS(w http.ResponseWriter, r *http.Request) {
	clientID := r.URL.Query().Get("clientId")
	c, err := websocket.Accept(w, r, nil)
	if err != nil {
		return // Accept has answered
	}
	defer c.CloseNow()
	c.SetReadLimit(1 << 20)
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	sub := a.s.Jobs.Subscribe("", 0)
	defer func() { a.Metrics.PreviewFramesDropped(int(sub.Dropped())); sub.Close() }()

	write := func(typ websocket.MessageType, b []byte) bool {
		wctx, wcancel := context.WithTimeout(ctx, clientWriteTimeout)
		defer wcancel()
		return c.Write(wctx, typ, b) == nil
	}
	writeJSONMsg := func(m wsMessage) bool {
		b, _ := json.Marshal(m)
		return write(websocket.MessageText, b)
	}
	// Reading keeps control frames flowing; a feature_flags message gets
	// ours back (we send only PREVIEW_IMAGE, never the metadata variant).
	go func() {
		defer cancel()
		for {
			typ, b, err := c.Read(ctx)
			if err != nil {
				return
			}
			var m wsMessage
			if typ == websocket.MessageText && json.Unmarshal(b, &m) == nil && m.Type == "feature_flags" {
				writeJSONMsg(wsMessage{"feature_flags", map[string]any{"supports_preview_metadata": false}})
			}
		}
	}()
	queue := func() int {
		n := 0
		for _, j := range a.s.Jobs.List() {
			if !j.State().Final() {
				n++
			}
		}
		return n
	}
	if !writeJSONMsg(wsMessage{"status", map[string]any{"status": map[string]any{"exec_info": map[string]any{"queue_remaining": queue()}}, "sid": clientID}}) {
		return
	}
	for {
		select {
		case <-ctx.Done():
			c.Close(websocket.StatusNormalClosure, "")
			return
		case <-sub.C():
			for _, e := range sub.Next() {
				if e.Job.ClientID != "" && e.Job.ClientID != clientID {
					continue
				}
				if e.Type == job.EventFrame {
					if !write(websocket.MessageBinary, comfyFrame(e.Frame)) {
						return
					}
					continue
				}
				for _, m := range comfyMessages(e, queue()) {
					if !writeJSONMsg(m) {
						return
					}
				}
			}
		}
	}
}
