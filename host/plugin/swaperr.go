package plugin

import (
	"errors"
	"regexp"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ErrSwapRefused: a swap (reload, or changed files) did not happen because
// the new version failed to start, check or warm up; the previous
// generation keeps serving. The HTTP API answers it with 422.
var ErrSwapRefused = errors.New("swap refused")

// SwapError is a refused swap. Its message opens with the plugin's own
// error (a Python exception's last line, a Go panic, the warm-up's
// refusal), then the step that failed and the stderr lines that explain
// it, and only then the host's own wording of the failure (go-plugin's
// handshake text, for instance).
type SwapError struct {
	Plugin string
	// Step is the start step that failed: manifest, handshake, connect,
	// health, describe, warmup …
	Step string
	// Reason is the plugin's own error, as it said it.
	Reason string
	// Stderr is the last lines the new version wrote to stderr.
	Stderr []string
	Err    error
}

func (e *SwapError) Error() string {
	var b strings.Builder
	b.WriteString(e.Reason)
	b.WriteString(" (plugin ")
	b.WriteString(e.Plugin)
	b.WriteString(": new version refused at ")
	b.WriteString(e.Step)
	b.WriteString("; the previous generation, if any, keeps serving)")
	if len(e.Stderr) > 0 {
		b.WriteString("; stderr: ")
		b.WriteString(strings.Join(e.Stderr, " | "))
	}
	if host := e.Err.Error(); host != e.Reason {
		b.WriteString("; host: ")
		b.WriteString(host)
	}
	return b.String()
}

func (e *SwapError) Unwrap() error { return e.Err }

// Is makes errors.Is(err, ErrSwapRefused) true.
func (e *SwapError) Is(target error) bool { return target == ErrSwapRefused }

// exceptionLine matches the line that states an error in a plugin's
// stderr: a Python exception ("SyntaxError: invalid syntax",
// "arenahost.server.PluginError: …"), a Go panic or fatal error.
var exceptionLine = regexp.MustCompile(`^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b|panic: |fatal error: )`)

// refused turns a failed start of a swap's new generation into a
// SwapError whose reason is what the plugin itself said.
func refused(plugin string, err error) *SwapError {
	se := &SwapError{Plugin: plugin, Step: "start", Err: err}
	var st *startError
	if errors.As(err, &st) {
		se.Step = st.Step
		if st.Stderr != "" {
			se.Stderr = strings.Split(st.Stderr, " | ")
		}
	}
	se.Reason = pluginReason(err, se.Stderr)
	return se
}

// pluginReason picks the plugin's own words: the message of a status the
// plugin answered with, else the exception line of its stderr (the last
// one), else the last stderr line, else err itself.
func pluginReason(err error, stderr []string) string {
	var gs interface{ GRPCStatus() *status.Status }
	if errors.As(err, &gs) {
		switch s := gs.GRPCStatus(); s.Code() {
		case codes.OK, codes.Unavailable, codes.Canceled, codes.DeadlineExceeded:
			// The connection broke or timed out: the plugin said nothing.
		default:
			if s.Message() != "" {
				return s.Message()
			}
		}
	}
	for i := len(stderr) - 1; i >= 0; i-- {
		if exceptionLine.MatchString(strings.TrimSpace(stderr[i])) {
			return strings.TrimSpace(stderr[i])
		}
	}
	for i := len(stderr) - 1; i >= 0; i-- {
		if l := strings.TrimSpace(stderr[i]); l != "" {
			return l
		}
	}
	return err.Error()
}
