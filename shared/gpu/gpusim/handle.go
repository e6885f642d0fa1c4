package gpusim

import (
	"encoding/binary"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/arenahost/arenahost/shared/gpu"
)

// Handle layout: magic, then little-endian fields, then zeros.
const (
	handleMagic   = "ARENASIM"
	handleVersion = 1
	memfdPrefix   = "arenahost-sim-"
)

type handle struct {
	pid, fd uint32
	size    uint64
}

func encodeHandle(pid, fd uint32, size uint64) [gpu.HandleSize]byte {
	var h [gpu.HandleSize]byte
	copy(h[:8], handleMagic)
	binary.LittleEndian.PutUint32(h[8:], handleVersion)
	binary.LittleEndian.PutUint32(h[12:], pid)
	binary.LittleEndian.PutUint32(h[16:], fd)
	binary.LittleEndian.PutUint32(h[20:], 0)
	binary.LittleEndian.PutUint64(h[24:], size)
	return h
}

// IsHandle reports whether h is a simulator IPC handle (its magic), as
// opposed to a driver's CUipcMemHandle.
func IsHandle(h [gpu.HandleSize]byte) bool { return string(h[:8]) == handleMagic }

func decodeHandle(h [gpu.HandleSize]byte) (handle, error) {
	if !IsHandle(h) {
		return handle{}, fmt.Errorf("not a simulated-GPU handle (no %q magic; a real driver's handle needs a real GPU and the cuda build)", handleMagic)
	}
	if v := binary.LittleEndian.Uint32(h[8:]); v != handleVersion {
		return handle{}, fmt.Errorf("simulated-GPU handle version %d, want %d", v, handleVersion)
	}
	hd := handle{pid: binary.LittleEndian.Uint32(h[12:]), fd: binary.LittleEndian.Uint32(h[16:]), size: binary.LittleEndian.Uint64(h[24:])}
	switch {
	case hd.pid == 0 || hd.pid > 1<<30:
		return handle{}, fmt.Errorf("simulated-GPU handle: pid %d", hd.pid)
	case hd.size == 0 || hd.size > uint64(maxInt):
		return handle{}, fmt.Errorf("simulated-GPU handle of pid %d fd %d: size %d", hd.pid, hd.fd, hd.size)
	case binary.LittleEndian.Uint32(h[20:]) != 0:
		return handle{}, fmt.Errorf("simulated-GPU handle of pid %d fd %d: reserved field %#x, want 0", hd.pid, hd.fd, binary.LittleEndian.Uint32(h[20:]))
	}
	for i, b := range h[32:] {
		if b != 0 {
			return handle{}, fmt.Errorf("simulated-GPU handle of pid %d fd %d: byte %d is %#02x, want 0", hd.pid, hd.fd, 32+i, b)
		}
	}
	return hd, nil
}

// mapHandle maps the allocating process's memfd through /proc, after
// checking that the descriptor still is a simulator slab of the handle's
// size (a freed slab's fd number may have been reused).
func mapHandle(hd handle) ([]byte, error) {
	path := fmt.Sprintf("/proc/%d/fd/%d", hd.pid, hd.fd)
	target, err := os.Readlink(path)
	if err != nil {
		return nil, fmt.Errorf("slab of pid %d fd %d: %w (the process exited or freed the slab)", hd.pid, hd.fd, err)
	}
	if !strings.HasPrefix(target, "/memfd:"+memfdPrefix) {
		return nil, fmt.Errorf("slab of pid %d fd %d: %s is %q, not a simulated-GPU slab (freed, and the descriptor reused?)", hd.pid, hd.fd, path, target)
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("slab of pid %d fd %d: open %s: %w", hd.pid, hd.fd, path, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("slab of pid %d fd %d: stat %s: %w", hd.pid, hd.fd, path, err)
	}
	if uint64(st.Size) != hd.size {
		return nil, fmt.Errorf("slab of pid %d fd %d: %s holds %d bytes, the handle says %d", hd.pid, hd.fd, path, st.Size, hd.size)
	}
	mem, err := mmap(fd, hd.size, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("slab of pid %d fd %d: mmap %d bytes: %w", hd.pid, hd.fd, hd.size, err)
	}
	return mem, nil
}
