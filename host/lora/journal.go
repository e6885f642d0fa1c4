package lora

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"sync"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/registry"
)

// The fuse journal keeps each fused weight's original bytes (packed codes,
// absmax, nested_absmax; a bundled text encoder's plain weight, its one
// tensor) until remove. For a model loaded from a
// safetensors file those bytes are already in the file, which the registry
// keeps mapped for the model's lifetime: the journal then records where
// they lie (a registry.SourceRef) and their CRC-32C instead of copying them
// into the arena.
//
// The CRC is the one the registry took while loading the tensor
// (Tensor.LoadCRC): a weight is journaled before the plugin first writes
// it, and this journal is the only writer of model tensors, so an
// unjournaled weight holds its loaded bytes and taking a reference reads
// nothing back from the arena (a download on a device arena). Nor does it
// read the file while the file is unchanged since the load
// (Model.SourceUnchanged: same inode, size and times); otherwise the
// file's bytes are checksummed and, if they differ from what was loaded,
// the journal copies the weight into host arena regions instead. That copy
// is also the fallback for a model that holds no source file.
//
// A restore writes the weight's copy when the journal keeps one
// (journalmem.go: in host memory or in the arena, within their budgets);
// otherwise it writes the file's bytes with the arena (one host copy on a
// device arena) and checks their CRC as it goes; when the file has changed
// since the load it first checks every reference, so a file modified in
// place is refused, naming the file and tensor, with the weights as they
// were.

// castagnoli is CRC-32C, which the hardware computes on amd64 and arm64.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// chunkBytes bounds the host buffer a checksum or a restore goes through.
const chunkBytes = 1 << 20

var chunks = sync.Pool{New: func() any { b := make([]byte, chunkBytes); return &b }}

// sourceRef is one journaled tensor referenced in the model's file.
type sourceRef struct {
	registry.SourceRef
	crc uint32 // CRC-32C of the bytes when journaled
}

// journalEntry keeps the bytes the fused pass rewrites in one weight
// (journaled: packed codes, absmax and, when nested, nested_absmax):
// copies in host arena regions, or references into the model's source
// file.
type journalEntry struct {
	saved []arena.Region // arena copies, in journaled order; nil when referenced
	refs  []sourceRef    // the same tensors in the file; nil for arena copies
	// mem, beside refs when the budget allowed, holds the same tensors'
	// original bytes in host memory: a restore writes them instead of
	// reading the file (journalmem.go).
	mem [][]byte
}

// journaled lists the tensors of qw the fused pass rewrites, in the order
// an entry keeps them. The nested_quant_map and the quant-state JSON
// (nested_offset included) are never rewritten: the pass re-encodes
// nested absmax around the stored offset with the stored map.
func journaled(qw *registry.QuantWeight) []*registry.Tensor {
	ts := []*registry.Tensor{qw.Packed, qw.Absmax}
	if qw.State.Nested {
		ts = append(ts, qw.NestedAbsmax)
	}
	return ts
}

// referenced reports whether the entry points into the source file.
func (e journalEntry) referenced() bool { return e.refs != nil }

// arenaBytes is what the entry holds in the arena.
func (e journalEntry) arenaBytes() uint64 {
	var n uint64
	for _, r := range e.saved {
		n += r.Length
	}
	return n
}

// fileBytes is what the entry references in the source file.
func (e journalEntry) fileBytes() uint64 {
	var n uint64
	for _, r := range e.refs {
		n += uint64(r.Length)
	}
	return n
}

// errNoSource: the model holds no source file for the tensor.
var errNoSource = errors.New("no source file")

// journal saves weight w's original bytes before its first fuse: a file
// reference when the model's source file holds exactly the bytes the arena
// holds, an arena copy otherwise (logged when the file was there but
// differed).
func (c *Coordinator) journal(m *registry.Model, w string) (journalEntry, error) {
	ts, err := journaledOf(m, w)
	if err != nil {
		return journalEntry{}, err
	}
	refs, err := c.reference(m, ts)
	if err == nil {
		// The in-memory copy is taken after the apply, in the background
		// (startFill), so that it costs the apply nothing.
		return journalEntry{refs: refs, saved: c.copyInArena(m, w, ts)}, nil
	}
	if !errors.Is(err, errNoSource) {
		c.log.Warn("lora journal: original bytes copied into the arena instead of referenced in the model file", "model", m.Name, "weight", w, "err", err)
	}
	return c.saveBytes(m, w, "lora journal")
}

// reference returns file references to ts, whose bytes are the ones the
// load wrote (see above), each with the load's CRC-32C; it checksums the
// file only when the file changed since the load, and fails if the file's
// bytes differ.
func (c *Coordinator) reference(m *registry.Model, ts []*registry.Tensor) ([]sourceRef, error) {
	unchanged := m.SourceUnchanged()
	out := make([]sourceRef, 0, len(ts))
	for _, t := range ts {
		ref, ok := m.SourceOf(t.Name)
		if !ok {
			return nil, fmt.Errorf("tensor %s: %w", t.Name, errNoSource)
		}
		if uint64(ref.Length) != t.NBytes {
			return nil, fmt.Errorf("tensor %s: %d bytes in %s, %d in the arena", t.Name, ref.Length, ref.File, t.NBytes)
		}
		if !unchanged {
			inFile, err := sourceCRC(m, ref)
			if err != nil {
				return nil, err
			}
			if inFile != t.LoadCRC() {
				return nil, fmt.Errorf("tensor %s: CRC-32C %08x when loaded but %08x in %s now", t.Name, t.LoadCRC(), inFile, ref.File)
			}
		}
		out = append(out, sourceRef{SourceRef: ref, crc: t.LoadCRC()})
	}
	return out, nil
}

// sourceCRC checksums ref's bytes as the source file holds them now.
func sourceCRC(m *registry.Model, ref registry.SourceRef) (uint32, error) {
	bp := chunks.Get().(*[]byte)
	defer chunks.Put(bp)
	var crc uint32
	for off := int64(0); off < ref.Length; {
		p := (*bp)[:min(int64(len(*bp)), ref.Length-off)]
		if err := m.ReadSource(ref, off, p); err != nil {
			return 0, err
		}
		crc = crc32.Update(crc, castagnoli, p)
		off += int64(len(p))
	}
	return crc, nil
}

// verify checks that the source file still holds the bytes e references:
// at once when the file is unchanged since the load, else by reading them.
func verify(m *registry.Model, w string, e journalEntry) error {
	if m.SourceUnchanged() || (e.mem != nil && len(e.mem) == len(e.refs)) || e.saved != nil {
		return nil // a copy in memory or in the arena does not depend on the file
	}
	for _, r := range e.refs {
		got, err := sourceCRC(m, r.SourceRef)
		if err != nil {
			return fmt.Errorf("weight %s: %w", w, err)
		}
		if got != r.crc {
			return fmt.Errorf("weight %s: tensor %s: the model file %s changed since it was loaded (CRC-32C %08x, journaled %08x): its original bytes are lost, so the weight keeps the bytes it has", w, r.Tensor, r.File, got, r.crc)
		}
	}
	return nil
}

// journaledOf lists the tensors of weight w of m the fused pass rewrites,
// in the order an entry keeps them: a 4-bit weight's (journaled), or a
// bundled text encoder's plain weight itself (denseWeight), whose values
// the pass rewrites in their dtype.
func journaledOf(m *registry.Model, w string) ([]*registry.Tensor, error) {
	if t, ok := denseWeight(m, w); ok {
		return []*registry.Tensor{t}, nil
	}
	qw, err := fusable(m, w)
	if err != nil {
		return nil, err
	}
	return journaled(qw), nil
}

// fusable returns weight w of m if the fused pass can rewrite it.
func fusable(m *registry.Model, w string) (*registry.QuantWeight, error) {
	qw, ok := m.Weight(w)
	if !ok {
		return nil, fmt.Errorf("model %q: 4-bit weight (or plain text-encoder weight) %s: %w", m.Name, w, registry.ErrNotFound)
	}
	if qw.State.Nested && qw.NestedAbsmax == nil {
		return nil, fmt.Errorf("weight %s: nested absmax without a nested_absmax tensor: %w", w, ErrUnsupported)
	}
	return qw, nil
}

// saveBytes copies the current bytes of weight w's journaled tensors into
// new host regions (the journal's fallback). On error it holds nothing.
func (c *Coordinator) saveBytes(m *registry.Model, w, what string) (journalEntry, error) {
	ts, err := journaledOf(m, w)
	if err != nil {
		return journalEntry{}, err
	}
	var e journalEntry
	for _, t := range ts {
		r, err := c.mem.Alloc(arena.HostOwner, what+" "+t.Name, t.NBytes)
		if err == nil {
			if err = c.mem.Copy(r, t.Region); err != nil {
				_ = c.mem.Free(r)
			}
		}
		if err != nil {
			c.freeEntry(e)
			return journalEntry{}, fmt.Errorf("%s %s: %w", what, t.Name, err)
		}
		e.saved = append(e.saved, r)
	}
	return e, nil
}

// putBack writes saved bytes back into weight w: a region copy for arena
// entries; for file references, the file's bytes once their CRC is checked
// (a mismatch writes nothing), checked again as they are written.
func (c *Coordinator) putBack(m *registry.Model, w string, e journalEntry) error {
	return c.putBackChecked(m, w, e, false)
}

// putBackChecked is putBack; verified says the caller checked e's file
// references just before (restore), so they are only checked as written.
func (c *Coordinator) putBackChecked(m *registry.Model, w string, e journalEntry, verified bool) error {
	ts, err := journaledOf(m, w)
	if err != nil {
		return err
	}
	if e.referenced() && e.saved == nil {
		if len(e.refs) != len(ts) {
			return fmt.Errorf("weight %s: %d journaled tensors for %d", w, len(e.refs), len(ts))
		}
		for i, t := range ts {
			if uint64(e.refs[i].Length) != t.NBytes {
				return fmt.Errorf("weight %s: tensor %s: %d journaled bytes for %d", w, t.Name, e.refs[i].Length, t.NBytes)
			}
		}
		if len(e.mem) == len(ts) {
			// The in-memory copy, checked against the load's CRC when taken,
			// holds exactly the bytes the references name, and is not the
			// file: a changed file does not matter to it.
			for i, t := range ts {
				if err := c.writeMem(t.Region, e.mem[i]); err != nil {
					return fmt.Errorf("weight %s: put back tensor %s from its in-memory copy: %w", w, t.Name, err)
				}
			}
			return nil
		}
		if !verified {
			if err := verify(m, w, e); err != nil {
				return err
			}
		}
		for i, t := range ts {
			if err := c.writeSource(m, t.Region, e.refs[i]); err != nil {
				return fmt.Errorf("weight %s: put back tensor %s: %w", w, t.Name, err)
			}
		}
		return nil
	}
	if len(e.saved) != len(ts) {
		return fmt.Errorf("weight %s: %d saved tensors for %d", w, len(e.saved), len(ts))
	}
	for i, t := range ts {
		r := e.saved[i]
		if r.Length != t.NBytes {
			return fmt.Errorf("weight %s: tensor %s: %d saved bytes for %d", w, t.Name, r.Length, t.NBytes)
		}
		if err := c.mem.Copy(t.Region, r); err != nil {
			return fmt.Errorf("weight %s: put back tensor %s: %w", w, t.Name, err)
		}
	}
	return nil
}

// writeSource copies ref's bytes from the source file into dst with the
// arena's WriteFrom (straight into host-mapped memory; through the staging
// buffer, one host copy, on a device) and checks the CRC of what it
// copied. A restore is never cancelled half way, so it runs without the
// caller's context.
func (c *Coordinator) writeSource(m *registry.Model, dst arena.Region, ref sourceRef) error {
	src := &sourceReader{m: m, ref: ref.SourceRef}
	if err := c.mem.WriteFrom(context.Background(), dst, 0, src, 0, ref.Length); err != nil {
		return err
	}
	if src.next != ref.Length {
		return fmt.Errorf("tensor %s: %d of its %d bytes read back from %s", ref.Tensor, src.next, ref.Length, ref.File)
	}
	if src.crc != ref.crc {
		return fmt.Errorf("the model file %s changed while tensor %s was read back (CRC-32C %08x, journaled %08x)", ref.File, ref.Tensor, src.crc, ref.crc)
	}
	return nil
}

// sourceReader reads one tensor out of the model's source file, from its
// first byte, in order (as WriteFrom reads), checksumming what it reads.
type sourceReader struct {
	m    *registry.Model
	ref  registry.SourceRef
	next int64 // the tensor offset the next read must start at
	crc  uint32
}

func (s *sourceReader) ReadAt(p []byte, off int64) (int, error) {
	if off != s.next {
		return 0, fmt.Errorf("read source %s: tensor %s: read at %d, want %d (in order)", s.ref.File, s.ref.Tensor, off, s.next)
	}
	n := min(int64(len(p)), s.ref.Length-off)
	if n <= 0 {
		return 0, io.EOF
	}
	// The file's mapping is read, and checksummed, in parallel pieces.
	crc, err := registry.ReadCRC(s.crc, p[:n], off, func(q []byte, o int64) error { return s.m.ReadSource(s.ref, o, q) })
	if err != nil {
		return 0, err
	}
	s.crc = crc
	s.next += n
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

func (c *Coordinator) freeEntry(e journalEntry) {
	for _, r := range e.saved {
		_ = c.mem.Free(r)
	}
	if e.referenced() && len(e.saved) > 0 {
		c.releaseArena(int64(e.arenaBytes()))
	}
	if n := e.memBytes(); n > 0 {
		c.releaseMem(int64(n))
	}
}

// journalBytes returns what the model's journal holds in the arena, what
// it references in the model's file, and what of that it keeps a copy of
// in host memory.
func journalBytes(ms *modelState) (inArena, inFile, inMemory uint64) {
	for _, e := range ms.journal {
		inArena += e.arenaBytes()
		inFile += e.fileBytes()
		inMemory += e.memBytes()
	}
	return inArena, inFile, inMemory
}

// restoreAll puts every journaled weight back under the model's write
// lock and frees the journal: the model holds its original bytes again.
// File references are all checked before anything is written, so a model
// file modified in place fails the whole restore with every weight as it
// was.
func (c *Coordinator) restoreAll(ms *modelState) error {
	err := c.reg.WriteLocked(ms.state.Model, func(m *registry.Model) error {
		return c.restore(m, ms.journal)
	})
	if err != nil {
		return err
	}
	for w, e := range ms.journal {
		c.freeEntry(e)
		delete(ms.journal, w)
	}
	return nil
}

// restore puts back every weight of entries, checking every file
// reference first when the file changed since the load (verifyAll).
func (c *Coordinator) restore(m *registry.Model, entries map[string]journalEntry) error {
	if err := c.verifyAll(m, entries); err != nil {
		return err
	}
	return c.putBackAll(m, entries)
}

// verifyAll checks every file reference of entries (verify).
func (c *Coordinator) verifyAll(m *registry.Model, entries map[string]journalEntry) error {
	if m.SourceUnchanged() {
		return nil
	}
	var errs []error
	for w, e := range entries {
		errs = append(errs, verify(m, w, e))
	}
	return errors.Join(errs...)
}

// putBackAll puts back every weight of entries whose references were just
// verified (verifyAll).
func (c *Coordinator) putBackAll(m *registry.Model, entries map[string]journalEntry) error {
	var errs []error
	for w, e := range entries {
		errs = append(errs, c.putBackChecked(m, w, e, true))
	}
	return errors.Join(errs...)
}
