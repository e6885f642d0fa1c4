// Command go-hello is the smallest useful arenahost plugin in Go: its
// "scale" method reads an F32 input tensor in place (by descriptor, no
// copy), asks the host for an output region, and writes factor·x there.
package main

import (
	"context"
	"fmt"

	"github.com/arenahost/arenahost/sdk"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// ScaleArgs are the msgpack arguments of "scale".
type ScaleArgs struct {
	Factor float32 `msgpack:"factor"`
}

// ScaleResult is the msgpack result of "scale"; the output tensor travels
// as a descriptor in InvokeResponse.tensors.
type ScaleResult struct {
	Count int     `msgpack:"count"`
	Sum   float64 `msgpack:"sum"`
}

func scale(ctx context.Context, c *sdk.Call, args ScaleArgs) (ScaleResult, error) {
	in, err := c.Input("x")
	if err != nil {
		return ScaleResult{}, err
	}
	xs, err := c.Float32s(in) // zero-copy view of the host's segment
	if err != nil {
		return ScaleResult{}, err
	}
	out, err := c.Host().Allocate(ctx, "go-hello.scaled", pluginv1.DType_DTYPE_F32, in.GetShape())
	if err != nil {
		return ScaleResult{}, fmt.Errorf("allocate output: %w", err)
	}
	ys, err := c.Float32s(out)
	if err != nil {
		return ScaleResult{}, err
	}
	var sum float64
	for i, x := range xs {
		ys[i] = args.Factor * x
		sum += float64(ys[i])
	}
	c.Return(out)
	return ScaleResult{Count: len(ys), Sum: sum}, nil
}

func main() {
	p := sdk.New("go-hello", "0.1.0", "other")
	sdk.Method(p, "scale", scale, sdk.Doc("write factor·x into a new host region"))
	sdk.Serve(p)
}
