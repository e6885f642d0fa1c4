//go:build linux

package gpusim

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/gpu"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// The interfaces the host and plugins define over the driver's Device.
var (
	_ interface {
		Alloc(uint64) (gpu.Slab, error)
		Free(gpu.Slab) error
		Device() int
	} = (*Device)(nil)
	_ gpu.IPCOpener = (*Device)(nil)
	_ interface {
		Upload(ctx context.Context, dst gpu.DevicePtr, src []byte) error
	} = (*Device)(nil)
)

func newDevice(t *testing.T) *Device {
	t.Helper()
	d := New(0)
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return d
}

func alloc(t *testing.T, d *Device, n uint64) gpu.Slab {
	t.Helper()
	s, err := d.Alloc(n)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func upload(t *testing.T, d *Device, p gpu.DevicePtr, b []byte) {
	t.Helper()
	if err := d.Upload(context.Background(), p, b); err != nil {
		t.Fatal(err)
	}
}

func download(t *testing.T, d *Device, p gpu.DevicePtr, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if err := d.Download(b, p); err != nil {
		t.Fatal(err)
	}
	return b
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ seed
	}
	return b
}

func TestAllocZeroedHandle(t *testing.T) {
	d := newDevice(t)
	s := alloc(t, d, 5000)
	if s.Size != 5000 || s.Ptr == 0 || !IsHandle(s.Handle) {
		t.Fatalf("slab %+v", s)
	}
	if got := download(t, d, s.Ptr, 5000); !bytes.Equal(got, make([]byte, 5000)) {
		t.Fatal("new slab not zeroed")
	}
	hd, err := decodeHandle(s.Handle)
	if err != nil || int(hd.pid) != os.Getpid() || hd.size != 5000 {
		t.Fatalf("handle %+v, %v", hd, err)
	}
	if string(s.Handle[:8]) != "ARENASIM" || s.Handle[8] != 1 {
		t.Fatalf("handle bytes %x", s.Handle)
	}
	s2 := alloc(t, d, 64)
	if s2.Handle == s.Handle || s2.Ptr == s.Ptr {
		t.Fatal("two slabs share a handle or address")
	}
	free, total, err := d.MemInfo()
	if err != nil || total != DefaultCapacity || free != total-5064 {
		t.Fatalf("mem info %d free of %d, %v", free, total, err)
	}
	if err := d.Free(s); err != nil {
		t.Fatal(err)
	}
	if n, _, _ := d.Live(); n != 1 {
		t.Fatalf("%d live slabs after one free", n)
	}
}

func TestCapacity(t *testing.T) {
	d := NewCapacity(1, 1<<20)
	defer d.Close()
	if _, err := d.Alloc(1 << 19); err != nil {
		t.Fatal(err)
	}
	_, err := d.MemAlloc(1<<19 + 1)
	if err == nil || !strings.Contains(err.Error(), "out of memory") {
		t.Fatalf("alloc past capacity: %v", err)
	}
	if _, err := d.Alloc(0); err == nil {
		t.Fatal("0-byte alloc accepted")
	}
}

// TestQueueOrder: copies and zeroing are queued and run in order, and only
// at a Sync, Download or Upload.
func TestQueueOrder(t *testing.T) {
	d := newDevice(t)
	s := alloc(t, d, 4096)
	scratch, err := d.MemAlloc(1024)
	if err != nil {
		t.Fatal(err)
	}
	want := pattern(1024, 3)
	upload(t, d, scratch, want)
	if err := d.CopyAsync(s.Ptr, scratch, 1024); err != nil {
		t.Fatal(err)
	}
	if err := d.Zero(s.Ptr+100, 24); err != nil {
		t.Fatal(err)
	}
	if err := d.CopyAsync(s.Ptr+2048, s.Ptr, 1024); err != nil {
		t.Fatal(err)
	}
	// The slab's memory as another process maps it: nothing ran yet.
	m := d.maps[0]
	if m.base != s.Ptr {
		m = d.maps[1]
	}
	if !bytes.Equal(m.mem, make([]byte, 4096)) || d.Pending() != 3 {
		t.Fatalf("queued work ran before Sync (%d pending)", d.Pending())
	}
	if err := d.Sync(); err != nil {
		t.Fatal(err)
	}
	clear(want[100:124])
	if !bytes.Equal(m.mem[:1024], want) || !bytes.Equal(m.mem[2048:3072], want) || d.Pending() != 0 {
		t.Fatal("queued copies and zero not applied in order")
	}

	// Download runs pending work first.
	if err := d.Zero(s.Ptr, 4096); err != nil {
		t.Fatal(err)
	}
	if got := download(t, d, s.Ptr+2048, 1024); !bytes.Equal(got, make([]byte, 1024)) {
		t.Fatal("Download did not run the queued zero first")
	}
	// So does Upload, and its bytes land after the queued work.
	if err := d.CopyAsync(s.Ptr, scratch, 8); err != nil {
		t.Fatal(err)
	}
	upload(t, d, s.Ptr+4, []byte{9, 9, 9, 9})
	if got := m.mem[:8]; !bytes.Equal(got, append(append([]byte(nil), want[:4]...), 9, 9, 9, 9)) {
		t.Fatalf("upload after queued copy: %v", got)
	}
	if err := d.MemFree(scratch); err != nil {
		t.Fatal(err)
	}
}

func TestPointerErrors(t *testing.T) {
	d := newDevice(t)
	s := alloc(t, d, 4096)
	gone := alloc(t, d, 128)
	if err := d.Free(gone); err != nil {
		t.Fatal(err)
	}
	scratch, err := d.MemAlloc(64)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		run  func() error
		want string
	}{
		{"copy past the end", func() error { return d.CopyAsync(s.Ptr+4040, scratch, 60) }, "runs 4 bytes past the end of the slab of 4096 bytes"},
		{"copy from freed", func() error { return d.CopyAsync(s.Ptr, gone.Ptr+8, 8) }, "already freed"},
		{"copy from nowhere", func() error { return d.CopyAsync(s.Ptr, 16, 8) }, "0x10 + 8 bytes: not in any live allocation"},
		{"zero past scratch", func() error { return d.Zero(scratch, 65) }, "past the end of the scratch buffer of 64 bytes"},
		{"upload past the end", func() error { return d.Upload(context.Background(), s.Ptr+1, make([]byte, 4096)) }, "upload 4096 bytes: destination"},
		{"download freed", func() error { return d.Download(make([]byte, 4), gone.Ptr) }, "already freed"},
		{"double free", func() error { return d.Free(gone) }, "already freed"},
		{"free inside a slab", func() error { return d.Free(gpu.Slab{Ptr: s.Ptr + 8, Size: 4088}) }, "not the start of a slab"},
		{"free wrong size", func() error { return d.Free(gpu.Slab{Ptr: s.Ptr, Size: 4095}) }, "size 4095, allocated 4096"},
		{"free scratch as slab", func() error { return d.Free(gpu.Slab{Ptr: scratch, Size: 64}) }, "a scratch buffer, not a slab"},
		{"mem free a slab", func() error { return d.MemFree(s.Ptr) }, "a slab, not a scratch buffer"},
		{"close ipc of a slab", func() error { return d.CloseIPC(s.Ptr) }, "a slab, not a slab opened by handle"},
		{"open a non-sim handle", func() error { _, err := d.OpenIPC([gpu.HandleSize]byte{1, 2, 3}); return err }, "not a simulated-GPU handle"},
		{"open own handle", func() error { _, err := d.OpenIPC(s.Handle); return err }, "made by this process"},
		{"open a bad version", func() error {
			h := s.Handle
			h[8] = 7
			_, err := d.OpenIPC(h)
			return err
		}, "version 7"},
		{"open a dead pid", func() error { _, err := d.OpenIPC(encodeHandle(1<<30, 3, 64)); return err }, "the process exited or freed the slab"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := c.run()
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want one containing %q", err, c.want)
			}
		})
	}
	if d.Pending() != 0 {
		t.Fatalf("%d rejected operations queued", d.Pending())
	}
	if n, k, o := d.Live(); n != 1 || k != 1 || o != 0 {
		t.Fatalf("live %d slabs %d scratch %d opened after rejected calls", n, k, o)
	}
}

// TestFreeRunsQueue: work queued before a Free runs before the memory
// goes, as the driver's Free synchronizes the stream first.
func TestFreeRunsQueue(t *testing.T) {
	d := newDevice(t)
	src, dst := alloc(t, d, 64), alloc(t, d, 64)
	upload(t, d, src.Ptr, pattern(64, 1))
	if err := d.CopyAsync(dst.Ptr, src.Ptr, 64); err != nil {
		t.Fatal(err)
	}
	if err := d.Free(src); err != nil {
		t.Fatal(err)
	}
	if got := download(t, d, dst.Ptr, 64); !bytes.Equal(got, pattern(64, 1)) {
		t.Fatal("copy queued before Free did not run")
	}
}

func TestClose(t *testing.T) {
	d := New(2)
	s := alloc(t, d, 64)
	if _, err := d.MemAlloc(64); err != nil {
		t.Fatal(err)
	}
	if err := d.Zero(s.Ptr, 64); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if n, k, o := d.Live(); n+k+o != 0 || d.Pending() != 0 {
		t.Fatalf("after close: %d slabs %d scratch %d opened, %d pending", n, k, o, d.Pending())
	}
	if _, err := d.Alloc(64); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Fatalf("alloc after close: %v", err)
	}
	if err := d.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
}

// The IPC child: a re-executed test binary that opens the parent's slab,
// checks what the parent wrote, writes its own pattern, and exits.
const childEnv = "GPUSIM_IPC_CHILD"

func TestMain(m *testing.M) {
	if v := os.Getenv(childEnv); v != "" {
		if err := ipcChild(v); err != nil {
			fmt.Fprintln(os.Stderr, "ipc child:", err)
			os.Exit(3)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// ipcChild reads "handle-hex offset want-seed write-seed n".
func ipcChild(arg string) error {
	var hx string
	var off, n int
	var wantSeed, writeSeed byte
	if _, err := fmt.Sscan(arg, &hx, &off, &wantSeed, &writeSeed, &n); err != nil {
		return fmt.Errorf("parse %q: %w", arg, err)
	}
	raw, err := hex.DecodeString(hx)
	if err != nil || len(raw) != gpu.HandleSize {
		return fmt.Errorf("handle %q: %v", hx, err)
	}
	var h [gpu.HandleSize]byte
	copy(h[:], raw)
	d := New(0)
	defer d.Close()
	// Through the plugin side's cache, as a plugin opens a descriptor.
	hd, _ := decodeHandle(h)
	region := &pluginv1.Region{Offset: uint64(off), Length: uint64(n), Segment: &pluginv1.Region_Cuda{Cuda: &pluginv1.CUDASlab{
		Id: 1, IpcHandle: h[:], Size: hd.size, HostPid: int32(hd.pid)}}}
	cache := gpu.NewSlabCache(d)
	defer cache.Close()
	at, err := cache.Addr(region)
	if err != nil {
		return err
	}
	if again, err := cache.Addr(region); err != nil || again != at || cache.Open() != 1 {
		return fmt.Errorf("second lookup: %#x (first %#x), %d open, %v", again, at, cache.Open(), err)
	}
	p := at - gpu.DevicePtr(off)
	if _, err := d.OpenIPC(h); err == nil || !strings.Contains(err.Error(), "already open") {
		return fmt.Errorf("second open of one handle: %v", err)
	}
	got := make([]byte, n)
	if err := d.Download(got, p+gpu.DevicePtr(off)); err != nil {
		return err
	}
	if !bytes.Equal(got, pattern(n, wantSeed)) {
		return fmt.Errorf("read %x…, want the parent's pattern %x…", got[:8], pattern(8, wantSeed))
	}
	// Past the slab's end is an error in the child too.
	if err := d.Download(got[:1], p+gpu.DevicePtr(hd.size)); err == nil {
		return fmt.Errorf("read past the opened slab accepted")
	}
	// Write through a queued copy from scratch, made visible by the
	// cache's CloseIPC.
	scratch, err := d.MemAlloc(uint64(n))
	if err != nil {
		return err
	}
	if err := d.Upload(context.Background(), scratch, pattern(n, writeSeed)); err != nil {
		return err
	}
	if err := d.CopyAsync(p+gpu.DevicePtr(off), scratch, uint64(n)); err != nil {
		return err
	}
	if err := cache.Close(); err != nil {
		return err
	}
	if _, _, o := d.Live(); o != 0 {
		return fmt.Errorf("%d handles open after the cache closed", o)
	}
	return nil
}

func runChild(t *testing.T, h [gpu.HandleSize]byte, off, wantSeed, writeSeed, n int) ([]byte, error) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestMain$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %d %d %d %d", childEnv, hex.EncodeToString(h[:]), off, wantSeed, writeSeed, n))
	return cmd.CombinedOutput()
}

func TestIPCAcrossProcesses(t *testing.T) {
	d := newDevice(t)
	s := alloc(t, d, 3*4096+17)
	const off, n = 4000, 5000
	upload(t, d, s.Ptr+off, pattern(n, 0x11))
	if out, err := runChild(t, s.Handle, off, 0x11, 0x5a, n); err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	if got := download(t, d, s.Ptr+off, n); !bytes.Equal(got, pattern(n, 0x5a)) {
		t.Fatal("parent does not see the child's pattern")
	}

	// A copy queued but not synced is invisible to another process: the
	// child sees the old bytes and fails.
	scratch, err := d.MemAlloc(n)
	if err != nil {
		t.Fatal(err)
	}
	upload(t, d, scratch, pattern(n, 0x22))
	if err := d.CopyAsync(s.Ptr+off, scratch, n); err != nil {
		t.Fatal(err)
	}
	out, err := runChild(t, s.Handle, off, 0x22, 0x33, n)
	if err == nil || !strings.Contains(string(out), "want the parent's pattern") {
		t.Fatalf("child read unsynced bytes: %v\n%s", err, out)
	}
	if err := d.Sync(); err != nil {
		t.Fatal(err)
	}
	if out, err := runChild(t, s.Handle, off, 0x22, 0x33, n); err != nil {
		t.Fatalf("child after sync: %v\n%s", err, out)
	}

	// A freed slab's handle no longer opens.
	if err := d.Free(s); err != nil {
		t.Fatal(err)
	}
	out, err = runChild(t, s.Handle, off, 0x22, 0x33, n)
	if err == nil || !strings.Contains(string(out), "slab of pid") {
		t.Fatalf("child opened a freed slab: %v\n%s", err, out)
	}
}

func TestOpenNotASlab(t *testing.T) {
	d := newDevice(t)
	// The parent's stdin is a descriptor, but no simulated slab.
	_, err := d.OpenIPC(encodeHandle(uint32(os.Getppid()), 0, 1))
	if err == nil || !strings.Contains(err.Error(), "slab of pid") {
		t.Fatalf("opened a descriptor that is no simulated slab: %v", err)
	}
}
