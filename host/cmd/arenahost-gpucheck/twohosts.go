package main

import (
	"context"
	"fmt"
	"strconv"
	"time"
)

// TwoHostOptions says how the two-host check starts its hosts: one binary,
// twice, on two devices of one backend (cuda on a machine with two GPUs,
// cuda-sim anywhere).
type TwoHostOptions struct {
	Bin     string
	Backend string
	Devices [2]int
	// Env is added to both hosts' environment.
	Env          []string
	StartTimeout time.Duration
}

// CheckTwoHosts runs one host per device, side by side: two real hosts on
// two devices and two ports, each with its own data directory, sharing
// the plugin binaries. Both load the sample model with the same bytes; a
// fused apply on the second host changes its digest and leaves the first
// host's unchanged.
func CheckTwoHosts(ctx context.Context, r *Report, o TwoHostOptions) error {
	if o.StartTimeout == 0 {
		o.StartTimeout = 2 * time.Minute
	}
	var hosts [2]*host
	for i, dev := range o.Devices {
		h, err := startHost(ctx, "device-"+strconv.Itoa(dev), o.Bin,
			[]string{"--arena-backend", o.Backend, "--arena-device", strconv.Itoa(dev)}, o.Env, o.StartTimeout)
		if err != nil {
			return err
		}
		defer h.stop()
		hosts[i] = h
	}
	if hosts[0].url == hosts[1].url || hosts[0].data == hosts[1].data {
		return fmt.Errorf("two hosts share %s / %s", hosts[0].url, hosts[0].data)
	}
	for _, h := range hosts {
		var arena struct {
			Backend string `json:"backend"`
		}
		if err := h.call(ctx, "GET", "/v1/arena", nil, &arena); err != nil {
			return err
		}
		r.Note("two hosts: %s on %s, arena backend %q", h.name, h.url, arena.Backend)
	}
	before, err := bothDigests(ctx, hosts[0], hosts[1])
	if err != nil {
		return err
	}
	r.Check("two-hosts", "load: model digest, device "+strconv.Itoa(o.Devices[1])+" vs "+strconv.Itoa(o.Devices[0]), short(before[1]), "equal", before[0] == before[1])
	if err := hosts[1].call(ctx, "POST", "/v1/loras/apply", map[string]any{"model": "sample", "mode": "fuse", "loras": sampleLoRAs}, nil); err != nil {
		return err
	}
	after, err := bothDigests(ctx, hosts[0], hosts[1])
	if err != nil {
		return err
	}
	r.Check("two-hosts", "fused apply on device "+strconv.Itoa(o.Devices[1])+": its digest", short(after[1]), "changed", after[1] != before[1])
	r.Check("two-hosts", "fused apply on device "+strconv.Itoa(o.Devices[1])+": device "+strconv.Itoa(o.Devices[0])+"'s digest", short(after[0]), "unchanged", after[0] == before[0])
	return nil
}
