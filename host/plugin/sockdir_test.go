package plugin

import (
	"bufio"
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// hostDirs lists the arenahost-<pid>-* directories under dir.
func hostDirs(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "arenahost-*"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestKilledHostSocketsRemovedAtNextStart: every socket of a host (the
// plugins' own included) lives in its owned directory; a SIGKILLed host
// leaves it behind, and the next host's first plugin start removes it.
func TestKilledHostSocketsRemovedAtNextStart(t *testing.T) {
	dir := t.TempDir()
	tmp := shortTempDir(t)
	writeFixture(t, dir, "a", "echo", nil)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	host := exec.Command(exe, "host", dir)
	host.Env = append(os.Environ(), "TMPDIR="+tmp)
	host.Stderr = os.Stderr
	out, err := host.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := host.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = host.Process.Kill(); _ = host.Wait() }()
	if _, err := bufio.NewReader(out).ReadString('\n'); err != nil {
		t.Fatalf("read host output: %v", err)
	}
	left := hostDirs(t, tmp)
	if len(left) != 1 {
		t.Fatalf("socket dirs of the running host: %v", left)
	}
	var socks []string // the plugin's go-plugin socket, at any depth of the host's dir
	_ = filepath.WalkDir(left[0], func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Type()&os.ModeSocket != 0 && strings.HasPrefix(d.Name(), "plugin") {
			socks = append(socks, p)
		}
		return nil
	})
	if len(socks) == 0 {
		t.Fatalf("the plugin's go-plugin socket is not in the host's dir %s", left[0])
	}
	// Besides its dir, the host holds one go-plugin broker socket per Go
	// plugin (go-plugin's client puts it in TMPDIR).
	broker, _ := filepath.Glob(filepath.Join(tmp, "plugin*"))
	if entries, _ := os.ReadDir(tmp); len(entries) != 1+len(broker) || len(broker) > 1 {
		t.Fatalf("the host or its plugin wrote outside its dir: %v", entries)
	}
	if err := host.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = host.Wait()
	if _, err := os.Stat(left[0]); err != nil {
		t.Fatalf("the killed host's dir should still be there: %v", err)
	}

	m := NewManager(Config{Dir: dir, PollInterval: -1, SocketDir: tmp, StartTimeout: 10 * time.Second, Logger: slog.New(slog.DiscardHandler)})
	if err := m.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, b := range broker {
		if _, err := os.Stat(b); !os.IsNotExist(err) {
			t.Errorf("the killed host's broker socket %s is still there (%v)", b, err)
		}
	}
	now := hostDirs(t, tmp)
	if len(now) != 1 || now[0] == left[0] || !strings.Contains(now[0], "arenahost-"+strconv.Itoa(os.Getpid())+"-") {
		t.Fatalf("after the next start: %v (the killed host's was %s)", now, left[0])
	}
	if err := m.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if rest := hostDirs(t, tmp); len(rest) != 0 {
		t.Fatalf("after Close: %v", rest)
	}
}
