//go:build cuda

package main

import (
	"context"
	"encoding/binary"
	"errors"
	"math"

	"github.com/arenahost/arenahost/shared/gpu"
)

// pool tracks the device buffers of one check so they are all freed.
type pool struct {
	dev   *gpu.Device
	ptrs  []gpu.DevicePtr
	bytes int64
}

func newPool(dev *gpu.Device) *pool { return &pool{dev: dev} }

func (p *pool) alloc(n int) (gpu.DevicePtr, error) {
	d, err := p.dev.MemAlloc(uint64(max(n, 1)))
	if err != nil {
		return 0, err
	}
	if err := p.dev.Zero(d, uint64(max(n, 1))); err != nil {
		return 0, err
	}
	p.ptrs = append(p.ptrs, d)
	p.bytes += int64(n)
	return d, nil
}

func (p *pool) put(b []byte) (gpu.DevicePtr, error) {
	d, err := p.alloc(len(b))
	if err != nil {
		return 0, err
	}
	return d, p.dev.Upload(context.Background(), d, b)
}

func (p *pool) putF32(v []float32) (gpu.DevicePtr, error) { return p.put(f32Bytes(v)) }

func (p *pool) get(d gpu.DevicePtr, n int) ([]byte, error) {
	b := make([]byte, n)
	return b, p.dev.Download(b, d)
}

func (p *pool) getF32(d gpu.DevicePtr, n int) ([]float32, error) {
	b, err := p.get(d, 4*n)
	if err != nil {
		return nil, err
	}
	return bytesF32(b), nil
}

func (p *pool) free() error {
	var errs []error
	for _, d := range p.ptrs {
		errs = append(errs, p.dev.MemFree(d))
	}
	p.ptrs, p.bytes = nil, 0
	return errors.Join(errs...)
}

func f32Bytes(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

func bytesF32(b []byte) []float32 {
	v := make([]float32, len(b)/4)
	for i := range v {
		v[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return v
}

func u16Bytes(v []uint16) []byte {
	b := make([]byte, 2*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint16(b[2*i:], x)
	}
	return b
}
