//go:build cuda

package cuda

import "github.com/arenahost/arenahost/shared/gpu"

// With the driver, a gpu.Device stages uploads through page-locked memory.
func init() {
	pinnedStaging = func(m Mover, n int) ([]byte, func() error, error) {
		d, ok := m.(*gpu.Device)
		if !ok {
			return nil, nil, nil
		}
		pb, err := d.Pinned(n)
		if err != nil {
			return nil, nil, err
		}
		return pb.Bytes(), pb.Close, nil
	}
}
