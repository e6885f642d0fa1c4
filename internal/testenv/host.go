package testenv

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Host is an `arenahost serve` that StartHost started: the built binary
// (`make build`) as a user runs it, in its own process.
type Host struct {
	// URL is the console URL it printed, without the trailing slash
	// ("http://127.0.0.1:PORT").
	URL string
	// Data is its --data directory (the sample model and LoRAs are written
	// there on start), Plugins its --plugins directory ("" when it runs
	// none), Log the file its stderr goes to.
	Data, Plugins, Log string
}

// LogTail returns the last n bytes of the host's log, for failure messages.
func (h *Host) LogTail(n int) string {
	b, _ := os.ReadFile(h.Log)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// StartHost starts BinDir's arenahost serve on 127.0.0.1:0 with a fresh
// data directory, the core Python environment (--python) and copies of the
// built plugins named (folders of BinDir/plugins: "lora-nf4", "preview",
// "reference_pipeline", …; none: no plugins directory), plus args. It
// returns once the host has printed its console URL; the plugins may still
// be starting. The host is stopped (SIGTERM, then SIGKILL) when the test
// ends.
func StartHost(tb testing.TB, plugins []string, args ...string) *Host {
	tb.Helper()
	bin := BinDir(tb)
	python := Python(tb)
	dir := tb.TempDir()
	h := &Host{Data: filepath.Join(dir, "data"), Log: filepath.Join(dir, "host.log")}
	pluginsArg := ""
	if len(plugins) > 0 {
		h.Plugins = filepath.Join(dir, "plugins")
		pluginsArg = h.Plugins
		for _, p := range plugins {
			src := filepath.Join(bin, "plugins", p)
			if _, err := os.Stat(filepath.Join(src, "plugin.json")); err != nil {
				if required() {
					tb.Fatalf("built plugin %s not found (%v): run the tests through `make test`", src, err)
				}
				tb.Skipf("built plugin %s not found; run `make build`", src)
			}
			if err := CopyTree(src, filepath.Join(h.Plugins, p)); err != nil {
				tb.Fatal(err)
			}
		}
	}
	logf, err := os.Create(h.Log)
	if err != nil {
		tb.Fatal(err)
	}
	defer logf.Close()
	full := append([]string{"serve", "--listen", "127.0.0.1:0", "--data", h.Data, "--plugins", pluginsArg,
		"--python", python, "--arena-capacity", "512MiB"}, args...)
	cmd := exec.Command(filepath.Join(bin, "arenahost"), full...)
	cmd.Env = append(os.Environ(), "PYTHONPATH="+filepath.Join(RepoRoot(tb), "sdk", "python"))
	cmd.Stderr = logf
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start %s: %v", cmd.Path, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	tb.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			tb.Errorf("arenahost serve did not stop within 15 s of SIGTERM; killed")
		}
	})
	urls := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if u, ok := strings.CutPrefix(sc.Text(), "arenahost console: "); ok {
				select {
				case urls <- strings.TrimSuffix(u, "/"):
				default:
				}
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
	}()
	select {
	case h.URL = <-urls:
	case <-exited:
		tb.Fatalf("arenahost serve exited before serving:\n%s", h.LogTail(4000))
	case <-time.After(60 * time.Second):
		tb.Fatalf("arenahost serve printed no console URL in 60 s:\n%s", h.LogTail(4000))
	}
	return h
}

// CopyTree copies the directory src to dst (files keep their mode;
// symlinks are copied as the files they name).
func CopyTree(src, dst string) error {
	return filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		to := filepath.Join(dst, rel)
		if fi.IsDir() {
			if fi.Name() == "__pycache__" {
				return filepath.SkipDir
			}
			return os.MkdirAll(to, 0o755)
		}
		return CopyFile(p, to, fi.Mode().Perm())
	})
}

// OutOfTreeModule builds the main package made of files (paths of this
// repository's files, copied flat) as a module of its own, named module,
// that requires github.com/arenahost/arenahost with a replace directive to
// this checkout: what an author outside the repository writes
// (sdk/examples/README.md). The go command runs without network; the
// requirements are this module's, from the module cache. It returns the
// executable, in a directory removed when the test ends.
func OutOfTreeModule(tb testing.TB, module string, files ...string) string {
	tb.Helper()
	root := RepoRoot(tb)
	dir := tb.TempDir()
	for _, f := range files {
		if err := CopyFile(f, filepath.Join(dir, filepath.Base(f)), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	rootMod, err := os.ReadFile(filepath.Join(root, "go.mod"))
	if err != nil {
		tb.Fatal(err)
	}
	// The requirement blocks stand in for what `go mod tidy` would write
	// with network access.
	reqs := regexp.MustCompile(`(?s)require .*`).Find(rootMod)
	mod := "module " + module + "\n\ngo 1.26.8\n\nrequire github.com/arenahost/arenahost v0.0.0\n\n" +
		"replace github.com/arenahost/arenahost => " + root + "\n\n" + string(reqs)
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte(mod), 0o644); err != nil {
		tb.Fatal(err)
	}
	if err := CopyFile(filepath.Join(root, "go.sum"), filepath.Join(dir, "go.sum"), 0o644); err != nil {
		tb.Fatal(err)
	}
	bin := filepath.Join(dir, filepath.Base(module))
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOPROXY=off", "GOFLAGS=-mod=mod", "GOWORK=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("go build in a module outside the repository: %v\n%s\ngo.mod:\n%s", err, out, mod)
	}
	return bin
}
