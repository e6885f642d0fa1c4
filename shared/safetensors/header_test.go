package safetensors

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/bad and the fuzz seed corpus from the builders")

// rawFile builds a file from a header text (stored verbatim, length field =
// its length) and a data section.
func rawFile(header string, data []byte) []byte {
	b := make([]byte, 8, 8+len(header)+len(data))
	binary.LittleEndian.PutUint64(b, uint64(len(header)))
	b = append(b, header...)
	return append(b, data...)
}

func zeros(n int) []byte { return make([]byte, n) }

// badCase is one malformed file of the corpus under testdata/bad.
type badCase struct {
	file string   // name under testdata/bad
	data []byte   // the file's bytes
	key  string   // the key the error must name ("" for file-level errors)
	msg  []string // substrings the message must contain
}

func badCases() []badCase {
	withLen := func(n uint64, rest string) []byte {
		b := make([]byte, 8)
		binary.LittleEndian.PutUint64(b, n)
		return append(b, rest...)
	}
	return []badCase{
		{"truncated.safetensors", rawFile(`{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}}`, zeros(40)),
			"w", []string{"run past the end of the data section (40 bytes; file truncated?)"}},
		{"header_past_eof.safetensors", withLen(4096, `{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`+"\x00"),
			"", []string{"header length 4096 runs past the end of the file"}},
		{"huge_header.safetensors", withLen(MaxHeaderSize+1, `{}`),
			"", []string{"header length 100000001 exceeds the 100000000-byte cap"}},
		{"overlap.safetensors", rawFile(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}`, zeros(12)),
			"b", []string{`overlap tensor "a"`}},
		{"size_mismatch.safetensors", rawFile(`{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}`, zeros(8)),
			"w", []string{"shape [3] of F32 needs 12 bytes but data_offsets [0, 8] hold 8"}},
		{"unknown_dtype.safetensors", rawFile(`{"w":{"dtype":"F13","shape":[1],"data_offsets":[0,1]}}`, zeros(1)),
			"w", []string{`unknown dtype "F13"`}},
		{"bad_json.safetensors", rawFile(`{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}`, zeros(4)),
			"", []string{"header JSON"}},
		{"bad_json_syntax.safetensors", rawFile(`{"w":{"dtype":"F32" "shape":[1]}}`, nil),
			"w", []string{"invalid character"}},
		{"duplicate_key.safetensors", rawFile(`{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}`, zeros(2)),
			"w", []string{"duplicate key"}},
		{"duplicate_metadata.safetensors", rawFile(`{"__metadata__":{"a":"1","a":"2"}}`, nil),
			"__metadata__", []string{`duplicate metadata key "a"`}},
		{"non_string_metadata.safetensors", rawFile(`{"__metadata__":{"format":"pt","steps":1000}}`, nil),
			"__metadata__", []string{`metadata key "steps": value must be a string, found number 1000`}},
		{"metadata_not_object.safetensors", rawFile(`{"__metadata__":["a"]}`, nil),
			"__metadata__", []string{"must be an object of strings"}},
		{"not_object.safetensors", rawFile(`[1,2]`, nil), "", []string{"must be an object"}},
		{"not_utf8.safetensors", rawFile("{\"w\xff\":{}}", nil), "", []string{"not valid UTF-8"}},
		{"short.safetensors", []byte{1, 0, 0}, "", []string{"too short for the 8-byte header length"}},
		{"gap.safetensors", rawFile(`{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}`, zeros(6)),
			"b", []string{"leave a gap: bytes [2, 4)"}},
		{"trailing_bytes.safetensors", rawFile(`{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}`, zeros(5)),
			"", []string{"3 unclaimed trailing bytes"}},
		{"negative_dim.safetensors", rawFile(`{"a":{"dtype":"U8","shape":[-2],"data_offsets":[0,2]}}`, zeros(2)),
			"a", []string{"shape: -2 is not a non-negative integer"}},
		{"float_offset.safetensors", rawFile(`{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2.0]}}`, zeros(2)),
			"a", []string{"data_offsets: 2.0 is not a non-negative integer"}},
		{"end_before_begin.safetensors", rawFile(`{"a":{"dtype":"U8","shape":[0],"data_offsets":[2,0]}}`, zeros(2)),
			"a", []string{"end before begin"}},
		{"missing_shape.safetensors", rawFile(`{"a":{"dtype":"U8","data_offsets":[0,2]}}`, zeros(2)),
			"a", []string{`missing field "shape"`}},
		{"unknown_field.safetensors", rawFile(`{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"stride":[1]}}`, zeros(2)),
			"a", []string{`unknown field "stride"`}},
		{"three_offsets.safetensors", rawFile(`{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2,4]}}`, zeros(2)),
			"a", []string{"data_offsets must be [begin, end], found 3 numbers"}},
		{"shape_overflow.safetensors", rawFile(`{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}`, nil),
			"a", []string{"overflows"}},
		{"trailing_json.safetensors", rawFile(`{} {}`, nil), "", []string{"after the object"}},
		{"sub_byte_dtype.safetensors", rawFile(`{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}`, zeros(1)),
			"a", []string{"sub-byte dtypes are not supported"}},
	}
}

// TestBadCorpus opens every malformed file of testdata/bad and checks the
// error names the file and the key. The committed files must equal what the
// builders produce (`go test -run TestBadCorpus -update` rewrites them).
func TestBadCorpus(t *testing.T) {
	dir := filepath.Join("testdata", "bad")
	cases := badCases()
	if *update {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, c := range cases {
			if err := os.WriteFile(filepath.Join(dir, c.file), c.data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != len(cases) {
		t.Errorf("testdata/bad holds %d files, the builders %d: run with -update", len(entries), len(cases))
	}
	for _, c := range cases {
		t.Run(c.file, func(t *testing.T) {
			path := filepath.Join(dir, c.file)
			if got := mustRead(t, path); !bytes.Equal(got, c.data) {
				t.Fatalf("%s differs from its builder: run with -update", path)
			}
			f, err := Open(path)
			if err == nil {
				f.Close()
				t.Fatal("Open accepted a malformed file")
			}
			checkErr(t, err, path, c.key, c.msg)

			// The same through ParseHeader with a display name.
			_, err = ParseHeader("x/"+c.file, bytes.NewReader(c.data), int64(len(c.data)))
			checkErr(t, err, "x/"+c.file, c.key, c.msg)
		})
	}
}

func checkErr(t *testing.T, err error, file, key string, msg []string) {
	t.Helper()
	if err == nil {
		t.Fatal("no error")
	}
	var se *Error
	if !errors.As(err, &se) {
		t.Fatalf("error %v is not a *safetensors.Error", err)
	}
	if se.File != file || se.Key != key {
		t.Errorf("error names file %q key %q, want %q %q (%v)", se.File, se.Key, file, key, err)
	}
	s := err.Error()
	if !strings.Contains(s, file) || (key != "" && !strings.Contains(s, fmt.Sprintf("%q", key))) {
		t.Errorf("message %q does not name file %q and key %q", s, file, key)
	}
	for _, m := range msg {
		if !strings.Contains(s, m) {
			t.Errorf("message %q lacks %q", s, m)
		}
	}
}

func TestParseHeaderGood(t *testing.T) {
	tests := []struct {
		name    string
		file    []byte
		meta    map[string]string
		tensors []TensorInfo
	}{
		{
			name:    "empty object",
			file:    rawFile(`{}`, nil),
			tensors: nil,
		},
		{
			name: "unsorted entries are sorted by offset; padding and leading space accepted",
			file: rawFile(` {"b":{"dtype":"U8","shape":[2],"data_offsets":[8,10]},"a":{"data_offsets":[0,8],"shape":[2],"dtype":"F32"}}   `, zeros(10)),
			tensors: []TensorInfo{
				{Name: "a", DType: F32, Shape: []int64{2}, Begin: 0, End: 8},
				{Name: "b", DType: U8, Shape: []int64{2}, Begin: 8, End: 10},
			},
		},
		{
			name: "metadata, empty and 0-d tensors",
			file: rawFile(`{"__metadata__":{"format":"pt"},"e":{"dtype":"F32","shape":[0,4],"data_offsets":[0,0]},"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]}}`, zeros(8)),
			meta: map[string]string{"format": "pt"},
			tensors: []TensorInfo{
				{Name: "e", DType: F32, Shape: []int64{0, 4}, Begin: 0, End: 0},
				{Name: "s", DType: F64, Shape: []int64{}, Begin: 0, End: 8},
			},
		},
		{
			name: "null metadata",
			file: rawFile(`{"__metadata__":null}`, nil),
		},
		{
			name: "escaped names",
			file: rawFile(`{"a\"\u00e9\n":{"dtype":"BOOL","shape":[1],"data_offsets":[0,1]}}`, zeros(1)),
			tensors: []TensorInfo{
				{Name: "a\"é\n", DType: BOOL, Shape: []int64{1}, Begin: 0, End: 1},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h, err := ParseHeader("good", bytes.NewReader(tc.file), int64(len(tc.file)))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(h.Metadata, tc.meta) {
				t.Errorf("metadata %v, want %v", h.Metadata, tc.meta)
			}
			if !reflect.DeepEqual(h.Tensors, tc.tensors) {
				t.Errorf("tensors %v, want %v", h.Tensors, tc.tensors)
			}
			for _, want := range tc.tensors {
				if got, ok := h.Lookup(want.Name); !ok || !reflect.DeepEqual(got, want) {
					t.Errorf("Lookup(%q) = %v, %v", want.Name, got, ok)
				}
			}
			if _, ok := h.Lookup("missing"); ok {
				t.Error("Lookup of a missing name succeeded")
			}
			if h.DataStart != 8+h.HeaderLen || h.DataLen != int64(len(tc.file))-h.DataStart {
				t.Errorf("DataStart %d DataLen %d for HeaderLen %d", h.DataStart, h.DataLen, h.HeaderLen)
			}
		})
	}
}

func TestParseDType(t *testing.T) {
	for d, info := range dtypes {
		got, err := ParseDType(string(d))
		if err != nil || got != d || got.Size() != info.size {
			t.Errorf("ParseDType(%q) = %v, %v (size %d)", d, got, err, got.Size())
		}
	}
	for _, s := range []string{"", "f32", "F4", "INT8", "float32"} {
		if _, err := ParseDType(s); err == nil {
			t.Errorf("ParseDType(%q) succeeded", s)
		}
	}
}

// FuzzParseHeader feeds arbitrary files to the parser. It must never panic;
// whatever it accepts must satisfy the documented invariants and survive a
// write with EncodeHeader unchanged in names, dtypes, shapes and metadata.
func FuzzParseHeader(f *testing.F) {
	f.Add(rawFile(`{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, zeros(8)))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ParseHeader("fuzz", bytes.NewReader(data), int64(len(data)))
		if err != nil {
			var se *Error
			if !errors.As(err, &se) || se.File != "fuzz" {
				t.Fatalf("error %v does not name the file", err)
			}
			return
		}
		var pos int64
		for i, ti := range h.Tensors {
			if ti.Begin != pos || ti.End-ti.Begin != ti.NBytes() {
				t.Fatalf("tensor %d %+v breaks the layout at %d", i, ti, pos)
			}
			pos = ti.End
			if got, ok := h.Lookup(ti.Name); !ok || got.Begin != ti.Begin {
				t.Fatalf("Lookup(%q) = %v, %v", ti.Name, got, ok)
			}
		}
		if pos != h.DataLen || h.DataStart+h.DataLen != int64(len(data)) {
			t.Fatalf("tensors end at %d, data section %d+%d, file %d", pos, h.DataStart, h.DataLen, len(data))
		}
		prefix, _, err := EncodeHeader(h.Metadata, h.Tensors)
		if err != nil {
			t.Fatalf("re-encode accepted header: %v", err)
		}
		re := append(prefix, make([]byte, h.DataLen)...)
		h2, err := ParseHeader("re", bytes.NewReader(re), int64(len(re)))
		if err != nil {
			t.Fatalf("re-encoded header rejected: %v\n%q", err, prefix)
		}
		if !reflect.DeepEqual(h.Metadata, h2.Metadata) || !reflect.DeepEqual(shapes(h), shapes(h2)) {
			t.Fatalf("re-encoded header differs:\n %v %v\n %v %v", h.Metadata, shapes(h), h2.Metadata, shapes(h2))
		}
	})
}

func shapes(h *Header) []string {
	var out []string
	for _, t := range h.Tensors {
		out = append(out, fmt.Sprintf("%q %s %v", t.Name, t.DType, t.Shape))
	}
	sort.Strings(out)
	return out
}

// TestFuzzSeeds keeps testdata/fuzz/FuzzParseHeader in step with the bad
// corpus and the compatibility cases (-update rewrites it).
func TestFuzzSeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzParseHeader")
	seeds := map[string][]byte{}
	for _, c := range badCases() {
		if len(c.data) > 4096 {
			continue
		}
		seeds["bad-"+strings.TrimSuffix(c.file, ".safetensors")] = c.data
	}
	for i, c := range compatCases() {
		var infos []TensorInfo
		for _, w := range c.tensors {
			infos = append(infos, TensorInfo{Name: w.Name, DType: w.DType, Shape: w.Shape})
		}
		prefix, layout, err := EncodeHeader(c.metadata, infos)
		if err != nil {
			t.Fatal(err)
		}
		var n int64
		if len(layout) > 0 {
			n = layout[len(layout)-1].End
		}
		seeds[fmt.Sprintf("good-%02d", i)] = append(prefix, make([]byte, n)...)
	}
	if *update {
		os.RemoveAll(dir)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, b := range seeds {
			if err := os.WriteFile(filepath.Join(dir, name), []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	for name, b := range seeds {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatalf("seed %s: %v (run with -update)", name, err)
		}
		if want := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b); string(got) != want {
			t.Errorf("seed %s is stale: run with -update", name)
		}
	}
}
