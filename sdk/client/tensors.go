package client

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"

	"google.golang.org/protobuf/proto"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// TensorQuery selects tensors of GET /v1/models/{name}/tensors: by Names,
// else by Prefix, else every tensor; Factors adds the bound LoRA side
// factors.
type TensorQuery struct {
	Names   []string
	Prefix  string
	Factors bool
}

// maxTensorsAnswer bounds the descriptors answer.
const maxTensorsAnswer = 64 << 20

// Tensors returns the arena descriptors of a model's tensors, the same a
// plugin's LookupTensors gets, so a process beside the host maps them
// zero-copy (the SDKs' segment mappers).
func (c *Client) Tensors(ctx context.Context, model string, q TensorQuery) (*pluginv1.LookupTensorsResponse, error) {
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
	req, err := c.newRequest(ctx, http.MethodGet, "/v1/models/"+seg(model)+"/tensors?"+v.Encode(), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/x-protobuf")
	resp, err := c.send(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxTensorsAnswer+1))
	if err == nil && len(b) > maxTensorsAnswer {
		err = fmt.Errorf("answer over %d bytes", maxTensorsAnswer)
	}
	if err != nil {
		return nil, fmt.Errorf("arenahost GET %s: %w", req.URL.Path, err)
	}
	out := &pluginv1.LookupTensorsResponse{}
	if err := proto.Unmarshal(b, out); err != nil {
		return nil, fmt.Errorf("arenahost GET %s: decode descriptors: %w", req.URL.Path, err)
	}
	return out, nil
}
