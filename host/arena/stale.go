//go:build linux

package arena

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

const (
	shmDirPrefix = "arenahost-"
	ownerFile    = "owner"
)

// CleanStale removes, from dir, the segment directories of hosts that are
// no longer running and returns the paths it removed. A directory
// arenahost-<pid>-<random> is stale when no process <pid> exists, or when
// process <pid> started at another time than the one recorded in the
// directory's owner file (the pid was reused). Directories of live hosts,
// and every other entry of dir, are left alone. Errors on single entries
// are joined; the other entries are still cleaned.
func CleanStale(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("clean stale segments: %w", err)
	}
	var removed []string
	var errs []error
	for _, e := range entries {
		pid, ok := parseShmDirName(e.Name())
		if !ok || !e.IsDir() {
			continue
		}
		path := filepath.Join(dir, e.Name())
		if hostAlive(path, pid) {
			continue
		}
		if err := os.RemoveAll(path); err != nil {
			errs = append(errs, fmt.Errorf("clean stale segments: remove %s: %w", path, err))
			continue
		}
		removed = append(removed, path)
	}
	return removed, errors.Join(errs...)
}

// parseShmDirName returns the pid in "arenahost-<pid>-<hex>".
func parseShmDirName(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, shmDirPrefix)
	if !ok {
		return 0, false
	}
	p, suffix, ok := strings.Cut(rest, "-")
	if !ok || suffix == "" {
		return 0, false
	}
	for _, c := range suffix {
		if !strings.ContainsRune("0123456789abcdef", c) {
			return 0, false
		}
	}
	pid, err := strconv.Atoi(p)
	if err != nil || pid <= 0 {
		return 0, false
	}
	return pid, true
}

// hostAlive reports whether the host that made dir may still run.
func hostAlive(dir string, pid int) bool {
	if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
		return false
	}
	// The pid exists (EPERM: it belongs to someone else, still alive).
	data, err := os.ReadFile(filepath.Join(dir, ownerFile))
	if err != nil {
		return true // being created, or not ours to judge
	}
	var recPID int
	var recStart uint64
	if _, err := fmt.Sscanf(string(data), "%d %d", &recPID, &recStart); err != nil || recPID != pid {
		return true
	}
	start, err := processStart(pid)
	if err != nil {
		return !errors.Is(err, os.ErrNotExist)
	}
	return start == recStart
}

// processStart returns the start time of process pid in clock ticks since
// boot (field 22 of /proc/<pid>/stat).
func processStart(pid int) (uint64, error) {
	path := "/proc/" + strconv.Itoa(pid) + "/stat"
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", path, err)
	}
	// The command name (field 2) may hold spaces and parentheses: fields
	// resume after the last ')'.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse %s: no ')'", path)
	}
	fields := strings.Fields(string(data[i+1:]))
	// fields[0] is field 3 (state); field 22 is fields[19].
	if len(fields) < 20 {
		return 0, fmt.Errorf("parse %s: %d fields after the command name, want at least 20", path, len(fields))
	}
	v, err := strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parse %s: start time %q: %w", path, fields[19], err)
	}
	return v, nil
}

// MakeOwnedDir creates <parent>/arenahost-<pid>-<random> for this process,
// with the owner file CleanStale reads: a directory of per-run files (the
// plugin sockets) that the next host removes if this one is killed before
// it can.
func MakeOwnedDir(parent string) (string, error) { return makeOwnDir(parent, os.Getpid()) }
