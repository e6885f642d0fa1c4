//go:build cuda

package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/cuda"
	"github.com/arenahost/arenahost/shared/gpu"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// ipcRequest is what the host tells another process about one region:
// the slab (as a descriptor carries it) and where its floats are.
type ipcRequest struct {
	Slab     uint32 `json:"slab"`
	Handle   string `json:"handle"` // hex of the 64-byte IPC handle
	Size     uint64 `json:"size"`
	Device   int    `json:"device"`
	HostPID  int    `json:"host_pid"`
	Offset   uint64 `json:"offset"`    // the host's floats: value i is i*0.5
	Count    int    `json:"count"`     // floats at Offset, and floats the reader writes
	WriteOff uint64 `json:"write_off"` // where the reader writes value i = -2*i
}

const ipcCount = 1 << 16

func checkIPC(ctx context.Context, dev *gpu.Device, r *Report, o options, log *slog.Logger) error {
	a, backend, err := cuda.NewArena(ctx, dev, arena.Config{Capacity: 256 << 20, SegmentSize: 64 << 20, Logger: log})
	if err != nil {
		return err
	}
	defer a.Close()
	readers := []struct {
		name string
		cmd  func(ctx context.Context, req []byte) *exec.Cmd
		skip bool
	}{
		{"Go process", func(ctx context.Context, req []byte) *exec.Cmd {
			self, _ := os.Executable()
			return exec.CommandContext(ctx, self, "ipc-child", string(req))
		}, false},
		{"Python (torch + cupy)", func(ctx context.Context, req []byte) *exec.Cmd {
			return exec.CommandContext(ctx, o.python, o.torchScript, "ipc", string(req))
		}, o.skipTorch},
	}
	for gen, rd := range readers {
		if rd.skip {
			r.Add("ipc", rd.name, "skipped (-skip-torch)", "", Info)
			continue
		}
		if err := ipcRound(ctx, dev, a, backend, r, rd.name, uint64(gen+1), rd.cmd); err != nil {
			r.Check("ipc", rd.name, err.Error(), "reads host data, host sees its writes", false)
		}
	}
	return nil
}

func ipcRound(ctx context.Context, dev *gpu.Device, a *arena.Arena, backend *cuda.Backend, r *Report, name string, gen uint64,
	mk func(ctx context.Context, req []byte) *exec.Cmd) error {
	reg, err := a.Alloc(arena.HostOwner, "ipc-check", 8*ipcCount)
	if err != nil {
		return err
	}
	defer a.Free(reg)
	loc, err := a.Location(reg)
	if err != nil {
		return err
	}
	base, err := backend.Ptr(reg.Segment)
	if err != nil {
		return err
	}
	vals := make([]float32, ipcCount)
	for i := range vals {
		vals[i] = float32(i) * 0.5
	}
	if err := dev.Upload(ctx, base+gpu.DevicePtr(reg.Offset), f32Bytes(vals)); err != nil {
		return err
	}
	if err := dev.Zero(base+gpu.DevicePtr(reg.Offset+4*ipcCount), 4*ipcCount); err != nil {
		return err
	}
	if err := dev.Sync(); err != nil { // the ordering point before handing out the descriptor
		return err
	}
	holder := arena.PluginOwner("gpucheck-"+strings.Fields(name)[0], gen)
	if err := backend.Opened(holder, reg.Segment); err != nil {
		return err
	}
	defer backend.Released(holder)
	req, _ := json.Marshal(ipcRequest{
		Slab: loc.SegmentID, Handle: hex.EncodeToString(loc.IPCHandle), Size: loc.Size, Device: loc.Device, HostPID: loc.HostPID,
		Offset: reg.Offset, Count: ipcCount, WriteOff: reg.Offset + 4*ipcCount,
	})
	cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	cmd := mk(cctx, req)
	t0 := time.Now()
	outb, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("reader failed: %v: %s", err, lastLine(string(outb)))
	}
	got := make([]byte, 4*ipcCount)
	if err := dev.Download(got, base+gpu.DevicePtr(reg.Offset+4*ipcCount)); err != nil {
		return err
	}
	bad := 0
	for i, v := range bytesF32(got) {
		if v != float32(i)*-2 {
			bad++
		}
	}
	ok := bad == 0 && strings.Contains(string(outb), "read ok")
	r.Check("ipc", name, fmt.Sprintf("%s; host sees %d/%d written values (%.2f s)", lastLine(string(outb)), ipcCount-bad, ipcCount,
		time.Since(t0).Seconds()), "reads host data, host sees its writes", ok)
	return nil
}

// ipcChild is the Go reader: it opens the slab by its handle on its own
// context, checks the host's floats, writes its own and closes the handle.
func ipcChild(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: arenahost-gpucheck ipc-child REQUEST_JSON")
		return 2
	}
	var req ipcRequest
	if err := json.Unmarshal([]byte(args[0]), &req); err != nil {
		fmt.Println("bad request:", err)
		return 1
	}
	h, err := hex.DecodeString(req.Handle)
	if err != nil || len(h) != gpu.HandleSize {
		fmt.Println("bad handle")
		return 1
	}
	dev, err := gpu.Open(req.Device)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer dev.Close()
	// The plugin side: a slab cache opens the slab once and maps regions.
	slabs := gpu.NewSlabCache(dev)
	slab, err := cuda.SlabProto(arena.Location{Kind: arena.KindCUDA, SegmentID: req.Slab, Size: req.Size, HostPID: req.HostPID, IPCHandle: h, Device: req.Device})
	if err != nil {
		fmt.Println(err)
		return 1
	}
	region := func(off uint64) *pluginv1.Region {
		return &pluginv1.Region{Segment: &pluginv1.Region_Cuda{Cuda: slab}, Offset: off, Length: uint64(4 * req.Count), Generation: 1}
	}
	p, err := slabs.Addr(region(req.Offset))
	if err != nil {
		fmt.Println("open:", err)
		return 1
	}
	wp, err := slabs.Addr(region(req.WriteOff))
	if err != nil {
		fmt.Println("open:", err)
		return 1
	}
	buf := make([]byte, 4*req.Count)
	if err := dev.Download(buf, p); err != nil {
		fmt.Println("read:", err)
		return 1
	}
	bad := 0
	for i, v := range bytesF32(buf) {
		if v != float32(i)*0.5 {
			bad++
		}
	}
	vals := make([]float32, req.Count)
	for i := range vals {
		vals[i] = float32(i) * -2
	}
	if err := dev.Upload(context.Background(), wp, f32Bytes(vals)); err != nil {
		fmt.Println("write:", err)
		return 1
	}
	if err := dev.Sync(); err != nil {
		fmt.Println("sync:", err)
		return 1
	}
	if n := slabs.Open(); n != 1 {
		fmt.Printf("slab opened %d times, want once\n", n)
		return 1
	}
	if err := slabs.Close(); err != nil {
		fmt.Println("close:", err)
		return 1
	}
	if bad != 0 {
		fmt.Printf("read %d/%d values wrong\n", bad, req.Count)
		return 1
	}
	fmt.Printf("read ok: %d host values via cuIpcOpenMemHandle (slab opened once), wrote %d\n", req.Count, req.Count)
	return 0
}
