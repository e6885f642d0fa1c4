package plugin

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// A refused swap's message opens with what the plugin said: the status it
// answered with, else its stderr's exception line, else its last line;
// go-plugin's generic handshake text comes last.
func TestRefusedOpensWithThePluginsError(t *testing.T) {
	generic := errors.New("Unrecognized remote plugin message: \nThis usually means\n  the plugin was not compiled for this architecture")
	for _, tc := range []struct {
		name     string
		err      error
		step     string
		wantHead string
	}{
		{"python syntax error", &startError{Plugin: "p", Generation: 2, Step: "handshake", Err: generic,
			Stderr: `  File "p.py", line 8 |     def broken(: |                ^ | SyntaxError: invalid syntax`},
			"handshake", "SyntaxError: invalid syntax"},
		{"go panic", &startError{Plugin: "p", Generation: 2, Step: "handshake", Err: generic,
			Stderr: "panic: no model | goroutine 1 [running]: | main.main()"},
			"handshake", "panic: no model"},
		{"warm-up refusal", &startError{Plugin: "p", Generation: 3, Step: "warmup",
			Err: fmt.Errorf("wrapped: %w", status.Error(codes.FailedPrecondition, "no weights in /nowhere")), Stderr: "serving on unix /tmp/x"},
			"warmup", "no weights in /nowhere"},
		{"connection lost says nothing", &startError{Plugin: "p", Generation: 3, Step: "health",
			Err: status.Error(codes.Unavailable, "connection refused"), Stderr: "out of memory, exiting"},
			"health", "out of memory, exiting"},
		{"no stderr", &startError{Plugin: "p", Generation: 3, Step: "resolve command", Err: errors.New("no such file ./plug")},
			"resolve command", "start plugin p generation 3: resolve command: no such file ./plug"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			se := refused("p", tc.err)
			if se.Step != tc.step || !strings.HasPrefix(se.Error(), tc.wantHead) {
				t.Fatalf("step %q, message %q; want step %q opening with %q", se.Step, se.Error(), tc.step, tc.wantHead)
			}
			if !errors.Is(se, ErrSwapRefused) || !errors.Is(se, tc.err) {
				t.Fatalf("%v: errors.Is(ErrSwapRefused) and the cause must hold", se)
			}
			// go-plugin's generic text, when there is any, comes only in the
			// host's part at the end, after the plugin's own words.
			if i := strings.Index(se.Error(), "This usually means"); i >= 0 && i < strings.Index(se.Error(), "; host: ") {
				t.Fatalf("generic go-plugin text before the host's part: %q", se.Error())
			}
		})
	}
}
