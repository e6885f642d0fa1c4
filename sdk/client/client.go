// Package client is a typed Go client of arenahost's HTTP API (/v1): it
// sends and decodes the types of sdk/api, streams a job's events
// (server-sent events) and preview frames (the MJPEG stream), and turns
// every error answer into an *Error carrying the HTTP status and the host's
// JSON error code and detail.
//
//	c, err := client.New("http://127.0.0.1:7860", client.WithToken(tok))
//	models, err := c.Models(ctx)
//	res, err := c.ApplyLoRAs(ctx, api.ApplyRequest{LoRAs: []api.ApplyLoRA{{Name: "style"}}})
//
// A Client is safe for concurrent use. Every method takes a context first;
// cancelling it aborts the request (and ends a stream).
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/arenahost/arenahost/sdk/api"
)

// Client talks to one arenahost.
type Client struct {
	base  *url.URL
	token string
	hc    *http.Client
}

// Option configures a Client.
type Option func(*Client)

// WithToken sends token on mutating requests (the host's --token), as
// "Authorization: Bearer TOKEN". Reads need none.
func WithToken(token string) Option { return func(c *Client) { c.token = token } }

// WithHTTPClient uses hc for every request (its transport, proxy and
// timeout). A Timeout on hc also bounds streams; the default client has
// none, and each request is bounded by its context instead.
func WithHTTPClient(hc *http.Client) Option { return func(c *Client) { c.hc = hc } }

// New returns a client of the host at baseURL ("http://127.0.0.1:7860",
// with or without a trailing slash; a path prefix is kept, for a host
// behind a reverse proxy).
func New(baseURL string, opts ...Option) (*Client, error) {
	u, err := url.Parse(baseURL)
	if err != nil {
		return nil, fmt.Errorf("arenahost client: base URL %q: %w", baseURL, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("arenahost client: base URL %q: want http://HOST:PORT or https://HOST:PORT", baseURL)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	u.RawQuery, u.Fragment = "", ""
	c := &Client{base: u, hc: http.DefaultClient}
	for _, o := range opts {
		o(c)
	}
	if c.hc == nil {
		c.hc = http.DefaultClient
	}
	return c, nil
}

// BaseURL is the host's address as New was given it, without a trailing
// slash.
func (c *Client) BaseURL() string { return c.base.String() }

// Error is an error answer of the host: the HTTP status and the JSON body
// every arenahost error has ({error, code, detail}).
type Error struct {
	// Method and Path are the request's.
	Method string
	Path   string
	// Status is the HTTP status code; Code the host's error class
	// ("bad_request", "not_found", "swap_refused", … see docs/api.md);
	// Detail what went wrong in words (the body's text when it was not
	// arenahost's JSON error).
	Status int
	Code   string
	Detail string
	// RetryAfter is the Retry-After header (503 plugin_unavailable), 0 when
	// absent.
	RetryAfter time.Duration
}

func (e *Error) Error() string {
	code := e.Code
	if code == "" {
		code = http.StatusText(e.Status)
	}
	return fmt.Sprintf("arenahost %s %s: %d %s: %s", e.Method, e.Path, e.Status, code, e.Detail)
}

// ErrorCode returns the host's error code of err when it is (or wraps) an
// *Error, else "".
func ErrorCode(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}

// newRequest builds a request for path (escaped, its segments through seg;
// it may carry a query) with an optional JSON body.
func (c *Client) newRequest(ctx context.Context, method, path string, body any) (*http.Request, error) {
	u := *c.base
	p, q, _ := strings.Cut(path, "?")
	// p is escaped already (seg): keep it as the raw path, so a name's
	// "%20" or "%2F" is sent once, not escaped again.
	raw := c.base.EscapedPath() + p
	unesc, err := url.PathUnescape(raw)
	if err != nil {
		return nil, fmt.Errorf("arenahost %s %s: %w", method, p, err)
	}
	u.Path, u.RawPath = unesc, raw
	u.RawQuery = q
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("arenahost %s %s: encode request: %w", method, p, err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), rd)
	if err != nil {
		return nil, fmt.Errorf("arenahost %s %s: %w", method, p, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	if c.token != "" && method != http.MethodGet && method != http.MethodHead {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	return req, nil
}

// send performs req and returns the response when its status is 2xx; any
// other answer is read into an *Error.
func (c *Client) send(req *http.Request) (*http.Response, error) {
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("arenahost %s %s: %w", req.Method, req.URL.Path, err)
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	return nil, errorOf(req, resp)
}

// maxErrorBody bounds how much of an error answer is read.
const maxErrorBody = 64 << 10

func errorOf(req *http.Request, resp *http.Response) *Error {
	e := &Error{Method: req.Method, Path: req.URL.Path, Status: resp.StatusCode}
	if s := resp.Header.Get("Retry-After"); s != "" {
		if n, err := strconv.Atoi(s); err == nil && n >= 0 {
			e.RetryAfter = time.Duration(n) * time.Second
		}
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	var body api.Error
	if err := json.Unmarshal(b, &body); err == nil && body.Code != "" {
		e.Code, e.Detail = body.Code, body.Detail
		if e.Detail == "" {
			e.Detail = body.Error
		}
		return e
	}
	e.Detail = strings.TrimSpace(string(b))
	if e.Detail == "" {
		e.Detail = resp.Status
	}
	return e
}

// do sends a request and decodes a JSON answer into out (nil: the body is
// discarded).
func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	req, err := c.newRequest(ctx, method, path, body)
	if err != nil {
		return err
	}
	resp, err := c.send(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("arenahost %s %s: decode %T: %w", method, req.URL.Path, out, err)
	}
	return nil
}

// get decodes GET path into a new T.
func get[T any](ctx context.Context, c *Client, path string) (T, error) {
	var v T
	err := c.do(ctx, http.MethodGet, path, nil, &v)
	return v, err
}

// call sends method path with body and decodes the answer into a new T.
func call[T any](ctx context.Context, c *Client, method, path string, body any) (*T, error) {
	v := new(T)
	if err := c.do(ctx, method, path, body, v); err != nil {
		return nil, err
	}
	return v, nil
}

// seg escapes one path segment (a model, plugin or job name).
func seg(s string) string { return url.PathEscape(s) }

// GetRaw sends GET for the path made of segs (each escaped as one path
// segment: {"v1", "models", name, "tensors"}) with query, asking for
// accept, and returns the 2xx response for the caller to read and close;
// any other answer is an *Error. It serves answers that are not JSON (such
// as sdk/client/tensors' protobuf descriptors).
func (c *Client) GetRaw(ctx context.Context, segs []string, query url.Values, accept string) (*http.Response, error) {
	p := ""
	for _, s := range segs {
		p += "/" + seg(s)
	}
	if len(query) > 0 {
		p += "?" + query.Encode()
	}
	req, err := c.newRequest(ctx, http.MethodGet, p, nil)
	if err != nil {
		return nil, err
	}
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	return c.send(req)
}
