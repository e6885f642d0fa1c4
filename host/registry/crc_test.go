package registry

import (
	"hash/crc32"
	"math/rand/v2"
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
