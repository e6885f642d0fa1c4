package safetensors

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"unicode/utf8"
)

// WriteTensor is one tensor to write with WriteFile.
type WriteTensor struct {
	Name  string
	DType DType
	Shape []int64
	Data  []byte
}

// EncodeHeader lays out tensors as the reference writer does and returns the
// file prefix (8-byte length plus space-padded JSON header) together with the
// tensors in data-section order, offsets filled in. Begin/End of the input are
// ignored.
//
// The reference rule (safetensors/src/tensor.rs `prepare`): tensors are
// ordered by descending dtype (the Dtype enum's order, so wider types first),
// then by name (byte order); they are packed back to back from offset 0; the
// JSON is compact, "__metadata__" first, then tensors in data order; the
// header is padded with spaces to a multiple of 8 bytes. The reference writes
// metadata in hash-map order, which is random across runs; this writer sorts
// metadata keys, so its output is deterministic and equals the reference's
// whenever there is at most one metadata key. A nil metadata map writes no
// "__metadata__" entry; an empty non-nil map writes "__metadata__":{}.
func EncodeHeader(metadata map[string]string, infos []TensorInfo) ([]byte, []TensorInfo, error) {
	layout := make([]TensorInfo, len(infos))
	seen := make(map[string]bool, len(infos))
	for i, t := range infos {
		if err := checkName(t.Name); err != nil {
			return nil, nil, err
		}
		if seen[t.Name] {
			return nil, nil, fmt.Errorf("tensor %q: duplicate name", t.Name)
		}
		seen[t.Name] = true
		if !t.DType.Valid() {
			return nil, nil, fmt.Errorf("tensor %q: unknown dtype %q", t.Name, t.DType)
		}
		if _, err := nbytes(t.DType, t.Shape); err != nil {
			return nil, nil, fmt.Errorf("tensor %q: shape %v: %w", t.Name, t.Shape, err)
		}
		t.Shape = append([]int64{}, t.Shape...)
		layout[i] = t
	}
	sort.SliceStable(layout, func(i, j int) bool {
		a, b := layout[i], layout[j]
		if ra, rb := a.DType.rank(), b.DType.rank(); ra != rb {
			return ra > rb
		}
		return a.Name < b.Name
	})
	var off int64
	for i := range layout {
		n, _ := nbytes(layout[i].DType, layout[i].Shape)
		layout[i].Begin, layout[i].End = off, off+n
		off += n
	}

	buf := make([]byte, lenSize, lenSize+64*len(layout)+64)
	buf = append(buf, '{')
	first := true
	if metadata != nil {
		keys := make([]string, 0, len(metadata))
		for k, v := range metadata {
			if !utf8.ValidString(k) || !utf8.ValidString(v) {
				return nil, nil, fmt.Errorf("metadata key %q: key and value must be valid UTF-8", k)
			}
			keys = append(keys, k)
		}
		sort.Strings(keys)
		buf = append(buf, `"__metadata__":{`...)
		for i, k := range keys {
			if i > 0 {
				buf = append(buf, ',')
			}
			buf = appendJSONString(buf, k)
			buf = append(buf, ':')
			buf = appendJSONString(buf, metadata[k])
		}
		buf = append(buf, '}')
		first = false
	}
	for _, t := range layout {
		if !first {
			buf = append(buf, ',')
		}
		first = false
		buf = appendJSONString(buf, t.Name)
		buf = append(buf, `:{"dtype":"`...)
		buf = append(buf, t.DType...)
		buf = append(buf, `","shape":[`...)
		for i, d := range t.Shape {
			if i > 0 {
				buf = append(buf, ',')
			}
			buf = strconv.AppendInt(buf, d, 10)
		}
		buf = append(buf, `],"data_offsets":[`...)
		buf = strconv.AppendInt(buf, t.Begin, 10)
		buf = append(buf, ',')
		buf = strconv.AppendInt(buf, t.End, 10)
		buf = append(buf, "]}"...)
	}
	buf = append(buf, '}')
	for (len(buf)-lenSize)%8 != 0 {
		buf = append(buf, ' ')
	}
	n := len(buf) - lenSize
	if n > MaxHeaderSize {
		return nil, nil, fmt.Errorf("header of %d bytes exceeds the %d-byte cap", n, MaxHeaderSize)
	}
	binary.LittleEndian.PutUint64(buf[:lenSize], uint64(n))
	return buf, layout, nil
}

func checkName(name string) error {
	if name == metadataKey {
		return fmt.Errorf("tensor %q: name is reserved for the metadata", name)
	}
	if !utf8.ValidString(name) {
		return fmt.Errorf("tensor %q: name is not valid UTF-8", name)
	}
	return nil
}

// appendJSONString quotes s as serde_json does: only '"', '\\' and control
// characters are escaped (\b \t \n \f \r, others \u00xx in lower-case hex);
// everything else, non-ASCII included, is written as is.
func appendJSONString(buf []byte, s string) []byte {
	const hex = "0123456789abcdef"
	buf = append(buf, '"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"':
			buf = append(buf, '\\', '"')
		case c == '\\':
			buf = append(buf, '\\', '\\')
		case c == '\b':
			buf = append(buf, '\\', 'b')
		case c == '\t':
			buf = append(buf, '\\', 't')
		case c == '\n':
			buf = append(buf, '\\', 'n')
		case c == '\f':
			buf = append(buf, '\\', 'f')
		case c == '\r':
			buf = append(buf, '\\', 'r')
		case c < 0x20:
			buf = append(buf, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
		default:
			buf = append(buf, c)
		}
	}
	return append(buf, '"')
}

// Writer streams a safetensors file: NewWriter writes the header, then each
// tensor's bytes follow with WriteTensor, in layout order. Nothing is held in
// memory beyond the header, so outputs may be larger than memory.
type Writer struct {
	w      io.Writer
	layout []TensorInfo
	next   int
	err    error
}

// NewWriter lays out infos (see EncodeHeader; their offsets are ignored) and
// writes the header to w.
func NewWriter(w io.Writer, metadata map[string]string, infos []TensorInfo) (*Writer, error) {
	prefix, layout, err := EncodeHeader(metadata, infos)
	if err != nil {
		return nil, fmt.Errorf("encode safetensors header: %w", err)
	}
	if _, err := w.Write(prefix); err != nil {
		return nil, fmt.Errorf("write safetensors header: %w", err)
	}
	return &Writer{w: w, layout: layout}, nil
}

// Layout returns the tensors in the order WriteTensor expects them, with
// their data-section offsets.
func (w *Writer) Layout() []TensorInfo { return w.layout }

// Next returns the tensor WriteTensor expects next; false when all are written.
func (w *Writer) Next() (TensorInfo, bool) {
	if w.next >= len(w.layout) {
		return TensorInfo{}, false
	}
	return w.layout[w.next], true
}

// WriteTensor writes the bytes of the next tensor in layout order.
func (w *Writer) WriteTensor(name string, data []byte) error {
	if w.err != nil {
		return w.err
	}
	t, ok := w.Next()
	if !ok {
		return fmt.Errorf("write tensor %q: all %d tensors already written", name, len(w.layout))
	}
	if t.Name != name {
		return fmt.Errorf("write tensor %q: layout order expects tensor %q next", name, t.Name)
	}
	if int64(len(data)) != t.End-t.Begin {
		return fmt.Errorf("write tensor %q: %d bytes but shape %v of %s needs %d", name, len(data), t.Shape, t.DType, t.End-t.Begin)
	}
	if _, err := w.w.Write(data); err != nil {
		w.err = fmt.Errorf("write tensor %q: %w", name, err)
		return w.err
	}
	w.next++
	return nil
}

// Close checks that every tensor was written. It does not close the
// underlying io.Writer.
func (w *Writer) Close() error {
	if w.err != nil {
		return w.err
	}
	if t, ok := w.Next(); ok {
		return fmt.Errorf("close safetensors writer: tensor %q and %d more not written", t.Name, len(w.layout)-w.next-1)
	}
	return nil
}

// FileWriter writes a safetensors file atomically: the bytes go to a
// temporary file next to the destination, which Commit renames into place.
// Until Commit the destination is untouched.
type FileWriter struct {
	*Writer
	path string
	tmp  *os.File
	bw   *bufio.Writer
	done bool
}

// Create starts an atomic write of path with the given tensors (see
// EncodeHeader). Call WriteTensor for each tensor in Layout order, then
// Commit, or Abort to discard.
func Create(path string, metadata map[string]string, infos []TensorInfo) (*FileWriter, error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	bw := bufio.NewWriterSize(tmp, 1<<20)
	w, err := NewWriter(bw, metadata, infos)
	if err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	return &FileWriter{Writer: w, path: path, tmp: tmp, bw: bw}, nil
}

// Commit flushes, syncs and renames the temporary file to the destination.
// On error the temporary file is removed and the destination is untouched.
func (fw *FileWriter) Commit() error {
	if fw.done {
		return fmt.Errorf("commit %s: already committed or aborted", fw.path)
	}
	err := fw.Writer.Close()
	if err == nil {
		err = fw.bw.Flush()
	}
	if err == nil {
		err = fw.tmp.Chmod(0o644)
	}
	if err == nil {
		err = fw.tmp.Sync()
	}
	if cerr := fw.tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(fw.tmp.Name(), fw.path)
	}
	fw.done = true
	if err != nil {
		os.Remove(fw.tmp.Name())
		return fmt.Errorf("write %s: %w", fw.path, err)
	}
	return nil
}

// Abort discards the temporary file. It is a no-op after Commit.
func (fw *FileWriter) Abort() error {
	if fw.done {
		return nil
	}
	fw.done = true
	fw.tmp.Close()
	if err := os.Remove(fw.tmp.Name()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("abort %s: %w", fw.path, err)
	}
	return nil
}

// WriteFile writes tensors to path atomically (temporary file and rename).
// Each tensor's Data must hold exactly product(Shape)*DType.Size() bytes.
func WriteFile(path string, metadata map[string]string, tensors []WriteTensor) error {
	infos := make([]TensorInfo, len(tensors))
	byName := make(map[string][]byte, len(tensors))
	for i, t := range tensors {
		infos[i] = TensorInfo{Name: t.Name, DType: t.DType, Shape: t.Shape}
		byName[t.Name] = t.Data
	}
	fw, err := Create(path, metadata, infos)
	if err != nil {
		return err
	}
	for _, t := range fw.Layout() {
		if err := fw.WriteTensor(t.Name, byName[t.Name]); err != nil {
			fw.Abort()
			return fmt.Errorf("write %s: %w", path, err)
		}
	}
	return fw.Commit()
}
