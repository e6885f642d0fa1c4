package api

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"net/url"
	"strings"

	"github.com/arenahost/arenahost/host/lora"
)

// retryAfter is the Retry-After (seconds) of a 503 plugin_unavailable: about
// one restart back-off.
const retryAfter = "2"

// DefaultMaxImages bounds the images one txt2img request may ask for
// (batch_size × n_iter) when Options.MaxImages is 0.
const DefaultMaxImages = 8

// imageCount multiplies batch × iter (each at least 1 after defaulting) and
// refuses counts above limit without overflowing: each factor is checked
// before the product.
func imageCount(batch, iter, limit int) (int, error) {
	if batch < 0 || iter < 0 {
		return 0, badRequest("batch_size %d, n_iter %d: must not be negative", batch, iter)
	}
	batch, iter = max(batch, 1), max(iter, 1)
	if batch > limit || iter > limit || batch*iter > limit {
		return 0, badRequest("batch_size×n_iter: %d×%d images, at most %d (--max-images)", batch, iter, limit)
	}
	return batch * iter, nil
}

// checkStrength refuses a non-finite or out-of-range strength (the
// coordinator checks again; this answers before any file is read).
func checkStrength(s float64) error {
	if math.IsNaN(s) || math.IsInf(s, 0) || math.Abs(s) > lora.MaxStrength {
		return fmt.Errorf("%v is not a finite number in [-%d, %d]", s, lora.MaxStrength, lora.MaxStrength)
	}
	return nil
}

// hostPolicy decides which Host and Origin headers the API answers. A DNS
// rebinding page reaches a loopback server under the attacker's own name
// (Host: evil.example:7860), so every route, reads and websockets included,
// refuses a Host outside the allow-list; and a browser's mutating request
// (or websocket) must come from a page whose Origin is in it too.
type hostPolicy struct {
	// names are host names (lower case, no port) accepted with any port.
	names map[string]bool
	// withPort are "host:port" entries accepted only with that port.
	withPort map[string]bool
	// anyLocalIP: the server listens on a wildcard address, so a Host that
	// is an IP literal of this machine is accepted (an IP literal cannot be
	// rebound).
	anyLocalIP bool
	localIPs   map[string]bool
}

// newHostPolicy allows the loopback names, the listen address's host and
// the extra entries (host names or HOST:PORT).
func newHostPolicy(listen string, extra []string) hostPolicy {
	p := hostPolicy{names: map[string]bool{"localhost": true}, withPort: map[string]bool{}, localIPs: map[string]bool{}}
	if h, _, err := net.SplitHostPort(listen); err == nil {
		ip := net.ParseIP(h)
		switch {
		case h == "" || ip != nil && ip.IsUnspecified():
			p.anyLocalIP = true
			if addrs, err := net.InterfaceAddrs(); err == nil {
				for _, a := range addrs {
					if n, ok := a.(*net.IPNet); ok {
						p.localIPs[n.IP.String()] = true
					}
				}
			}
		default:
			p.names[normHost(h)] = true
		}
	}
	for _, e := range extra {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		if h, port, err := net.SplitHostPort(e); err == nil {
			p.withPort[normHost(h)+":"+port] = true
			continue
		}
		p.names[normHost(e)] = true
	}
	return p
}

// normHost lower-cases a host name and drops IPv6 brackets and a trailing
// dot, so "LOCALHOST." and "[::1]" compare as "localhost" and "::1".
func normHost(h string) string {
	h = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")
	return strings.TrimSuffix(strings.ToLower(h), ".")
}

// splitHost splits a Host header value into its normalized host and its
// port ("" when absent).
func splitHost(hp string) (host, port string) {
	if h, p, err := net.SplitHostPort(hp); err == nil {
		return normHost(h), p
	}
	return normHost(hp), ""
}

// allowed reports whether host (normalized) with port ("" for none) is in
// the allow-list.
func (p hostPolicy) allowed(host, port string) bool {
	if host == "" {
		return false
	}
	if p.names[host] || (port != "" && p.withPort[host+":"+port]) {
		return true
	}
	if ip := net.ParseIP(host); ip != nil {
		if ip.IsLoopback() {
			return true
		}
		return p.anyLocalIP && p.localIPs[ip.String()]
	}
	return false
}

// errHost is the class of a refused Host or Origin header.
var errHost = errors.New("not in the allowed hosts")

// check refuses a request whose Host header is not allowed.
func (p hostPolicy) check(r *http.Request) error {
	host, port := splitHost(r.Host)
	if !p.allowed(host, port) {
		return &StatusError{Status: http.StatusForbidden, Code: "host_not_allowed",
			Err: fmt.Errorf("%s %s: Host %q is %w (loopback names and the listen address are; add names with --allowed-hosts)", r.Method, r.URL.Path, r.Host, errHost)}
	}
	return nil
}

// checkOrigin refuses a request from a browser page whose origin is not
// allowed: the Origin header's host must be allowed and, unless an
// --allowed-hosts entry names its port, its port must be the one the
// request was sent to (another local web app on another port is another
// origin). Requests without an Origin (curl, scripts) pass; the token
// still applies to them.
func (p hostPolicy) checkOrigin(r *http.Request) error {
	o := r.Header.Get("Origin")
	if o == "" {
		return nil
	}
	refuse := func(why string) error {
		return &StatusError{Status: http.StatusForbidden, Code: "cross_origin",
			Err: fmt.Errorf("%s %s from origin %q: %s; mutating routes and websockets only accept requests from pages of an allowed host (see --allowed-hosts)", r.Method, r.URL.Path, o, why)}
	}
	u, err := url.Parse(o)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return refuse("not an http(s) origin")
	}
	host, port := normHost(u.Hostname()), u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[u.Scheme]
	}
	if p.withPort[host+":"+port] {
		return nil
	}
	if !p.allowed(host, "") {
		return refuse(fmt.Sprintf("host %q %v", host, errHost))
	}
	_, reqPort := splitHost(r.Host)
	if reqPort == "" {
		if port != "80" && port != "443" {
			return refuse(fmt.Sprintf("port %s is not the server's", port))
		}
		return nil
	}
	if port != reqPort {
		return refuse(fmt.Sprintf("port %s is not the server's port %s", port, reqPort))
	}
	return nil
}
