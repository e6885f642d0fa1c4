package registry

import (
	"hash/crc32"
	"runtime"
	"sync"
)

// The load checksums every byte it copies (Tensor.LoadCRC). One core
// computes CRC-32C at about the speed a device upload goes, so a chunk is
// checksummed in parallel pieces whose CRCs are then combined.

// castagnoli is CRC-32C, which the hardware computes on amd64 and arm64.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crcPiece is the smallest piece worth a goroutine of its own.
const crcPiece = 1 << 20

// updateCRC is crc32.Update(crc, castagnoli, p), computed in up to
// GOMAXPROCS pieces of at least crcPiece bytes at once (ReadCRC with the
// bytes already in p).
func updateCRC(crc uint32, p []byte) uint32 {
	crc, _ = ReadCRC(crc, p, 0, func([]byte, int64) error { return nil })
	return crc
}

// ReadCRC fills p with the bytes at off (read is called concurrently, on
// disjoint pieces of p of at least crcPiece bytes, up to GOMAXPROCS at
// once: a mapped file copies and faults in parallel) and returns the
// CRC-32C of crc followed by p, each piece checksummed while it is still
// in cache. The first failing piece's error (in file order) is returned.
func ReadCRC(crc uint32, p []byte, off int64, read func(p []byte, off int64) error) (uint32, error) {
	k := min(runtime.GOMAXPROCS(0), len(p)/crcPiece)
	if k < 2 {
		if err := read(p, off); err != nil {
			return 0, err
		}
		return crc32.Update(crc, castagnoli, p), nil
	}
	size := (len(p) + k - 1) / k
	sums, errs := make([]uint32, k), make([]error, k)
	var wg sync.WaitGroup
	for i := range k {
		wg.Add(1)
		go func() {
			defer wg.Done()
			piece := p[i*size : min((i+1)*size, len(p))]
			if errs[i] = read(piece, off+int64(i*size)); errs[i] == nil {
				sums[i] = crc32.Checksum(piece, castagnoli)
			}
		}()
	}
	wg.Wait()
	for i, s := range sums {
		if errs[i] != nil {
			return 0, errs[i]
		}
		crc = combineCRC(crc, s, int64(min((i+1)*size, len(p))-i*size))
	}
	return crc, nil
}

// combineCRC returns the CRC-32C of A followed by B from crcA, crcB and
// len(B), as zlib's crc32_combine does for its CRC: crcA is carried over
// lenB zero bytes by squaring the one-zero-bit operator in GF(2), then
// crcB is added.
func combineCRC(crcA, crcB uint32, lenB int64) uint32 {
	if lenB <= 0 {
		return crcA
	}
	var even, odd [32]uint32
	odd[0] = 0x82f63b78 // the reflected Castagnoli polynomial
	row := uint32(1)
	for n := 1; n < 32; n++ {
		odd[n] = row
		row <<= 1
	}
	gf2Square(&even, &odd) // two zero bits
	gf2Square(&odd, &even) // four zero bits
	for {
		gf2Square(&even, &odd) // one zero byte, then two, four, …
		if lenB&1 != 0 {
			crcA = gf2Times(&even, crcA)
		}
		if lenB >>= 1; lenB == 0 {
			break
		}
		gf2Square(&odd, &even)
		if lenB&1 != 0 {
			crcA = gf2Times(&odd, crcA)
		}
		if lenB >>= 1; lenB == 0 {
			break
		}
	}
	return crcA ^ crcB
}

func gf2Times(mat *[32]uint32, vec uint32) uint32 {
	var sum uint32
	for i := 0; vec != 0; i, vec = i+1, vec>>1 {
		if vec&1 != 0 {
			sum ^= mat[i]
		}
	}
	return sum
}

func gf2Square(square, mat *[32]uint32) {
	for n := range 32 {
		square[n] = gf2Times(mat, mat[n])
	}
}
