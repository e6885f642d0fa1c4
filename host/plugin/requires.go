package plugin

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/arenahost/arenahost/shared/manifest"
)

// ErrUnavailable: the plugin's manifest declares needs ("requires") that
// this machine does not meet, so it was not started.
var ErrUnavailable = errors.New("plugin unavailable")

// findSpecScript prints, space-separated on one line, the modules among
// its arguments that the interpreter cannot find. It imports nothing but
// importlib (find_spec of a dotted name imports its parents only).
const findSpecScript = `import importlib.util, sys
missing = []
for m in sys.argv[1:]:
    try:
        if importlib.util.find_spec(m) is None:
            missing.append(m)
    except Exception:
        missing.append(m)
print("missing:" + " ".join(missing))
`

// unmetError is a plugin whose requirements do not hold: Reason says what
// is missing and how to fix it.
type unmetError struct {
	Plugin string
	Reason string
}

func (e *unmetError) Error() string { return fmt.Sprintf("plugin %s: %s", e.Plugin, e.Reason) }
func (e *unmetError) Unwrap() error { return ErrUnavailable }

// checkRequires checks man's "requires" with the interpreter its command
// resolves to, bounded by timeout. It returns nil when the needs are met
// (or none are declared), an *unmetError (errors.Is ErrUnavailable) when
// they are not, and another error when the command cannot be resolved.
func (m *Manager) checkRequires(ctx context.Context, man *manifest.Manifest) error {
	if man.Requires == nil || len(man.Requires.PythonModules) == 0 {
		return nil
	}
	r, err := resolveManifest(man, m.lookupEnv)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, m.cfg.StartTimeout)
	defer cancel()
	args := append([]string{"-c", findSpecScript}, man.Requires.PythonModules...)
	cmd := exec.CommandContext(ctx, r.command, args...)
	cmd.Dir = man.Dir()
	cmd.Env = m.childEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	t0 := time.Now()
	err = cmd.Run()
	unmet := func(format string, a ...any) error {
		reason := fmt.Sprintf(format, a...) + fmt.Sprintf(" (requires.python_modules in %s)", man.Path)
		return &unmetError{Plugin: man.Name, Reason: reason}
	}
	switch {
	case ctx.Err() == context.DeadlineExceeded:
		return unmet("checking its Python modules with %s timed out after %s", r.command, time.Since(t0).Round(time.Millisecond))
	case err != nil:
		msg := lastLine(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		return unmet("%s cannot check its Python modules: %s", r.command, msg)
	}
	out := lastLine(stdout.String())
	list, ok := strings.CutPrefix(out, "missing:")
	if !ok {
		return unmet("%s answered %q to the module check", r.command, out)
	}
	if missing := strings.Fields(list); len(missing) > 0 {
		return unmet("Python %s lacks module(s) %s; point --python (ARENAHOST_PYTHON) at an interpreter that has them, or install them, then reload the plugin",
			r.command, strings.Join(missing, ", "))
	}
	return nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return strings.TrimSpace(s)
}
