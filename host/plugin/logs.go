package plugin

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/arenahost/arenahost/sdk/api"
)

// logRing keeps the last lines of a plugin's output, across generations.
type logRing struct {
	mu    sync.Mutex
	lines []api.LogLine
	next  int
	full  bool
}

func newLogRing(n int) *logRing { return &logRing{lines: make([]api.LogLine, n)} }

func (r *logRing) add(l api.LogLine) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.lines) == 0 {
		return
	}
	r.lines[r.next] = l
	r.next = (r.next + 1) % len(r.lines)
	if r.next == 0 {
		r.full = true
	}
}

// tail returns up to n of the newest lines, oldest first; gen > 0 keeps only
// that generation's lines.
func (r *logRing) tail(n int, gen uint64) []api.LogLine {
	r.mu.Lock()
	defer r.mu.Unlock()
	var all []api.LogLine
	if r.full {
		all = append(all, r.lines[r.next:]...)
	}
	all = append(all, r.lines[:r.next]...)
	var out []api.LogLine
	for i := len(all) - 1; i >= 0 && len(out) < n; i-- {
		if gen == 0 || all[i].Generation == gen {
			out = append(out, all[i])
		}
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

// lastText joins the last n non-debug lines of generation gen, for error
// reports.
func (r *logRing) lastText(n int, gen uint64) string {
	var lines []api.LogLine
	for _, l := range r.tail(4*n, gen) {
		if l.Level != "debug" {
			lines = append(lines, l)
		}
	}
	lines = lines[max(0, len(lines)-n):]
	if len(lines) == 0 {
		return ""
	}
	var b strings.Builder
	for i, l := range lines {
		if i > 0 {
			b.WriteString(" | ")
		}
		b.WriteString(l.Text)
	}
	return b.String()
}

// lineWriter splits a plugin's output into lines, re-logs each one under
// the plugin's name and generation, and keeps it in the ring. It is the
// io.Writer go-plugin copies stderr into.
type lineWriter struct {
	log  *slog.Logger
	ring *logRing
	gen  uint64

	mu  sync.Mutex
	buf []byte
}

// maxLine bounds one buffered line; longer output is flushed in pieces.
const maxLine = 64 << 10

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			if len(w.buf) >= maxLine {
				w.emit(string(w.buf))
				w.buf = w.buf[:0]
			}
			return len(p), nil
		}
		w.emit(string(bytes.TrimRight(w.buf[:i], "\r")))
		w.buf = w.buf[i+1:]
	}
}

func (w *lineWriter) emit(text string) {
	if strings.TrimSpace(text) == "" {
		return
	}
	level := stderrLevel(text)
	attrs := []any{"stream", "stderr"}
	if msg, lvl, kv, ok := parseHCLogJSON(text); ok {
		text, level = msg, lvl
		attrs = append(attrs, kv...)
	}
	w.ring.add(api.LogLine{Time: time.Now(), Generation: w.gen, Level: levelName(level), Text: text})
	w.log.Log(context.Background(), level, text, attrs...)
}

// parseHCLogJSON reads one hclog JSON line (what go-plugin's Serve writes):
// {"@level":"debug","@message":"…","@timestamp":"…", key: value…}.
func parseHCLogJSON(line string) (msg string, level slog.Level, kv []any, ok bool) {
	if !strings.HasPrefix(line, "{") {
		return "", 0, nil, false
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(line), &m); err != nil {
		return "", 0, nil, false
	}
	msg, ok = m["@message"].(string)
	if !ok {
		return "", 0, nil, false
	}
	lv, _ := m["@level"].(string)
	for k, v := range m {
		if !strings.HasPrefix(k, "@") {
			kv = append(kv, k, v)
		}
	}
	return msg, parseLevel(lv), kv, true
}

// stderrLevel guesses a level from the common prefixes (hclog's
// "[ERROR]", Python logging's "ERROR:", Go's "panic:").
func stderrLevel(s string) slog.Level {
	u := strings.ToUpper(s)
	switch {
	case strings.Contains(u, "[ERROR]"), strings.HasPrefix(u, "ERROR"), strings.HasPrefix(s, "panic:"),
		strings.HasPrefix(s, "fatal error:"), strings.HasPrefix(s, "Traceback"):
		return slog.LevelError
	case strings.Contains(u, "[WARN]"), strings.HasPrefix(u, "WARN"):
		return slog.LevelWarn
	case strings.Contains(u, "[DEBUG]"), strings.Contains(u, "[TRACE]"), strings.HasPrefix(u, "DEBUG"):
		return slog.LevelDebug
	}
	return slog.LevelInfo
}

func levelName(l slog.Level) string {
	switch {
	case l >= slog.LevelError:
		return "error"
	case l >= slog.LevelWarn:
		return "warn"
	case l >= slog.LevelInfo:
		return "info"
	}
	return "debug"
}

func parseLevel(s string) slog.Level {
	switch strings.ToLower(s) {
	case "debug", "trace":
		return slog.LevelDebug
	case "warn", "warning":
		return slog.LevelWarn
	case "error":
		return slog.LevelError
	}
	return slog.LevelInfo
}
