//go:build linux

package arena

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// CPUMode selects how the CPU backend makes shared memory.
type CPUMode string

const (
	// CPUMemfd (the default) makes each segment an anonymous memfd, sealed
	// against resizing. Other processes open /proc/<hostpid>/fd/<fd>. A
	// memfd has no name in any file system: its memory goes away with the
	// last descriptor or mapping, so nothing can outlive the host, even
	// when the host is killed. The fd is close-on-exec, so children do not
	// inherit it; they reach it only through the /proc path, which needs
	// the same user (ptrace read access).
	CPUMemfd CPUMode = "memfd"
	// CPUShmDir makes each segment a file under
	// <Dir>/arenahost-<pid>-<random>/. Close removes the files and the
	// directory; the directories of killed hosts are removed by CleanStale
	// at the next start.
	CPUShmDir CPUMode = "shm"
)

// DefaultShmDir is where CPUShmDir segments live, and where CleanStale looks.
const DefaultShmDir = "/dev/shm"

// CPUConfig configures the CPU backend.
type CPUConfig struct {
	Mode CPUMode // CPUMemfd when empty
	// Dir is the parent of the backend's directory in CPUShmDir mode, and
	// the directory cleaned of dead hosts' segments in both modes;
	// DefaultShmDir when empty.
	Dir string
	// HugePages asks for transparent huge pages (madvise MADV_HUGEPAGE).
	// Only advice: kernels whose shmem_enabled is "never" ignore it.
	HugePages bool
	// Logger receives segment events; slog.Default() when nil.
	Logger *slog.Logger
}

// CPUBackend makes shared-memory segments that another process on this
// machine can map read-write or read-only (Location.Path, from offset 0).
type CPUBackend struct {
	mode      CPUMode
	parent    string
	dir       string // own directory, CPUShmDir mode only
	hugePages bool
	pid       int
	log       *slog.Logger

	mu     sync.Mutex
	live   map[*cpuSegment]struct{}
	closed bool
}

// NewCPUBackend removes what killed hosts left in cfg.Dir (CleanStale) and
// prepares a backend; in CPUShmDir mode it creates its own directory.
func NewCPUBackend(cfg CPUConfig) (*CPUBackend, error) {
	mode := cfg.Mode
	if mode == "" {
		mode = CPUMemfd
	}
	if mode != CPUMemfd && mode != CPUShmDir {
		return nil, fmt.Errorf("cpu backend: config: mode %q: %w: want %q or %q", mode, ErrInvalid, CPUMemfd, CPUShmDir)
	}
	parent := cfg.Dir
	if parent == "" {
		parent = DefaultShmDir
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	b := &CPUBackend{
		mode: mode, parent: parent, hugePages: cfg.HugePages, pid: os.Getpid(),
		log:  log.With(slog.String("backend", "cpu-"+string(mode))),
		live: make(map[*cpuSegment]struct{}),
	}
	if _, err := os.Stat(parent); err == nil {
		removed, err := CleanStale(parent)
		for _, d := range removed {
			b.log.Info("removed shared memory of a dead host", slog.String("dir", d))
		}
		if err != nil {
			b.log.Warn("clean stale shared memory", slog.String("dir", parent), slog.Any("error", err))
		}
	} else if mode == CPUShmDir {
		return nil, fmt.Errorf("cpu backend: shm dir %s: %w", parent, err)
	}
	if mode == CPUShmDir {
		dir, err := makeOwnDir(parent, b.pid)
		if err != nil {
			return nil, fmt.Errorf("cpu backend: %w", err)
		}
		b.dir = dir
	}
	return b, nil
}

// makeOwnDir creates <parent>/arenahost-<pid>-<random> with an owner file
// recording the process's start time, so CleanStale can tell this host from
// a later process that reuses its pid.
func makeOwnDir(parent string, pid int) (string, error) {
	var rnd [6]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return "", fmt.Errorf("random dir name: %w", err)
	}
	dir := filepath.Join(parent, fmt.Sprintf("%s%d-%s", shmDirPrefix, pid, hex.EncodeToString(rnd[:])))
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", fmt.Errorf("create shm dir: %w", err)
	}
	start, err := processStart(pid)
	if err != nil {
		_ = os.Remove(dir)
		return "", fmt.Errorf("create shm dir %s: %w", dir, err)
	}
	owner := filepath.Join(dir, ownerFile)
	if err := os.WriteFile(owner, []byte(fmt.Sprintf("%d %d\n", pid, start)), 0o600); err != nil {
		_ = os.RemoveAll(dir)
		return "", fmt.Errorf("create shm dir: write %s: %w", owner, err)
	}
	return dir, nil
}

// Name is "cpu-memfd" or "cpu-shm".
func (b *CPUBackend) Name() string { return "cpu-" + string(b.mode) }

// Dir is the backend's own directory in CPUShmDir mode, "" in CPUMemfd mode.
func (b *CPUBackend) Dir() string { return b.dir }

// Create makes a zeroed shared segment of size bytes and maps it
// read-write, MAP_SHARED.
func (b *CPUBackend) Create(id uint32, size uint64) (Segment, error) {
	if size == 0 || size%PageSize != 0 || size > maxRequest {
		return nil, fmt.Errorf("%w: segment size %d is not a positive multiple of %d", ErrInvalid, size, PageSize)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, ErrClosed
	}
	s := &cpuSegment{b: b, fd: -1}
	var err error
	switch b.mode {
	case CPUMemfd:
		err = s.openMemfd(id, size)
	default:
		err = s.openShmFile(id, size)
	}
	if err != nil {
		s.release()
		return nil, err
	}
	mem, err := unix.Mmap(s.fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		s.release()
		return nil, fmt.Errorf("mmap %s (%s): %w", s.path, ByteSize(size), err)
	}
	s.mem = mem
	if b.hugePages {
		if err := unix.Madvise(mem, unix.MADV_HUGEPAGE); err != nil {
			b.log.Debug("madvise hugepages refused", slog.Uint64("segment", uint64(id)), slog.Any("error", err))
		}
	}
	s.loc = Location{Kind: KindCPU, SegmentID: id, Path: s.path, Size: size, HostPID: b.pid}
	b.live[s] = struct{}{}
	return s, nil
}

func (s *cpuSegment) openMemfd(id uint32, size uint64) error {
	fd, err := unix.MemfdCreate(fmt.Sprintf("arenahost-seg-%d", id), unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return fmt.Errorf("memfd_create for segment %d: %w", id, err)
	}
	s.fd = fd
	s.path = fmt.Sprintf("/proc/%d/fd/%d", s.b.pid, fd)
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		return fmt.Errorf("ftruncate memfd for segment %d to %s: %w", id, ByteSize(size), err)
	}
	// Sealed against resizing, no other process can shrink the file under
	// the host's mapping (which would SIGBUS the host).
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		return fmt.Errorf("seal memfd for segment %d: %w", id, err)
	}
	return nil
}

func (s *cpuSegment) openShmFile(id uint32, size uint64) error {
	path := filepath.Join(s.b.dir, "segment-"+strconv.FormatUint(uint64(id), 10))
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	s.fd, s.path, s.unlink = fd, path, true
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		return fmt.Errorf("ftruncate %s to %s: %w", path, ByteSize(size), err)
	}
	return nil
}

// Close closes the segments the arena left open and removes the backend's
// directory (CPUShmDir mode).
func (b *CPUBackend) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	live := make([]*cpuSegment, 0, len(b.live))
	for s := range b.live {
		live = append(live, s)
	}
	b.mu.Unlock()
	var errs []error
	for _, s := range live {
		errs = append(errs, s.Close())
	}
	if b.dir != "" {
		if err := os.RemoveAll(b.dir); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", b.dir, err))
		}
	}
	return errors.Join(errs...)
}

type cpuSegment struct {
	b      *CPUBackend
	fd     int
	path   string
	unlink bool
	mem    []byte
	loc    Location
	once   sync.Once
	err    error
}

func (s *cpuSegment) Location() Location { return s.loc }
func (s *cpuSegment) Bytes() []byte      { return s.mem }

// Discard gives the pages of [off, off+n) back to the kernel by punching
// a hole in the segment's file (fallocate FALLOC_FL_PUNCH_HOLE, keeping its
// size), or, where the file system refuses that, with madvise MADV_REMOVE
// on the host's mapping. Both drop the pages from every process's mapping;
// the range then reads as zero. When neither is supported the error wraps
// errors.ErrUnsupported.
func (s *cpuSegment) Discard(off, n uint64) error {
	if n == 0 {
		return nil
	}
	if off%PageSize != 0 || n%PageSize != 0 || off > s.loc.Size || n > s.loc.Size-off {
		return fmt.Errorf("discard [%d, %d) of %s: %w: not page-aligned or outside the segment of %d bytes",
			off, off+n, s.path, ErrInvalid, s.loc.Size)
	}
	err := unix.Fallocate(s.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n))
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
		return fmt.Errorf("discard [%d, %d) of %s: fallocate punch hole: %w", off, off+n, s.path, err)
	}
	merr := unix.Madvise(s.mem[off:off+n], unix.MADV_REMOVE)
	if merr == nil {
		return nil
	}
	if errors.Is(merr, unix.EOPNOTSUPP) || errors.Is(merr, unix.EINVAL) || errors.Is(merr, unix.ENOSYS) {
		return fmt.Errorf("discard [%d, %d) of %s: %w (fallocate: %v; madvise MADV_REMOVE: %v)",
			off, off+n, s.path, errors.ErrUnsupported, err, merr)
	}
	return fmt.Errorf("discard [%d, %d) of %s: madvise MADV_REMOVE: %w", off, off+n, s.path, merr)
}

// Close unmaps the segment, closes its fd and (CPUShmDir) removes its file.
func (s *cpuSegment) Close() error {
	s.once.Do(func() {
		s.err = s.release()
		s.b.mu.Lock()
		delete(s.b.live, s)
		s.b.mu.Unlock()
	})
	return s.err
}

func (s *cpuSegment) release() error {
	var errs []error
	if s.mem != nil {
		if err := unix.Munmap(s.mem); err != nil {
			errs = append(errs, fmt.Errorf("munmap %s: %w", s.path, err))
		}
		s.mem = nil
	}
	if s.fd >= 0 {
		if err := unix.Close(s.fd); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", s.path, err))
		}
		s.fd = -1
	}
	if s.unlink {
		if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove %s: %w", s.path, err))
		}
		s.unlink = false
	}
	return errors.Join(errs...)
}
