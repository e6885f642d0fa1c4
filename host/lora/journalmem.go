package lora

import (
	"bufio"
	"context"
	"fmt"
	"maps"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/registry"
)

// The fuse journal's file references are its record: they name the bytes
// a restore writes back, checked by CRC-32C, and they hold no memory. A
// restore from them reads the model file again (through the page cache),
// which on a large model is most of a fused re-apply. So, when memory
// allows, the journal also keeps a copy of each referenced tensor's
// original bytes in the host's own memory (never in the arena), and
// restores from that copy: one memory copy per tensor, in parallel pieces
// on a CPU arena, one upload on a device arena.
//
// The copy is taken after the fused apply that first journaled the
// weight returned, by a goroutine (startFill), so it adds nothing to the
// apply's time (a Flux-dev model's 6.3 GB would add a large part of a
// second); until it is in place a restore reads the file, as without it.
// It is read from the model's file (the mapping the references point
// into; nothing is read back from the arena, which on a device is a
// download), one weight at a time under the model's write lock, and its
// CRC-32C is checked against the load's before it is kept: a copy that
// differs is dropped and the file reference stays the only record. It is
// attached under the coordinator's model lock only to the very entry it
// was taken for (a restore, remove or reload in between drops it). The
// copy lives as long as the entry (remove, a reload, a rollback free it
// with the entry), so a fused re-apply restores from it again and again.
// Nothing about crash recovery changes: the plugin never sees the copy,
// and a rollback after a plugin killed mid-pass writes the same original
// bytes from it that the file reference names.
//
// JournalMemory bounds it: JournalMemoryAuto (the default) keeps a copy
// while all the copies together would stay within half of the memory
// available to the host: what the copies already hold plus what is
// available now, the lesser of the kernel's MemAvailable and, in a memory
// cgroup with a limit (a container, a Kubernetes pod), the limit minus the
// cgroup's usage; 0 keeps none (restores read the
// file, as without this); a positive value is a byte budget over all
// models. A weight whose copy would pass the bound is restored from the
// file alone, so the journal still takes 0 bytes of arena and at most the
// budget of host memory.

// JournalArena, a byte budget (0 by default), lets the journal keep the
// copy in the arena instead: on a device arena that is device memory, and
// a restore is a device-to-device copy, the fastest there is, at the price
// of device memory as large as the fused weights' packed codes and absmax
// (about the whole model when a LoRA touches every layer). A weight whose
// copy would pass it gets the host-memory copy, or none.

// JournalMemoryAuto is the default JournalMemory (see above).
const JournalMemoryAuto int64 = -1

// memAvailable is the memory available to this process now: the lesser of
// the kernel's MemAvailable and its memory cgroup's headroom (0 when
// neither is known).
func memAvailable() int64 {
	n := meminfoAvailable()
	if h, ok := cgroupHeadroom(); ok && (n == 0 || h < n) {
		n = h
	}
	return n
}

// cgroupHeadroom is limit − usage of the process's memory cgroup: v2's
// memory.max and memory.current, else v1's memory.limit_in_bytes and
// memory.usage_in_bytes. false when there is no limit or it is unreadable.
func cgroupHeadroom() (int64, bool) {
	for _, p := range [][2]string{
		{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"},
		{"/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"},
	} {
		limit, ok1 := readInt(p[0])
		usage, ok2 := readInt(p[1])
		// v1 reports "no limit" as a huge number near the int64 maximum.
		if ok1 && ok2 && limit > 0 && limit < 1<<60 {
			return max(limit-usage, 0), true
		}
	}
	return 0, false
}

// readInt reads a cgroup file holding one integer ("max" is not one).
func readInt(path string) (int64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return n, err == nil
}

// meminfoAvailable reads MemAvailable from /proc/meminfo (0 when unknown).
func meminfoAvailable() int64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "MemAvailable:"); ok {
			fs := strings.Fields(v)
			if len(fs) > 0 {
				n, _ := strconv.ParseInt(fs[0], 10, 64)
				return n << 10
			}
		}
	}
	return 0
}

// reserveMem takes n bytes of the journal's memory budget; false when the
// copy would pass it.
func (c *Coordinator) reserveMem(n int64) bool {
	c.memMu.Lock()
	defer c.memMu.Unlock()
	switch budget := c.JournalMemory; {
	case budget == 0:
		return false
	case budget > 0:
		if c.memHeld+n > budget {
			return false
		}
	default:
		// Half of what the host could use: the copies held count, as
		// each copy lowers what the kernel reports available.
		if c.memHeld+n > (memAvailable()+c.memHeld)/2 {
			return false
		}
	}
	c.memHeld += n
	return true
}

func (c *Coordinator) releaseMem(n int64) {
	c.memMu.Lock()
	c.memHeld -= n
	c.memMu.Unlock()
}

// MemoryHeld is what the fuse journals' copies hold in host memory now.
func (c *Coordinator) MemoryHeld() int64 {
	c.memMu.Lock()
	defer c.memMu.Unlock()
	return c.memHeld
}

// memBytes is what the entry holds in host memory.
func (e journalEntry) memBytes() uint64 {
	var n uint64
	for _, b := range e.mem {
		n += uint64(len(b))
	}
	return n
}

// copyOriginals returns host-memory copies of the bytes refs name, read
// from the model's source file (its mapping, in parallel pieces: nothing
// is read back from the arena, which on a device would be a download) and
// each checked against the load's CRC-32C, or nil when the budget has no
// room or a check fails (the file reference is then the only record; the
// reason is logged).
func (c *Coordinator) copyOriginals(m *registry.Model, w string, refs []sourceRef) [][]byte {
	var n int64
	for _, r := range refs {
		n += r.Length
	}
	if n == 0 || !c.reserveMem(n) {
		return nil
	}
	out := make([][]byte, len(refs))
	for i, r := range refs {
		buf := make([]byte, r.Length)
		crc, err := registry.ReadCRC(0, buf, 0, func(q []byte, off int64) error { return m.ReadSource(r.SourceRef, off, q) })
		if err == nil && crc != r.crc {
			err = fmt.Errorf("tensor %s: CRC-32C %08x in %s, %08x when loaded", r.Tensor, crc, r.File, r.crc)
		}
		if err != nil {
			c.releaseMem(n)
			c.log.Warn("lora journal: no in-memory copy; a restore reads the model file", "model", m.Name, "weight", w, "err", err)
			return nil
		}
		out[i] = buf
	}
	return out
}

// onHost says whether r lies in host-mapped memory (the cpu backend),
// where reads and writes are plain memory copies that parallel pieces
// speed up; a device arena moves bytes through its staging buffer, one
// piece at a time.
func (c *Coordinator) onHost(r arena.Region) bool {
	loc, err := c.mem.Location(r)
	return err == nil && loc.Kind == arena.KindCPU
}

// writeMem writes p over the whole of r: in parallel pieces on a CPU
// arena. A restore is never cancelled half way, so it runs without the
// caller's context.
func (c *Coordinator) writeMem(r arena.Region, p []byte) error {
	if uint64(len(p)) != r.Length {
		return fmt.Errorf("%d bytes kept for a region of %d", len(p), r.Length)
	}
	k := 1
	if c.onHost(r) {
		k = min(runtime.GOMAXPROCS(0), len(p)/(1<<20))
	}
	if k < 2 {
		return c.mem.Write(context.Background(), r, 0, p)
	}
	size := (len(p) + k - 1) / k
	errs := make([]error, k)
	var wg sync.WaitGroup
	for i := range k {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lo, hi := i*size, min((i+1)*size, len(p))
			errs[i] = c.mem.Write(context.Background(), r, uint64(lo), p[lo:hi])
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// copyInArena copies ts's bytes into new arena regions when JournalArena
// has room for them (nil otherwise, or when the arena has no room: the
// reason is logged). The arena holds the loaded bytes (see reference), so
// the copy is what the file references name.
func (c *Coordinator) copyInArena(m *registry.Model, w string, ts []*registry.Tensor) []arena.Region {
	var n int64
	for _, t := range ts {
		n += int64(t.NBytes)
	}
	c.memMu.Lock()
	ok := n > 0 && c.arenaHeld+n <= c.JournalArena
	if ok {
		c.arenaHeld += n
	}
	c.memMu.Unlock()
	if !ok {
		return nil
	}
	e, err := c.saveBytes(m, w, "lora journal copy")
	if err != nil {
		c.releaseArena(n)
		c.log.Warn("lora journal: no arena copy; a restore uses the host-memory copy or the model file", "model", m.Name, "weight", w, "err", err)
		return nil
	}
	return e.saved
}

func (c *Coordinator) releaseArena(n int64) {
	c.memMu.Lock()
	c.arenaHeld -= n
	c.memMu.Unlock()
}

// startFill starts the goroutine that copies the originals of ms's
// journal entries into host memory (fillCopies), unless one runs. The
// caller holds ms.mu.
func (c *Coordinator) startFill(ms *modelState, model string) {
	if ms.filling || c.JournalMemory == 0 {
		return
	}
	ms.filling = true
	go c.fillCopies(ms, model)
}

// fillCopies gives every referenced entry of ms's journal that has no
// copy one, as the budget allows, until none is left that it has not
// tried; then it clears ms.filling (under ms.mu, where startFill checks
// it, so an entry journaled meanwhile is never left without a try).
func (c *Coordinator) fillCopies(ms *modelState, model string) {
	tried := map[*sourceRef]bool{}
	for {
		ms.mu.Lock()
		var w string
		var refs []sourceRef
		for _, k := range slices.Sorted(maps.Keys(ms.journal)) {
			e := ms.journal[k]
			if len(e.refs) > 0 && e.mem == nil && e.saved == nil && !tried[&e.refs[0]] {
				w, refs = k, e.refs
				break
			}
		}
		if refs == nil {
			ms.filling = false
			ms.mu.Unlock()
			return
		}
		ms.mu.Unlock()
		tried[&refs[0]] = true
		var mem [][]byte
		err := c.reg.WriteLocked(model, func(m *registry.Model) error {
			if m != ms.loaded {
				return fmt.Errorf("model %q was reloaded", model)
			}
			mem = c.copyOriginals(m, w, refs)
			return nil
		})
		if err != nil {
			ms.mu.Lock()
			ms.filling = false
			ms.mu.Unlock()
			if mem != nil {
				c.releaseMem(sumLen(mem))
			}
			return
		}
		if mem == nil {
			continue
		}
		ms.mu.Lock()
		if e, ok := ms.journal[w]; ok && len(e.refs) > 0 && &e.refs[0] == &refs[0] && e.mem == nil && e.saved == nil {
			e.mem = mem
			ms.journal[w] = e
			if ms.state.Mode == ModeFuse {
				ms.state.JournalMemoryBytes += e.memBytes()
			}
		} else {
			c.releaseMem(sumLen(mem))
		}
		ms.mu.Unlock()
	}
}

func sumLen(bs [][]byte) int64 {
	var n int64
	for _, b := range bs {
		n += int64(len(b))
	}
	return n
}

// WaitJournalCopies returns once no goroutine is copying the model's
// journal originals into host memory (after a fused apply), or when ctx
// ends. Tests and benchmarks call it; a restore never needs to wait (it
// reads the file for an entry without its copy).
func (c *Coordinator) WaitJournalCopies(ctx context.Context, model string) error {
	ms, err := c.model(modelName(model))
	if err != nil {
		return err
	}
	for {
		ms.mu.Lock()
		busy := ms.filling
		ms.mu.Unlock()
		if !busy {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
}
