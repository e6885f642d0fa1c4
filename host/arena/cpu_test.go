//go:build linux

package arena_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/arena/arenatest"
	"github.com/arenahost/arenahost/internal/testenv"
	"golang.org/x/sys/unix"
)

// The test binary re-executes itself as a helper process (another process
// mapping a segment, or a host to be killed) when this variable names one.
const helperEnv = "ARENA_TEST_HELPER"

func TestMain(m *testing.M) {
	if h := os.Getenv(helperEnv); h != "" {
		var err error
		switch h {
		case "map":
			err = helperMap()
		case "host":
			err = helperHost()
		default:
			err = fmt.Errorf("unknown helper %q", h)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "helper %s: %v\n", h, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

var quiet = slog.New(slog.DiscardHandler)

// shmBase makes a scratch parent directory for shm-mode backends: under
// /dev/shm when it exists (the real file system), else a temp dir.
func shmBase(t *testing.T) string {
	t.Helper()
	if fi, err := os.Stat(arena.DefaultShmDir); err == nil && fi.IsDir() {
		dir, err := os.MkdirTemp(arena.DefaultShmDir, "arenatest-")
		if err == nil {
			t.Cleanup(func() { os.RemoveAll(dir) })
			return dir
		}
	}
	return t.TempDir()
}

// memfdsOpen lists this process's fds that are arena memfds.
func memfdsOpen(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && strings.Contains(l, "memfd:arenahost-seg") {
			out = append(out, e.Name()+" -> "+l)
		}
	}
	return out
}

// mappings lists this process's memory mappings whose file names contain s.
func mappings(t *testing.T, s string) []string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		if strings.Contains(line, s) {
			out = append(out, line)
		}
	}
	return out
}

func TestConformanceCPU(t *testing.T) {
	t.Run("memfd", func(t *testing.T) {
		arenatest.Run(t, func(t *testing.T) arena.Backend {
			b, err := arena.NewCPUBackend(arena.CPUConfig{Mode: arena.CPUMemfd, Dir: t.TempDir()})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if fds := memfdsOpen(t); len(fds) > 0 {
					t.Errorf("memfds left open: %v", fds)
				}
				if m := mappings(t, "memfd:arenahost-seg"); len(m) > 0 {
					t.Errorf("memfds left mapped: %v", m)
				}
			})
			return b
		})
	})
	t.Run("shm", func(t *testing.T) {
		arenatest.Run(t, func(t *testing.T) arena.Backend {
			base := shmBase(t)
			b, err := arena.NewCPUBackend(arena.CPUConfig{Mode: arena.CPUShmDir, Dir: base, HugePages: true})
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(filepath.Base(b.Dir()), "arenahost-"+strconv.Itoa(os.Getpid())+"-") {
				t.Fatalf("shm dir %s", b.Dir())
			}
			t.Cleanup(func() {
				ents, err := os.ReadDir(base)
				if err != nil || len(ents) != 0 {
					t.Errorf("after close, %s holds %v (%v)", base, ents, err)
				}
				if m := mappings(t, base); len(m) > 0 {
					t.Errorf("segments left mapped: %v", m)
				}
			})
			return b
		})
	})
}

func TestNewCPUBackendBadConfig(t *testing.T) {
	tests := []struct {
		name string
		cfg  arena.CPUConfig
		want string
	}{
		{"unknown mode", arena.CPUConfig{Mode: "tmpfs"}, `mode "tmpfs"`},
		{"missing shm dir", arena.CPUConfig{Mode: arena.CPUShmDir, Dir: filepath.Join(t.TempDir(), "nope")}, "nope"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, err := arena.NewCPUBackend(tc.cfg)
			if err == nil {
				b.Close()
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not name %q", err, tc.want)
			}
		})
	}
}

// TestChildMapsRegion: another process maps a region by its Location and
// offset, reads what the host wrote and (read-write) writes what the host
// then sees; read-only, it cannot map the segment writable.
func TestChildMapsRegion(t *testing.T) {
	for _, mode := range []arena.CPUMode{arena.CPUMemfd, arena.CPUShmDir} {
		for _, access := range []string{"rw", "ro"} {
			t.Run(string(mode)+"/"+access, func(t *testing.T) {
				t.Parallel()
				b, err := arena.NewCPUBackend(arena.CPUConfig{Mode: mode, Dir: shmBase(t)})
				if err != nil {
					t.Fatal(err)
				}
				a, err := arena.New(t.Context(), b, arena.Config{Capacity: 1 << 20, SegmentSize: 64 << 10, Logger: quiet})
				if err != nil {
					t.Fatal(err)
				}
				defer a.Close()
				mustAlloc(t, a, "first", 3000) // so the region is not at offset 0
				r := mustAlloc(t, a, "shared", 5000)
				host, err := a.Bytes(r)
				if err != nil {
					t.Fatal(err)
				}
				for i := range host {
					host[i] = byte(i % 251)
				}
				loc, err := a.Location(r)
				if err != nil {
					t.Fatal(err)
				}
				if loc.HostPID != os.Getpid() {
					t.Fatalf("location pid %d, want %d", loc.HostPID, os.Getpid())
				}
				cmd := exec.Command(os.Args[0], "-test.run=^$")
				cmd.Env = append(os.Environ(), helperEnv+"=map",
					"ARENA_PATH="+loc.Path, fmt.Sprintf("ARENA_SIZE=%d", loc.Size),
					fmt.Sprintf("ARENA_OFFSET=%d", r.Offset), fmt.Sprintf("ARENA_LENGTH=%d", r.Length), "ARENA_ACCESS="+access)
				out, err := cmd.CombinedOutput()
				if err != nil {
					t.Fatalf("child: %v\n%s", err, out)
				}
				if !strings.Contains(string(out), "child ok") {
					t.Fatalf("child output: %s", out)
				}
				for i, c := range host {
					want := byte(i % 251)
					if access == "rw" {
						want = 255 - want
					}
					if c != want {
						t.Fatalf("host byte %d is %d after the child, want %d", i, c, want)
					}
				}
			})
		}
	}
}

func mustAlloc(t *testing.T, a *arena.Arena, name string, n uint64) arena.Region {
	t.Helper()
	r, err := a.Alloc(arena.HostOwner, name, n)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func envUint(name string) (uint64, error) {
	v, err := strconv.ParseUint(os.Getenv(name), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("env %s: %w", name, err)
	}
	return v, nil
}

// helperMap maps ARENA_PATH like a plugin would and checks the host's data.
func helperMap() error {
	path, access := os.Getenv("ARENA_PATH"), os.Getenv("ARENA_ACCESS")
	size, err := envUint("ARENA_SIZE")
	if err != nil {
		return err
	}
	off, err := envUint("ARENA_OFFSET")
	if err != nil {
		return err
	}
	n, err := envUint("ARENA_LENGTH")
	if err != nil {
		return err
	}
	// The host's memfds are close-on-exec: none may be inherited.
	ents, _ := os.ReadDir("/proc/self/fd")
	for _, e := range ents {
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); strings.Contains(l, "memfd:arenahost") {
			return fmt.Errorf("inherited fd %s -> %s", e.Name(), l)
		}
	}
	flags, prot := unix.O_RDWR, unix.PROT_READ|unix.PROT_WRITE
	if access == "ro" {
		flags, prot = unix.O_RDONLY, unix.PROT_READ
	}
	fd, err := unix.Open(path, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer unix.Close(fd)
	if access == "ro" {
		if m, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err == nil {
			unix.Munmap(m)
			return fmt.Errorf("read-only open of %s mapped writable", path)
		} else if !errors.Is(err, unix.EACCES) {
			return fmt.Errorf("writable map of a read-only fd: %v, want EACCES", err)
		}
	}
	mem, err := unix.Mmap(fd, 0, int(size), prot, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap %s: %w", path, err)
	}
	defer unix.Munmap(mem)
	view := mem[off : off+n]
	for i, c := range view {
		if c != byte(i%251) {
			return fmt.Errorf("byte %d at offset %d is %d, want %d", i, off+uint64(i), c, i%251)
		}
	}
	if access == "rw" {
		for i := range view {
			view[i] = 255 - view[i]
		}
	}
	fmt.Println("child ok")
	return nil
}

// helperHost is a host that makes shm segments in ARENA_DIR, reports its
// directory and waits to be killed.
func helperHost() error {
	b, err := arena.NewCPUBackend(arena.CPUConfig{Mode: arena.CPUShmDir, Dir: os.Getenv("ARENA_DIR"), Logger: quiet})
	if err != nil {
		return err
	}
	a, err := arena.New(context.Background(), b, arena.Config{Capacity: 1 << 20, SegmentSize: 64 << 10, Logger: quiet})
	if err != nil {
		return err
	}
	r, err := a.Alloc(arena.HostOwner, "weights", 100<<10) // a second segment
	if err != nil {
		return err
	}
	mem, err := a.Bytes(r)
	if err != nil {
		return err
	}
	copy(mem, "written before the kill")
	fmt.Println(b.Dir())
	time.Sleep(time.Minute)
	return errors.New("not killed within a minute")
}

// TestKilledHostCleaned kills a host that has shm segments, then checks
// the next backend started on the same directory removes them.
func TestKilledHostCleaned(t *testing.T) {
	base := shmBase(t)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=host", "ARENA_DIR="+base)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper host: %v; stderr: %s", err, stderr.String())
	}
	dead := strings.TrimSpace(line)
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	ents, err := os.ReadDir(dead)
	if err != nil {
		t.Fatalf("the killed host's dir: %v", err)
	}
	var segs int
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "segment-") {
			segs++
		}
	}
	if segs != 2 {
		t.Fatalf("the killed host left %d segment files (%v), want 2", segs, ents)
	}
	data, err := os.ReadFile(filepath.Join(dead, "segment-2"))
	if err != nil || !bytes.HasPrefix(data, []byte("written before the kill")) {
		t.Fatalf("the killed host's segment 2: %v %q", err, data[:min(len(data), 32)])
	}
	// A live host's directory must survive the cleaning.
	live, err := arena.NewCPUBackend(arena.CPUConfig{Mode: arena.CPUShmDir, Dir: base, Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	if _, err := os.Stat(dead); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("after a new start, the killed host's dir: %v", err)
	}
	next, err := arena.NewCPUBackend(arena.CPUConfig{Mode: arena.CPUMemfd, Dir: base, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	next.Close()
	if _, err := os.Stat(live.Dir()); err != nil {
		t.Fatalf("a live host's dir was cleaned: %v", err)
	}
	live.Close()
	if ents, _ := os.ReadDir(base); len(ents) != 0 {
		t.Errorf("after close, %s holds %v", base, ents)
	}
}

// TestPythonMapsRegion: a Python process (numpy, as the Python SDK does)
// maps a region by its Location, reads the host's float32 values and writes
// back what the host then sees.
func TestPythonMapsRegion(t *testing.T) {
	python := testenv.Python(t)
	script, err := filepath.Abs(filepath.Join("testdata", "map_region.py"))
	if err != nil {
		t.Fatal(err)
	}
	for _, mode := range []arena.CPUMode{arena.CPUMemfd, arena.CPUShmDir} {
		t.Run(string(mode), func(t *testing.T) {
			b, err := arena.NewCPUBackend(arena.CPUConfig{Mode: mode, Dir: shmBase(t), Logger: quiet})
			if err != nil {
				t.Fatal(err)
			}
			a, err := arena.New(t.Context(), b, arena.Config{Capacity: 1 << 20, SegmentSize: 64 << 10, Logger: quiet})
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			mustAlloc(t, a, "first", 100)
			const count = 1000
			r := mustAlloc(t, a, "values", count*4)
			mem, err := a.Bytes(r)
			if err != nil {
				t.Fatal(err)
			}
			for i := range count {
				binary.LittleEndian.PutUint32(mem[4*i:], math.Float32bits(float32(i)*0.5))
			}
			loc, err := a.Location(r)
			if err != nil {
				t.Fatal(err)
			}
			out := testenv.RunPython(t, python, script, loc.Path, strconv.FormatUint(loc.Size, 10),
				strconv.FormatUint(r.Offset, 10), strconv.Itoa(count))
			if !strings.Contains(string(out), "python ok") {
				t.Fatalf("python: %s", out)
			}
			for i := range count {
				if got := math.Float32frombits(binary.LittleEndian.Uint32(mem[4*i:])); got != -float32(i)*0.5 {
					t.Fatalf("element %d is %v after python, want %v", i, got, -float32(i)*0.5)
				}
			}
		})
	}
}
