// Package tensors fetches a model's arena tensor descriptors from an
// arenahost (GET /v1/models/{name}/tensors?format=proto): the same
// pluginv1.LookupTensorsResponse a plugin's LookupTensors gets, so a
// process beside the host maps the tensors zero-copy with the SDKs'
// segment mappers. It lives apart from sdk/client because its answer is a
// protobuf type: importing sdk/client alone pulls no protobuf or gRPC.
package tensors

import (
	"context"
	"fmt"
	"io"
	"net/url"

	"google.golang.org/protobuf/proto"

	"github.com/arenahost/arenahost/sdk/client"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// Query selects tensors: by Names, else by Prefix, else every tensor;
// Factors adds the bound LoRA side factors.
type Query struct {
	Names   []string
	Prefix  string
	Factors bool
}

// maxAnswer bounds the descriptors answer.
const maxAnswer = 64 << 20

// Get returns the arena descriptors of model's tensors.
func Get(ctx context.Context, c *client.Client, model string, q Query) (*pluginv1.LookupTensorsResponse, error) {
	v := url.Values{"format": {"proto"}}
	for _, n := range q.Names {
		v.Add("name", n)
	}
	if q.Prefix != "" {
		v.Set("prefix", q.Prefix)
	}
	if q.Factors {
		v.Set("factors", "1")
	}
	resp, err := c.GetRaw(ctx, []string{"v1", "models", model, "tensors"}, v, "application/x-protobuf")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer+1))
	if err == nil && len(b) > maxAnswer {
		err = fmt.Errorf("answer over %d bytes", maxAnswer)
	}
	if err != nil {
		return nil, fmt.Errorf("arenahost GET %s: %w", resp.Request.URL.Path, err)
	}
	out := &pluginv1.LookupTensorsResponse{}
	if err := proto.Unmarshal(b, out); err != nil {
		return nil, fmt.Errorf("arenahost GET %s: decode descriptors: %w", resp.Request.URL.Path, err)
	}
	return out, nil
}
