package sdk

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"

	"github.com/vmihailenco/msgpack/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/arenahost/arenahost/shared/tensor"
	"github.com/arenahost/arenahost/shared/wire"
)

// Errors a method returns, wrapped with %w, to choose the gRPC status code
// the host sees. Anything else becomes codes.Internal; an error carrying a
// gRPC status (from a Host call) keeps its code; context errors become
// Canceled or DeadlineExceeded; shared/tensor's descriptor errors become
// InvalidArgument.
var (
	// ErrInvalidArgument: the arguments or tensors are wrong (InvalidArgument).
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrNotFound: something the call names does not exist (NotFound).
	ErrNotFound = errors.New("not found")
	// ErrFailedPrecondition: the call is valid but the plugin or host is not
	// in a state to run it (FailedPrecondition).
	ErrFailedPrecondition = errors.New("failed precondition")
)

var invalid = []error{
	ErrInvalidArgument, tensor.ErrBadDescriptor, tensor.ErrOutOfBounds, tensor.ErrCUDALocation,
	tensor.ErrReadOnly, tensor.ErrUnknownDType, tensor.ErrMisaligned,
}

// Code returns the gRPC code err maps to (see the Err… variables).
func Code(err error) codes.Code {
	switch {
	case err == nil:
		return codes.OK
	case isAny(err, invalid...):
		return codes.InvalidArgument
	case errors.Is(err, ErrNotFound):
		return codes.NotFound
	case isAny(err, ErrFailedPrecondition, wire.ErrNoHost, tensor.ErrClosed):
		return codes.FailedPrecondition
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	}
	var se interface{ GRPCStatus() *status.Status }
	if errors.As(err, &se) && se.GRPCStatus() != nil {
		return se.GRPCStatus().Code()
	}
	return codes.Internal
}

func isAny(err error, targets ...error) bool {
	for _, t := range targets {
		if errors.Is(err, t) {
			return true
		}
	}
	return false
}

func toStatus(subject string, err error) *status.Status {
	return status.New(Code(err), subject+": "+err.Error())
}

// decodeArgs decodes msgpack args into v (a pointer). Empty args leave v
// zero. On failure it names the struct field that did not decode when it
// can find it.
func decodeArgs(raw []byte, v any) error {
	if len(raw) == 0 {
		return nil
	}
	// A bytes.Reader is an io.ByteScanner, so the decoder reads it
	// directly and rd.Len() is what it left unread.
	rd := bytes.NewReader(raw)
	err := msgpack.NewDecoder(rd).Decode(v)
	if err == nil {
		if rd.Len() > 0 {
			return fmt.Errorf("decode args: %d trailing bytes after the msgpack value: %w", rd.Len(), ErrInvalidArgument)
		}
		return nil
	}
	if field := badField(raw, reflect.TypeOf(v).Elem()); field != "" {
		return fmt.Errorf("decode args: field %q: %v: %w", field, err, ErrInvalidArgument)
	}
	return fmt.Errorf("decode args into %T: %v: %w", reflect.ValueOf(v).Elem().Interface(), err, ErrInvalidArgument)
}

// badField finds the first field of struct type t whose msgpack value in
// raw does not decode on its own, or "".
func badField(raw []byte, t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return ""
	}
	var fields map[string]msgpack.RawMessage
	if msgpack.Unmarshal(raw, &fields) != nil {
		return ""
	}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name := f.Name
		if tag := f.Tag.Get("msgpack"); tag != "" {
			if tag == "-" {
				continue
			}
			if n, _, _ := strings.Cut(tag, ","); n != "" {
				name = n
			}
		}
		val, ok := fields[name]
		if !ok {
			continue
		}
		if msgpack.Unmarshal(val, reflect.New(f.Type).Interface()) != nil {
			return name
		}
	}
	return ""
}
