package registry

import (
	"bytes"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"
)

// updateCRC and combineCRC give crc32's CRC-32C for every split: empty,
// odd and piece-sized lengths, carried over earlier bytes.
func TestUpdateCRC(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	data := make([]byte, 5*crcPiece+12345)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	for _, tc := range []struct {
		name       string
		prev, size int
	}{
		{"empty", 0, 0},
		{"one byte", 0, 1},
		{"below a piece", 7, crcPiece - 1},
		{"two pieces", 0, 2 * crcPiece},
		{"several pieces, odd length, after earlier bytes", 1001, 4*crcPiece + 12345},
	} {
		t.Run(tc.name, func(t *testing.T) {
			prev := crc32.Checksum(data[:tc.prev], castagnoli)
			p := data[tc.prev : tc.prev+tc.size]
			want := crc32.Checksum(data[:tc.prev+tc.size], castagnoli)
			if got := updateCRC(prev, p); got != want {
				t.Errorf("updateCRC = %08x, want %08x", got, want)
			}
			if got := combineCRC(prev, crc32.Checksum(p, castagnoli), int64(len(p))); got != want {
				t.Errorf("combineCRC = %08x, want %08x", got, want)
			}
		})
	}
}

// ReadCRC reads every byte once, from the right offsets, gives crc32's
// CRC-32C carried over earlier bytes, and returns the first failing
// piece's error.
func TestReadCRC(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(8)) // pieces in parallel on any machine
	rng := rand.New(rand.NewPCG(3, 4))
	data := make([]byte, 5*crcPiece+12345)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	errBad := errors.New("bad piece")
	for _, tc := range []struct {
		name       string
		prev, size int
		failAt     int // a read covering this offset fails (-1: none)
	}{
		{"below a piece", 7, crcPiece - 1, -1},
		{"two pieces", 0, 2 * crcPiece, -1},
		{"several pieces, odd length, after earlier bytes", 1001, 4*crcPiece + 12345, -1},
		{"a failing piece in the middle", 0, 4 * crcPiece, 2*crcPiece + 10},
		{"a failing single read", 0, 100, 50},
	} {
		t.Run(tc.name, func(t *testing.T) {
			prev := crc32.Checksum(data[:tc.prev], castagnoli)
			p := make([]byte, tc.size)
			var mu sync.Mutex
			var covered int
			crc, err := ReadCRC(prev, p, int64(tc.prev), func(q []byte, off int64) error {
				if tc.failAt >= 0 && int64(tc.failAt) >= off && int64(tc.failAt) < off+int64(len(q)) {
					return errBad
				}
				copy(q, data[off:])
				mu.Lock()
				covered += len(q)
				mu.Unlock()
				return nil
			})
			if tc.failAt >= 0 {
				if !errors.Is(err, errBad) {
					t.Fatalf("err %v, want the failing piece's", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if covered != tc.size || !bytes.Equal(p, data[tc.prev:tc.prev+tc.size]) {
				t.Fatalf("read %d of %d bytes, or the wrong ones", covered, tc.size)
			}
			if want := crc32.Checksum(data[:tc.prev+tc.size], castagnoli); crc != want {
				t.Errorf("ReadCRC = %08x, want %08x", crc, want)
			}
		})
	}
}
