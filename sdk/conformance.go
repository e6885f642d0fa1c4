package sdk

import (
	"context"
	"errors"
	"fmt"

	"github.com/vmihailenco/msgpack/v5"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// The conformance.* methods every SDK-built plugin serves, so that
// sdk/plugintest can check tensor passing, host allocation, streaming and
// error mapping against any plugin. Their contract (names, argument and
// result keys, error codes) is written down in sdk/plugintest/README.md;
// the Python SDK implements the same.
const (
	ConformanceEcho   = "conformance.echo"
	ConformanceSum    = "conformance.sum"
	ConformanceScale  = "conformance.scale"
	ConformanceFill   = "conformance.fill"
	ConformanceStream = "conformance.stream"
	ConformanceFail   = "conformance.fail"
)

// maxConformanceCount bounds the element and message counts the
// conformance methods accept, so a bad request cannot exhaust the host.
const maxConformanceCount = 1 << 26

type echoArgs struct {
	Payload msgpack.RawMessage `msgpack:"payload"`
}

type sumResult struct {
	Sum   float64 `msgpack:"sum"`
	Count int64   `msgpack:"count"`
}

type scaleArgs struct {
	Factor float64 `msgpack:"factor"`
}

type countResult struct {
	Count int64 `msgpack:"count"`
}

type fillArgs struct {
	Name  string  `msgpack:"name"`
	Count int64   `msgpack:"count"`
	Start float64 `msgpack:"start"`
	Step  float64 `msgpack:"step"`
}

type streamArgs struct {
	Count int64 `msgpack:"count"`
}

type streamItem struct {
	Index int64 `msgpack:"index"`
}

type failArgs struct {
	Code    string `msgpack:"code"`
	Message string `msgpack:"message"`
}

var failCodes = map[string]error{
	"invalid_argument":    ErrInvalidArgument,
	"not_found":           ErrNotFound,
	"failed_precondition": ErrFailedPrecondition,
	"internal":            errors.New("internal"),
}

func registerConformance(p *Plugin) {
	Method(p, ConformanceEcho, func(_ context.Context, _ *Call, a echoArgs) (echoArgs, error) {
		if a.Payload == nil {
			return a, fmt.Errorf("field \"payload\" missing: %w", ErrInvalidArgument)
		}
		return a, nil
	}, Doc("conformance: return args.payload unchanged"))

	Method(p, ConformanceSum, func(_ context.Context, c *Call, _ struct{}) (sumResult, error) {
		d, err := c.InputAt(0)
		if err != nil {
			return sumResult{}, err
		}
		xs, err := c.Float32s(d)
		if err != nil {
			return sumResult{}, err
		}
		var s float64
		for _, x := range xs {
			s += float64(x)
		}
		return sumResult{Sum: s, Count: int64(len(xs))}, nil
	}, Doc("conformance: sum the F32 input tensor #0, read in place"))

	Method(p, ConformanceScale, func(_ context.Context, c *Call, a scaleArgs) (countResult, error) {
		d, err := c.InputAt(0)
		if err != nil {
			return countResult{}, err
		}
		if d.GetAccess() != pluginv1.Access_ACCESS_READ_WRITE {
			return countResult{}, fmt.Errorf("input tensor %q is %v, want read-write: %w", d.GetName(), d.GetAccess(), ErrInvalidArgument)
		}
		xs, err := c.Float32s(d)
		if err != nil {
			return countResult{}, err
		}
		f := float32(a.Factor)
		for i := range xs {
			xs[i] *= f
		}
		return countResult{Count: int64(len(xs))}, nil
	}, Doc("conformance: multiply the read-write F32 input tensor #0 by args.factor in place"))

	Method(p, ConformanceFill, func(ctx context.Context, c *Call, a fillArgs) (countResult, error) {
		if a.Count <= 0 || a.Count > maxConformanceCount {
			return countResult{}, fmt.Errorf("field \"count\" is %d, want 1..%d: %w", a.Count, maxConformanceCount, ErrInvalidArgument)
		}
		d, err := c.Host().Allocate(ctx, a.Name, pluginv1.DType_DTYPE_F32, []int64{a.Count})
		if err != nil {
			return countResult{}, err
		}
		xs, err := c.Float32s(d)
		if err != nil {
			return countResult{}, err
		}
		for i := range xs {
			xs[i] = float32(a.Start + float64(i)*a.Step)
		}
		c.Return(d)
		return countResult{Count: a.Count}, nil
	}, Doc("conformance: allocate F32[count] through the host, write start+i*step, return it"))

	StreamMethod(p, ConformanceStream, func(ctx context.Context, _ *Call, a streamArgs, send func(streamItem) error) error {
		if a.Count < 0 || a.Count > 10000 {
			return fmt.Errorf("field \"count\" is %d, want 0..10000: %w", a.Count, ErrInvalidArgument)
		}
		for i := int64(0); i < a.Count; i++ {
			if err := send(streamItem{Index: i}); err != nil {
				return err
			}
		}
		return nil
	}, Doc("conformance: stream {index: i} for i in 0..count-1"))

	Method(p, ConformanceFail, func(_ context.Context, _ *Call, a failArgs) (struct{}, error) {
		sentinel, ok := failCodes[a.Code]
		if !ok {
			return struct{}{}, fmt.Errorf("field \"code\" is %q, want one of invalid_argument, not_found, failed_precondition, internal: %w", a.Code, ErrInvalidArgument)
		}
		return struct{}{}, fmt.Errorf("%s: %w", a.Message, sentinel)
	}, Doc("conformance: fail with the status code named by args.code"))
}
