package nf4

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
)

// QuantState is the non-tensor part of a bitsandbytes 4-bit quant state: the
// JSON stored (as uint8 bytes) under "<weight>.quant_state.bitsandbytes__nf4"
// (or __fp4). Field order follows QuantState.as_dict().
type QuantState struct {
	QuantType QuantType // "nf4" or "fp4"
	Blocksize int       // elements per absmax block: a power of two, 32..4096
	DType     DType     // logical dtype of the dequantized weight
	Shape     []int64   // logical shape of the weight
	// Nested is true when absmax is itself quantized (compress_statistics);
	// the three fields below are meaningful only then.
	Nested          bool
	NestedBlocksize int     // bitsandbytes writes 256
	NestedDType     DType   // bitsandbytes writes "float32"
	NestedOffset    float64 // the float32 mean subtracted before nesting, as a double
}

// MaxStateJSON caps the size of a quant-state JSON document.
const MaxStateJSON = 1 << 16

// maxDims caps the rank of a logical shape.
const maxDims = 16

// Numel returns the element count of the logical shape.
func (q QuantState) Numel() int64 {
	n := int64(1)
	for _, d := range q.Shape {
		n *= d
	}
	return n
}

// ParseQuantState decodes and validates a quant-state JSON document. It is
// strict: one JSON object; only the keys bitsandbytes writes (quant_type,
// blocksize, dtype, shape, nested_blocksize, nested_dtype, nested_offset),
// none repeated; the first four required; the nested ones all present or
// all absent. quant_type is "nf4" or "fp4"; blocksize an integer power of
// two from 32 to 4096; dtype bfloat16, float16 or float32; shape a list of
// non-negative integers whose product fits in int64; nested_blocksize a
// positive power-of-two integer up to 4096; nested_dtype "float32";
// nested_offset a finite number (bitsandbytes writes the double of a
// float32; dequantizing rounds it to float32 as torch.tensor(float(x)) does).
// Errors name the offending field.
func ParseQuantState(data []byte) (QuantState, error) {
	var q QuantState
	if len(data) > MaxStateJSON {
		return q, fmt.Errorf("quant state: %d bytes exceeds the %d-byte limit", len(data), MaxStateJSON)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return q, fmt.Errorf("quant state: %w", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return q, fmt.Errorf("quant state: want a JSON object, got %v", tok)
	}
	seen := map[string]bool{}
	var hasOffset, hasNB, hasND bool
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return q, fmt.Errorf("quant state: %w", err)
		}
		key, _ := tok.(string)
		if seen[key] {
			return q, fmt.Errorf("quant state: duplicate key %q", key)
		}
		seen[key] = true
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return q, fmt.Errorf("quant state: field %q: %w", key, err)
		}
		switch key {
		case "quant_type":
			s, err := jsonString(raw)
			if err != nil {
				return q, fmt.Errorf("quant state: field quant_type: %w", err)
			}
			if QuantType(s).Table() == nil {
				return q, fmt.Errorf("quant state: field quant_type: %q is not nf4 or fp4", s)
			}
			q.QuantType = QuantType(s)
		case "blocksize":
			v, err := jsonInt(raw)
			if err != nil {
				return q, fmt.Errorf("quant state: field blocksize: %w", err)
			}
			if !ValidBlocksize(int(v)) || v != int64(int(v)) {
				return q, fmt.Errorf("quant state: field blocksize: %d is not a power of two from 32 to 4096", v)
			}
			q.Blocksize = int(v)
		case "dtype":
			s, err := jsonString(raw)
			if err != nil {
				return q, fmt.Errorf("quant state: field dtype: %w", err)
			}
			if DType(s).Size() == 0 {
				return q, fmt.Errorf("quant state: field dtype: %q is not bfloat16, float16 or float32", s)
			}
			q.DType = DType(s)
		case "shape":
			shape, err := jsonShape(raw)
			if err != nil {
				return q, fmt.Errorf("quant state: field shape: %w", err)
			}
			q.Shape = shape
		case "nested_blocksize":
			v, err := jsonInt(raw)
			if err != nil {
				return q, fmt.Errorf("quant state: field nested_blocksize: %w", err)
			}
			if v <= 0 || v > 4096 || v&(v-1) != 0 {
				return q, fmt.Errorf("quant state: field nested_blocksize: %d is not a power of two from 1 to 4096", v)
			}
			q.NestedBlocksize, hasNB = int(v), true
		case "nested_dtype":
			s, err := jsonString(raw)
			if err != nil {
				return q, fmt.Errorf("quant state: field nested_dtype: %w", err)
			}
			if DType(s) != Float32 {
				return q, fmt.Errorf("quant state: field nested_dtype: %q is not float32", s)
			}
			q.NestedDType, hasND = Float32, true
		case "nested_offset":
			var num json.Number
			if err := json.Unmarshal(raw, &num); err != nil {
				return q, fmt.Errorf("quant state: field nested_offset: want a number: %w", err)
			}
			f, err := num.Float64()
			if err != nil || math.IsInf(f, 0) || math.IsNaN(f) {
				return q, fmt.Errorf("quant state: field nested_offset: %s is not a finite number", num)
			}
			q.NestedOffset, hasOffset = f, true
		default:
			return q, fmt.Errorf("quant state: unknown field %q", key)
		}
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return q, fmt.Errorf("quant state: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return q, errors.New("quant state: trailing data after the JSON object")
	}
	for _, k := range []string{"quant_type", "blocksize", "dtype", "shape"} {
		if !seen[k] {
			return q, fmt.Errorf("quant state: missing field %q", k)
		}
	}
	switch {
	case hasOffset && hasNB && hasND:
		q.Nested = true
	case hasOffset || hasNB || hasND:
		return q, errors.New("quant state: nested_blocksize, nested_dtype and nested_offset must appear together")
	}
	return q, nil
}

func jsonString(raw json.RawMessage) (string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", fmt.Errorf("want a string, got %s", truncate(raw))
	}
	return s, nil
}

func jsonInt(raw json.RawMessage) (int64, error) {
	var num json.Number
	if err := json.Unmarshal(raw, &num); err != nil {
		return 0, fmt.Errorf("want an integer, got %s", truncate(raw))
	}
	v, err := strconv.ParseInt(string(num), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("want an integer, got %s", truncate(raw))
	}
	return v, nil
}

func jsonShape(raw json.RawMessage) ([]int64, error) {
	var items []json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil || items == nil {
		return nil, fmt.Errorf("want a list of integers, got %s", truncate(raw))
	}
	if len(items) > maxDims {
		return nil, fmt.Errorf("%d dimensions exceeds the limit of %d", len(items), maxDims)
	}
	shape := make([]int64, len(items))
	prod := int64(1)
	for i, it := range items {
		v, err := jsonInt(it)
		if err != nil {
			return nil, fmt.Errorf("dimension %d: %w", i, err)
		}
		if v < 0 {
			return nil, fmt.Errorf("dimension %d: %d is negative", i, v)
		}
		if v != 0 && prod > math.MaxInt64/v {
			return nil, errors.New("element count overflows int64")
		}
		prod *= v
		shape[i] = v
	}
	return shape, nil
}

func truncate(b []byte) string {
	if len(b) > 40 {
		return string(b[:40]) + "…"
	}
	return string(b)
}

// MarshalPython returns the JSON bitsandbytes writes for this state, byte
// for byte: json.dumps of as_dict()'s non-tensor entries in insertion order
// (quant_type, blocksize, dtype, shape, then nested_blocksize, nested_dtype,
// nested_offset when nested), separators ", " and ": ", nested_offset as
// Python's repr(float).
func (q QuantState) MarshalPython() []byte {
	var b []byte
	b = append(b, `{"quant_type": `...)
	b = strconv.AppendQuote(b, string(q.QuantType))
	b = append(b, `, "blocksize": `...)
	b = strconv.AppendInt(b, int64(q.Blocksize), 10)
	b = append(b, `, "dtype": `...)
	b = strconv.AppendQuote(b, string(q.DType))
	b = append(b, `, "shape": [`...)
	for i, d := range q.Shape {
		if i > 0 {
			b = append(b, ", "...)
		}
		b = strconv.AppendInt(b, d, 10)
	}
	b = append(b, ']')
	if q.Nested {
		b = append(b, `, "nested_blocksize": `...)
		b = strconv.AppendInt(b, int64(q.NestedBlocksize), 10)
		b = append(b, `, "nested_dtype": `...)
		b = strconv.AppendQuote(b, string(q.NestedDType))
		b = append(b, `, "nested_offset": `...)
		b = append(b, PythonFloat(q.NestedOffset)...)
	}
	return append(b, '}')
}

// PythonFloat formats f as Python's repr(float) and json.dumps do: the
// shortest digits that round-trip; positional notation with ".0" on
// integral values when the decimal exponent is in [-4, 16); otherwise
// exponent notation like "1e-05" or "1.5e+16"; "NaN", "Infinity",
// "-Infinity" for the specials (json.dumps' spelling).
func PythonFloat(f float64) string {
	switch {
	case math.IsNaN(f):
		return "NaN"
	case math.IsInf(f, 1):
		return "Infinity"
	case math.IsInf(f, -1):
		return "-Infinity"
	}
	// Shortest round-trip digits and decimal exponent: "-d.ddde±XX".
	e := strconv.FormatFloat(f, 'e', -1, 64)
	sign := ""
	if e[0] == '-' {
		sign, e = "-", e[1:]
	}
	mant, expStr, _ := strings.Cut(e, "e")
	exp, _ := strconv.Atoi(expStr)
	digits := strings.Replace(mant, ".", "", 1)
	decpt := exp + 1 // position of the decimal point relative to digits
	if digits == "0" {
		return sign + "0.0"
	}
	if decpt <= -4 || decpt > 16 {
		s := digits[:1]
		if len(digits) > 1 {
			s += "." + digits[1:]
		}
		es := "+"
		if exp < 0 {
			es, exp = "-", -exp
		}
		return fmt.Sprintf("%s%se%s%02d", sign, s, es, exp)
	}
	switch {
	case decpt <= 0:
		return sign + "0." + strings.Repeat("0", -decpt) + digits
	case decpt >= len(digits):
		return sign + digits + strings.Repeat("0", decpt-len(digits)) + ".0"
	default:
		return sign + digits[:decpt] + "." + digits[decpt:]
	}
}
