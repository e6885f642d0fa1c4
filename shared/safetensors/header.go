package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"unicode/utf8"
)

// MaxHeaderSize caps the JSON header length, as the reference reader does
// (safetensors/src/tensor.rs MAX_HEADER_SIZE = 100_000_000): a file the
// reference rejects for its header size is rejected here too.
const MaxHeaderSize = 100_000_000

// lenSize is the size of the little-endian header length that opens a file.
const lenSize = 8

// metadataKey is the reserved header key holding the string→string metadata.
const metadataKey = "__metadata__"

// TensorInfo describes one stored tensor. Begin and End are byte offsets
// relative to the start of the data section.
type TensorInfo struct {
	Name  string
	DType DType
	Shape []int64
	Begin int64
	End   int64
}

// NumElements returns the product of the shape (1 for a 0-d tensor).
func (t TensorInfo) NumElements() int64 {
	n := int64(1)
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// NBytes returns the size the shape and dtype call for.
func (t TensorInfo) NBytes() int64 { return t.NumElements() * int64(t.DType.Size()) }

// Header is a parsed and validated safetensors header.
type Header struct {
	// Metadata is the __metadata__ object; nil when the header has none
	// (which differs from an empty object when the file is written back).
	Metadata map[string]string
	// Tensors are sorted by Begin (then End); together they cover the data
	// section exactly.
	Tensors []TensorInfo
	// HeaderLen is the stored header length, padding included.
	HeaderLen int64
	// DataStart is the file offset of the data section (8 + HeaderLen).
	DataStart int64
	// DataLen is the size of the data section.
	DataLen int64

	index map[string]int
}

// Lookup returns the tensor called name.
func (h *Header) Lookup(name string) (TensorInfo, bool) {
	i, ok := h.index[name]
	if !ok {
		return TensorInfo{}, false
	}
	return h.Tensors[i], true
}

// Error reports a malformed or unreadable safetensors file. File is the name
// given to the parser; Key is the header key at fault (a tensor name or
// "__metadata__"), empty for file-level problems.
type Error struct {
	File string
	Key  string
	Err  error
}

func (e *Error) Error() string {
	if e.Key != "" {
		return fmt.Sprintf("%s: key %q: %v", e.File, e.Key, e.Err)
	}
	return fmt.Sprintf("%s: %v", e.File, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// ParseHeader reads and validates the header of a safetensors file of
// fileSize bytes. name is used only in error messages. Every check of the
// reference reader is applied, plus: no duplicate keys anywhere in the header
// and no unknown fields in a tensor entry.
func ParseHeader(name string, r io.ReaderAt, fileSize int64) (*Header, error) {
	fail := func(key string, format string, args ...any) (*Header, error) {
		return nil, &Error{File: name, Key: key, Err: fmt.Errorf(format, args...)}
	}
	if fileSize < lenSize {
		return fail("", "file is %d bytes, too short for the 8-byte header length", fileSize)
	}
	var lenBuf [lenSize]byte
	if _, err := r.ReadAt(lenBuf[:], 0); err != nil {
		return nil, &Error{File: name, Err: fmt.Errorf("read header length: %w", err)}
	}
	n := binary.LittleEndian.Uint64(lenBuf[:])
	if n > MaxHeaderSize {
		return fail("", "header length %d exceeds the %d-byte cap", n, MaxHeaderSize)
	}
	if int64(n) > fileSize-lenSize {
		return fail("", "header length %d runs past the end of the file (%d bytes after the length field)", n, fileSize-lenSize)
	}
	buf := make([]byte, n)
	if _, err := r.ReadAt(buf, lenSize); err != nil {
		return nil, &Error{File: name, Err: fmt.Errorf("read header: %w", err)}
	}
	h, err := parseJSON(buf)
	if err != nil {
		key := ""
		var ke *keyError
		if errors.As(err, &ke) {
			key, err = ke.key, ke.err
		}
		var syn *json.SyntaxError
		if errors.As(err, &syn) {
			err = fmt.Errorf("%w (near header byte %d)", err, syn.Offset)
		}
		return nil, &Error{File: name, Key: key, Err: err}
	}
	h.HeaderLen = int64(n)
	h.DataStart = lenSize + int64(n)
	h.DataLen = fileSize - h.DataStart
	if err := h.validate(); err != nil {
		var ke *keyError
		if errors.As(err, &ke) {
			return nil, &Error{File: name, Key: ke.key, Err: ke.err}
		}
		return nil, &Error{File: name, Err: err}
	}
	return h, nil
}

// keyError carries the key at fault up to ParseHeader.
type keyError struct {
	key string
	err error
}

func (e *keyError) Error() string { return fmt.Sprintf("key %q: %v", e.key, e.err) }

func keyErr(key, format string, args ...any) error {
	return &keyError{key: key, err: fmt.Errorf(format, args...)}
}

// parseJSON walks the header JSON token by token: encoding/json's map
// decoding would silently keep the last of duplicate keys.
func parseJSON(buf []byte) (*Header, error) {
	if !utf8.Valid(buf) {
		return nil, errors.New("header is not valid UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(buf))
	dec.UseNumber()
	if err := expectDelim(dec, '{'); err != nil {
		return nil, fmt.Errorf("header JSON: must be an object: %w", err)
	}
	h := &Header{index: map[string]int{}}
	seenMeta := false
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("header JSON: %w", err)
		}
		key, ok := tok.(string)
		if !ok {
			return nil, fmt.Errorf("header JSON: object key %v is not a string", tok)
		}
		if key == metadataKey {
			if seenMeta {
				return nil, keyErr(key, "duplicate key")
			}
			seenMeta = true
			if h.Metadata, err = parseMetadata(dec); err != nil {
				return nil, err
			}
			continue
		}
		if _, dup := h.index[key]; dup {
			return nil, keyErr(key, "duplicate key")
		}
		t, err := parseTensor(dec, key)
		if err != nil {
			return nil, err
		}
		h.index[key] = len(h.Tensors)
		h.Tensors = append(h.Tensors, t)
	}
	if err := expectDelim(dec, '}'); err != nil {
		return nil, fmt.Errorf("header JSON: %w", err)
	}
	if tok, err := dec.Token(); err != io.EOF {
		if err != nil {
			return nil, fmt.Errorf("header JSON: after the object: %w", err)
		}
		return nil, fmt.Errorf("header JSON: unexpected %v after the object", tok)
	}
	return h, nil
}

func expectDelim(dec *json.Decoder, want json.Delim) error {
	tok, err := dec.Token()
	if err != nil {
		if err == io.EOF {
			return fmt.Errorf("expected %q, found end of header", want)
		}
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != want {
		return fmt.Errorf("expected %q, found %s", want, describe(tok))
	}
	return nil
}

func describe(tok json.Token) string {
	switch v := tok.(type) {
	case json.Delim:
		return strconv.Quote(string(v))
	case string:
		return "string " + strconv.Quote(v)
	case json.Number:
		return "number " + string(v)
	case nil:
		return "null"
	default:
		return fmt.Sprintf("%v", v)
	}
}

// parseMetadata reads the __metadata__ value: null or a string→string object.
func parseMetadata(dec *json.Decoder) (map[string]string, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, keyErr(metadataKey, "%w", err)
	}
	if tok == nil {
		return nil, nil
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, keyErr(metadataKey, "must be an object of strings, found %s", describe(tok))
	}
	m := map[string]string{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, keyErr(metadataKey, "%w", err)
		}
		k := tok.(string) // object keys are always strings
		if _, dup := m[k]; dup {
			return nil, keyErr(metadataKey, "duplicate metadata key %q", k)
		}
		tok, err = dec.Token()
		if err != nil {
			return nil, keyErr(metadataKey, "metadata key %q: %w", k, err)
		}
		v, ok := tok.(string)
		if !ok {
			return nil, keyErr(metadataKey, "metadata key %q: value must be a string, found %s", k, describe(tok))
		}
		m[k] = v
	}
	if err := expectDelim(dec, '}'); err != nil {
		return nil, keyErr(metadataKey, "%w", err)
	}
	return m, nil
}

// parseTensor reads one tensor entry: {"dtype":…, "shape":[…], "data_offsets":[b,e]}.
func parseTensor(dec *json.Decoder, name string) (TensorInfo, error) {
	t := TensorInfo{Name: name}
	tok, err := dec.Token()
	if err != nil {
		return t, keyErr(name, "%w", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return t, keyErr(name, "tensor entry must be an object, found %s", describe(tok))
	}
	var haveDType, haveShape, haveOffsets bool
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return t, keyErr(name, "%w", err)
		}
		field := tok.(string)
		switch field {
		case "dtype":
			if haveDType {
				return t, keyErr(name, "duplicate field \"dtype\"")
			}
			haveDType = true
			tok, err := dec.Token()
			if err != nil {
				return t, keyErr(name, "dtype: %w", err)
			}
			s, ok := tok.(string)
			if !ok {
				return t, keyErr(name, "dtype must be a string, found %s", describe(tok))
			}
			if t.DType, err = ParseDType(s); err != nil {
				return t, keyErr(name, "%w", err)
			}
		case "shape":
			if haveShape {
				return t, keyErr(name, "duplicate field \"shape\"")
			}
			haveShape = true
			if t.Shape, err = parseInts(dec, name, "shape"); err != nil {
				return t, err
			}
		case "data_offsets":
			if haveOffsets {
				return t, keyErr(name, "duplicate field \"data_offsets\"")
			}
			haveOffsets = true
			offs, err := parseInts(dec, name, "data_offsets")
			if err != nil {
				return t, err
			}
			if len(offs) != 2 {
				return t, keyErr(name, "data_offsets must be [begin, end], found %d numbers", len(offs))
			}
			t.Begin, t.End = offs[0], offs[1]
		default:
			return t, keyErr(name, "unknown field %q in tensor entry", field)
		}
	}
	if err := expectDelim(dec, '}'); err != nil {
		return t, keyErr(name, "%w", err)
	}
	switch {
	case !haveDType:
		return t, keyErr(name, "missing field \"dtype\"")
	case !haveShape:
		return t, keyErr(name, "missing field \"shape\"")
	case !haveOffsets:
		return t, keyErr(name, "missing field \"data_offsets\"")
	}
	if t.Shape == nil {
		t.Shape = []int64{}
	}
	return t, nil
}

// parseInts reads an array of non-negative integers (JSON numbers with no
// sign, fraction or exponent, as the reference's usize fields require).
func parseInts(dec *json.Decoder, name, field string) ([]int64, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, keyErr(name, "%s: %w", field, err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '[' {
		return nil, keyErr(name, "%s must be an array of non-negative integers, found %s", field, describe(tok))
	}
	var out []int64
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, keyErr(name, "%s: %w", field, err)
		}
		num, ok := tok.(json.Number)
		if !ok {
			return nil, keyErr(name, "%s must be an array of non-negative integers, found %s", field, describe(tok))
		}
		v, err := parseUint(string(num))
		if err != nil {
			return nil, keyErr(name, "%s: %w", field, err)
		}
		out = append(out, v)
	}
	if err := expectDelim(dec, ']'); err != nil {
		return nil, keyErr(name, "%s: %w", field, err)
	}
	return out, nil
}

func parseUint(s string) (int64, error) {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("%s is not a non-negative integer", s)
		}
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s is out of range", s)
	}
	return v, nil
}

// validate checks sizes and the layout of the data section, as the reference
// reader does: sorted by offsets, the tensors must tile the data section from
// 0 to its end with no gap and no overlap.
func (h *Header) validate() error {
	for _, t := range h.Tensors {
		if t.End < t.Begin {
			return keyErr(t.Name, "data_offsets [%d, %d]: end before begin", t.Begin, t.End)
		}
		if t.End > h.DataLen {
			return keyErr(t.Name, "data_offsets [%d, %d] run past the end of the data section (%d bytes; file truncated?)", t.Begin, t.End, h.DataLen)
		}
		want, err := nbytes(t.DType, t.Shape)
		if err != nil {
			return keyErr(t.Name, "shape %v: %w", t.Shape, err)
		}
		if got := t.End - t.Begin; got != want {
			return keyErr(t.Name, "shape %v of %s needs %d bytes but data_offsets [%d, %d] hold %d", t.Shape, t.DType, want, t.Begin, t.End, got)
		}
	}
	sort.SliceStable(h.Tensors, func(i, j int) bool {
		a, b := h.Tensors[i], h.Tensors[j]
		if a.Begin != b.Begin {
			return a.Begin < b.Begin
		}
		return a.End < b.End
	})
	var pos int64
	prev := ""
	for i, t := range h.Tensors {
		h.index[t.Name] = i
		switch {
		case t.Begin < pos:
			return keyErr(t.Name, "data_offsets [%d, %d] overlap tensor %q, which ends at %d", t.Begin, t.End, prev, pos)
		case t.Begin > pos:
			return keyErr(t.Name, "data_offsets [%d, %d] leave a gap: bytes [%d, %d) of the data section belong to no tensor", t.Begin, t.End, pos, t.Begin)
		}
		pos = t.End
		prev = t.Name
	}
	if pos != h.DataLen {
		return fmt.Errorf("data section is %d bytes but the tensors end at %d: %d unclaimed trailing bytes", h.DataLen, pos, h.DataLen-pos)
	}
	return nil
}

// nbytes is product(shape)*size with overflow checks.
func nbytes(d DType, shape []int64) (int64, error) {
	n := int64(1)
	for _, s := range shape {
		if s < 0 {
			return 0, fmt.Errorf("negative dimension %d", s)
		}
		if s != 0 && n > math.MaxInt64/s {
			return 0, errors.New("element count overflows int64")
		}
		n *= s
	}
	size := int64(d.Size())
	if size == 0 {
		return 0, fmt.Errorf("unknown dtype %q", d)
	}
	if n > math.MaxInt64/size {
		return 0, errors.New("byte size overflows int64")
	}
	return n * size, nil
}
