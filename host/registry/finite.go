package registry

import (
	"fmt"
	"math"

	"github.com/arenahost/arenahost/shared/nf4"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// quantTensors is what checkQuantFinite reads: a file or a folder's shards.
type quantTensors interface {
	Lookup(name string) (safetensors.TensorInfo, bool)
	Data(name string) ([]byte, error)
}

// checkQuantFinite refuses a checkpoint whose 4-bit quantization state
// holds a NaN or an infinity: absmax, the quant maps, the nested absmax and
// the nested offset. Such a model dequantizes to NaN everywhere, and a fuse
// into it can only spread them. It reads the small side tensors from the
// mapping (no copy) before anything is allocated, and names the tensor.
func checkQuantFinite(path string, f quantTensors, weights []nf4.Weight) error {
	for _, w := range weights {
		if st := w.State; st.Nested && (math.IsNaN(st.NestedOffset) || math.IsInf(st.NestedOffset, 0)) {
			return fmt.Errorf("%s: weight %s: quant state nested_offset is %v: the quantization state must be finite", path, w.Name, st.NestedOffset)
		}
		for _, key := range []string{w.Keys.Absmax, w.Keys.QuantMap, w.Keys.NestedAbsmax, w.Keys.NestedQuantMap} {
			if key == "" {
				continue
			}
			info, ok := f.Lookup(key)
			if !ok {
				continue // GroupWeights has already required it
			}
			data, err := f.Data(key)
			if err != nil {
				return fmt.Errorf("%s: tensor %s: %w", path, key, err)
			}
			if i, v := safetensors.FirstNonFinite(info.DType, data); i >= 0 {
				return fmt.Errorf("%s: tensor %s: element %d is %v: the quantization state must be finite", path, key, i, v)
			}
		}
	}
	return nil
}
