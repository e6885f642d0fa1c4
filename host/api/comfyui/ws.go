package comfyui

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/coder/websocket"
)

// ComfyUI's binary event types (server.py BinaryEventTypes) and the image
// types of PREVIEW_IMAGE.
const (
	eventPreview             = 1
	eventPreviewWithMetadata = 4
	imageJPEG                = 1
	imagePNG                 = 2
)

// clientQueue bounds the messages waiting for one client; beyond it the
// client is too slow and loses previews first, then is disconnected.
const clientQueue = 512

// writeTimeout bounds one write to a client.
const writeTimeout = 30 * time.Second

type wsMsg struct {
	text []byte
	bin  []byte
}

// wsClient is one websocket connection.
type wsClient struct {
	sid string
	ch  chan wsMsg
	// asked: the client asked for binary previews (sent feature_flags,
	// as ComfyUI's frontend does, or connected with ?previews=1).
	mu       sync.Mutex
	flags    map[string]any
	asked    bool
	overflow bool
	closed   chan struct{}
}

func (c *wsClient) push(m wsMsg, droppable bool) {
	select {
	case c.ch <- m:
	default:
		if !droppable {
			c.mu.Lock()
			c.overflow = true
			c.mu.Unlock()
			select {
			case <-c.closed:
			default:
				close(c.closed)
			}
		}
	}
}

// wantsPreviews: binary previews go only to a client that asked for them
// (feature_flags or ?previews=1), or whose prompt asked with
// extra_data.preview_method (anything but "none"). A client that never
// asked gets none, as with ComfyUI, whose default is no previews.
func (c *wsClient) wantsPreviews(extra map[string]any) bool {
	if pm, ok := extra["preview_method"].(string); ok && pm != "" && pm != "none" {
		return true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.asked
}

// preview sends a frame: type 4 with metadata to a client that advertised
// supports_preview_metadata, type 1 otherwise.
func (c *wsClient) preview(format string, data []byte, promptID, node string) {
	c.mu.Lock()
	meta, _ := c.flags["supports_preview_metadata"].(bool)
	c.mu.Unlock()
	mime, it := "image/jpeg", uint32(imageJPEG)
	if format == "png" {
		mime, it = "image/png", imagePNG
	}
	var out []byte
	if meta {
		md, _ := json.Marshal(map[string]any{"node_id": node, "prompt_id": promptID, "display_node_id": node,
			"parent_node_id": nil, "real_node_id": node, "image_type": mime})
		out = make([]byte, 8, 8+len(md)+len(data))
		binary.BigEndian.PutUint32(out[0:], eventPreviewWithMetadata)
		binary.BigEndian.PutUint32(out[4:], uint32(len(md)))
		out = append(append(out, md...), data...)
	} else {
		out = make([]byte, 8, 8+len(data))
		binary.BigEndian.PutUint32(out[0:], eventPreview)
		binary.BigEndian.PutUint32(out[4:], it)
		out = append(out, data...)
	}
	c.push(wsMsg{bin: out}, true)
}

// hub tracks the connected clients by sid.
type hub struct {
	log     *slog.Logger
	mu      sync.Mutex
	clients map[string]*wsClient
}

func newHub(log *slog.Logger) *hub { return &hub{log: log, clients: map[string]*wsClient{}} }

func (h *hub) get(sid string) *wsClient {
	if sid == "" {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.clients[sid]
}

// send sends a JSON message to the client sid, or to every client when
// sid is "" (as ComfyUI's send_sync with no sid).
func (h *hub) send(sid, typ string, data any) {
	b, err := json.Marshal(map[string]any{"type": typ, "data": data})
	if err != nil {
		h.log.Error("comfyui: encode message", "type", typ, "err", err)
		return
	}
	h.mu.Lock()
	var to []*wsClient
	if sid == "" {
		for _, c := range h.clients {
			to = append(to, c)
		}
	} else if c := h.clients[sid]; c != nil {
		to = append(to, c)
	}
	h.mu.Unlock()
	for _, c := range to {
		c.push(wsMsg{text: b}, false)
	}
}

func newSID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// newUUID returns a random (version 4) UUID in canonical form.
func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func (s *Server) queueInfo() map[string]any {
	return map[string]any{"exec_info": map[string]any{"queue_remaining": s.q.remaining()}}
}

// statusChanged broadcasts the queue status, as ComfyUI's queue_updated.
func (s *Server) statusChanged() { s.hub.send("", "status", map[string]any{"status": s.queueInfo()}) }

// serveWS serves ComfyUI's websocket: a status message with the sid
// first; then status broadcasts, the execution messages of the client's
// prompts (and of prompts queued without a client_id), and previews when
// the client asked for them. A first message of type feature_flags stores
// the client's flags and is answered with the server's.
func (s *Server) serveWS(w http.ResponseWriter, r *http.Request) {
	sid := r.URL.Query().Get("clientId")
	if sid == "" {
		sid = newSID()
	}
	conn, err := websocket.Accept(w, r, nil)
	if err != nil {
		return // Accept has answered
	}
	defer conn.CloseNow()
	conn.SetReadLimit(1 << 20)
	c := &wsClient{sid: sid, ch: make(chan wsMsg, clientQueue), closed: make(chan struct{}), flags: map[string]any{},
		asked: r.URL.Query().Get("previews") == "1"}
	s.hub.mu.Lock()
	old := s.hub.clients[sid]
	s.hub.clients[sid] = c
	s.hub.mu.Unlock()
	if old != nil {
		old.push(wsMsg{}, false)
	}
	defer func() {
		s.hub.mu.Lock()
		if s.hub.clients[sid] == c {
			delete(s.hub.clients, sid)
		}
		s.hub.mu.Unlock()
	}()
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	s.hub.send(sid, "status", map[string]any{"status": s.queueInfo(), "sid": sid})
	s.q.mu.Lock()
	if s.q.running != nil && s.q.running.clientID == sid && s.q.runNode != "" {
		s.hub.send(sid, "executing", map[string]any{"node": s.q.runNode, "prompt_id": s.q.running.id})
	}
	s.q.mu.Unlock()
	go func() {
		defer cancel()
		first := true
		for {
			typ, b, err := conn.Read(ctx)
			if err != nil {
				return
			}
			var m struct {
				Type string         `json:"type"`
				Data map[string]any `json:"data"`
			}
			if first && typ == websocket.MessageText && json.Unmarshal(b, &m) == nil && m.Type == "feature_flags" {
				c.mu.Lock()
				if m.Data != nil {
					c.flags = m.Data
				}
				c.asked = true
				c.mu.Unlock()
				s.hub.send(sid, "feature_flags", serverFeatures(s.opts.MaxUpload))
			}
			first = false
		}
	}()
	for {
		select {
		case <-ctx.Done():
			conn.Close(websocket.StatusNormalClosure, "")
			return
		case <-c.closed:
			conn.Close(websocket.StatusPolicyViolation, "client too slow")
			return
		case m := <-c.ch:
			wctx, wcancel := context.WithTimeout(ctx, writeTimeout)
			var err error
			switch {
			case m.text != nil:
				err = conn.Write(wctx, websocket.MessageText, m.text)
			case m.bin != nil:
				err = conn.Write(wctx, websocket.MessageBinary, m.bin)
			default: // replaced by a newer connection with the same sid
				err = fmt.Errorf("replaced")
			}
			wcancel()
			if err != nil {
				return
			}
		}
	}
}
