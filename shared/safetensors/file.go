package safetensors

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"

	"golang.org/x/sys/unix"
)

// File is a safetensors file mapped read-only into memory. Tensor data is
// served as slices of the mapping, so reading a tensor copies nothing; the
// slices are valid until Close. A File is safe for concurrent readers, but
// Close must not race with them.
type File struct {
	Path string
	*Header

	// opened is the file's status when it was mapped (Unchanged).
	opened unix.Stat_t

	mapping []byte
}

// ErrBadPath: a path names something that is not a regular file (a FIFO,
// device, socket or directory), a symlink loop, or a name too long for the
// filesystem. Callers answer it as the caller's bad input.
var ErrBadPath = errors.New("not a regular file")

// OpenRegular opens path read-only without blocking and checks the opened
// file, not the name: a FIFO, device, socket or directory is refused with
// ErrBadPath at once (an ordinary open of a FIFO blocks until a writer
// comes; checking the name first races with a swap). Symlink loops and
// over-long names are ErrBadPath too. This is the one way arenahost opens
// a file named by a user, in the host, the plugins and the CLI alike.
func OpenRegular(path string) (*os.File, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	for err == unix.EINTR {
		fd, err = unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	}
	if err != nil {
		perr := &os.PathError{Op: "open", Path: path, Err: err}
		switch err {
		case unix.ELOOP, unix.ENAMETOOLONG, unix.ENOTDIR, unix.EISDIR, unix.ENXIO:
			return nil, fmt.Errorf("%w: %w", ErrBadPath, perr)
		}
		return nil, perr
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		_ = unix.Close(fd)
		return nil, &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		_ = unix.Close(fd)
		return nil, &Error{File: path, Err: fmt.Errorf("%w: it is %s", ErrBadPath, fileType(st.Mode))}
	}
	// Regular files ignore O_NONBLOCK, but clear it so the descriptor
	// behaves as an ordinary one wherever it is handed.
	if err := unix.SetNonblock(fd, false); err != nil {
		_ = unix.Close(fd)
		return nil, &os.PathError{Op: "fcntl", Path: path, Err: err}
	}
	return os.NewFile(uintptr(fd), path), nil
}

// fileType names the file type in a stat mode.
func fileType(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFIFO:
		return "a FIFO (named pipe)"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFLNK:
		return "a symlink"
	}
	return fmt.Sprintf("not a regular file (mode %#o)", mode&unix.S_IFMT)
}

// Open maps path read-only and validates its header. path must name a
// regular file (OpenRegular).
func Open(path string) (*File, error) {
	f, err := OpenRegular(path)
	if err != nil {
		return nil, fmt.Errorf("open safetensors: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, &Error{File: path, Err: fmt.Errorf("stat: %w", err)}
	}
	size := st.Size()
	if size < lenSize {
		return nil, &Error{File: path, Err: fmt.Errorf("file is %d bytes, too short for the 8-byte header length", size)}
	}
	if int64(int(size)) != size {
		return nil, &Error{File: path, Err: fmt.Errorf("file of %d bytes cannot be mapped on this platform", size)}
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, &Error{File: path, Err: fmt.Errorf("mmap: %w", err)}
	}
	var h *Header
	err = guardFault(func() error {
		var err error
		h, err = ParseHeader(path, bytes.NewReader(m), size)
		return err
	})
	if err != nil {
		_ = unix.Munmap(m)
		return nil, err
	}
	out := &File{Path: path, Header: h, mapping: m}
	if err := unix.Fstat(int(f.Fd()), &out.opened); err != nil {
		_ = unix.Munmap(m)
		return nil, &Error{File: path, Err: fmt.Errorf("stat: %w", err)}
	}
	return out, nil
}

// Unchanged reports whether Path still names the mapped file (same device
// and inode) with the size and the modification and status-change times it
// had when it was opened: then a write to it since is not recorded (writes
// update both times; a rename over Path changes the inode). Times are as
// fine as the filesystem keeps them, so a caller that must be sure still
// checksums the bytes; false means only "look".
func (f *File) Unchanged() bool {
	var st unix.Stat_t
	if err := unix.Stat(f.Path, &st); err != nil {
		return false
	}
	o := f.opened
	return st.Dev == o.Dev && st.Ino == o.Ino && st.Size == o.Size && st.Mtim == o.Mtim && st.Ctim == o.Ctim
}

// Data returns the bytes of tensor name as a slice of the mapping. The slice
// must not be written to and is invalid after Close. Reading it can fault if
// another process truncates the file meanwhile; CopyTensor turns that into an
// error.
func (f *File) Data(name string) ([]byte, error) {
	t, ok := f.Lookup(name)
	if !ok {
		return nil, &Error{File: f.Path, Key: name, Err: errors.New("no such tensor")}
	}
	return f.TensorData(t)
}

// TensorData returns the bytes of a tensor of this file's header.
func (f *File) TensorData(t TensorInfo) ([]byte, error) {
	if f.mapping == nil {
		return nil, &Error{File: f.Path, Key: t.Name, Err: errors.New("file is closed")}
	}
	if t.Begin < 0 || t.End < t.Begin || t.End > f.DataLen {
		return nil, &Error{File: f.Path, Key: t.Name, Err: fmt.Errorf("data_offsets [%d, %d] outside the data section", t.Begin, t.End)}
	}
	return f.mapping[f.DataStart+t.Begin : f.DataStart+t.End : f.DataStart+t.End], nil
}

// ReadTensor calls fn with the bytes of t as a slice of the mapping, valid
// only during the call. A fault while fn reads them (the file was
// truncated under us) is returned as an error instead of crashing the
// process. The guard is the calling goroutine's, so concurrent readers each
// call ReadTensor.
func (f *File) ReadTensor(t TensorInfo, fn func(data []byte) error) error {
	src, err := f.TensorData(t)
	if err != nil {
		return err
	}
	if err := guardFault(func() error { return fn(src) }); err != nil {
		return &Error{File: f.Path, Key: t.Name, Err: err}
	}
	return nil
}

// CopyTensor copies the bytes of t into dst, which must be exactly t's size.
// A fault while reading the mapping (the file was truncated under us) is
// returned as an error instead of crashing the process.
func (f *File) CopyTensor(dst []byte, t TensorInfo) error {
	src, err := f.TensorData(t)
	if err != nil {
		return err
	}
	if len(dst) != len(src) {
		return &Error{File: f.Path, Key: t.Name, Err: fmt.Errorf("copy: destination is %d bytes, tensor is %d", len(dst), len(src))}
	}
	if err := guardFault(func() error { copy(dst, src); return nil }); err != nil {
		return &Error{File: f.Path, Key: t.Name, Err: err}
	}
	return nil
}

// ReadAt reads len(p) bytes of the file at offset off from the mapping
// (io.ReaderAt). A fault while reading (the file was truncated under us) is
// returned as an error instead of crashing the process.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	if f.mapping == nil {
		return 0, &Error{File: f.Path, Err: errors.New("file is closed")}
	}
	if off < 0 || off > int64(len(f.mapping)) {
		return 0, &Error{File: f.Path, Err: fmt.Errorf("read at %d: outside the file (%d bytes)", off, len(f.mapping))}
	}
	var n int
	err := guardFault(func() error { n = copy(p, f.mapping[off:]); return nil })
	if err != nil {
		return 0, &Error{File: f.Path, Err: err}
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// AdviseSequential tells the kernel the mapping will be read front to back,
// which widens read-ahead for a whole-file load.
func (f *File) AdviseSequential() error {
	if f.mapping == nil {
		return nil
	}
	return unix.Madvise(f.mapping, unix.MADV_SEQUENTIAL)
}

// Evict drops the pages that hold tensor name from this process's
// resident memory (madvise MADV_DONTNEED on the whole pages it spans): a
// pass that reads each tensor once keeps one tensor resident, not the
// file. The bytes stay in the page cache and the mapping stays valid: a
// later read faults them back in. Unknown names are ignored.
func (f *File) Evict(name string) error {
	t, ok := f.Lookup(name)
	if !ok {
		return nil
	}
	return f.evict(t)
}

// evict is Evict of a tensor of this file's header (by its offsets).
func (f *File) evict(t TensorInfo) error {
	name := t.Name
	if f.mapping == nil || t.End <= t.Begin {
		return nil
	}
	page := int64(os.Getpagesize())
	lo := (f.DataStart + t.Begin) / page * page
	hi := min(int64(len(f.mapping)), (f.DataStart+t.End+page-1)/page*page)
	if err := unix.Madvise(f.mapping[lo:hi], unix.MADV_DONTNEED); err != nil {
		return &Error{File: f.Path, Key: name, Err: fmt.Errorf("madvise: %w", err)}
	}
	return nil
}

// Close unmaps the file. Slices returned by Data are invalid afterwards.
func (f *File) Close() error {
	if f.mapping == nil {
		return nil
	}
	m := f.mapping
	f.mapping = nil
	if err := unix.Munmap(m); err != nil {
		return &Error{File: f.Path, Err: fmt.Errorf("munmap: %w", err)}
	}
	return nil
}

// guardFault runs fn with memory faults turned into panics it recovers, so a
// mapping whose file shrank reports an error.
func guardFault(fn func() error) (err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if r := recover(); r != nil {
			if re, ok := r.(interface{ Addr() uintptr }); ok {
				err = fmt.Errorf("memory fault reading the mapping at %#x (file truncated while open?)", re.Addr())
				return
			}
			panic(r)
		}
	}()
	return fn()
}
