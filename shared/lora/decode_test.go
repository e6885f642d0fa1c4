package lora

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// decodeFinite decodes as shared/half does, bit for bit, and finds the
// first non-finite value in every dtype, wherever it is.
func TestDecodeFinite(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	vals := make([]float32, 1000)
	for i := range vals {
		vals[i] = float32(rng.NormFloat64())
	}
	vals[3] = 0
	vals[4] = float32(math.Copysign(0, -1))
	encode := map[safetensors.DType]func([]float32) []byte{
		safetensors.F32: func(v []float32) []byte {
			b := make([]byte, 4*len(v))
			for i, f := range v {
				binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(f))
			}
			return b
		},
		safetensors.BF16: func(v []float32) []byte { b := make([]byte, 2*len(v)); half.EncodeBF16(b, v); return b },
		safetensors.F16:  func(v []float32) []byte { b := make([]byte, 2*len(v)); half.EncodeF16(b, v); return b },
	}
	decode := map[safetensors.DType]func([]float32, []byte) int{
		safetensors.F32: half.DecodeF32, safetensors.BF16: half.DecodeBF16, safetensors.F16: half.DecodeF16,
	}
	for _, dt := range []safetensors.DType{safetensors.F32, safetensors.BF16, safetensors.F16} {
		for _, c := range []struct {
			name string
			at   int
			bad  float32
		}{
			{"finite", -1, 0},
			{"NaN first", 0, float32(math.NaN())},
			{"+Inf inside", 517, float32(math.Inf(1))},
			{"-Inf last", len(vals) - 1, float32(math.Inf(-1))},
		} {
			t.Run(string(dt)+" "+c.name, func(t *testing.T) {
				v := append([]float32(nil), vals...)
				if c.at >= 0 {
					v[c.at] = c.bad
					if later := (c.at + len(v)) / 2; later > c.at {
						v[later] = float32(math.NaN()) // a later one is not reported
					}
				}
				src := encode[dt](v)
				got, want := make([]float32, len(v)), make([]float32, len(v))
				if bad := decodeFinite(got, src, dt); bad != c.at {
					t.Fatalf("first non-finite at %d, want %d", bad, c.at)
				}
				if c.at >= 0 {
					return
				}
				decode[dt](want, src)
				for i := range want {
					if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
						t.Fatalf("value %d: %08x, want %08x", i, math.Float32bits(got[i]), math.Float32bits(want[i]))
					}
				}
			})
		}
	}
}
