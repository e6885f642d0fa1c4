//go:build !amd64

package nf4

func vecBlocks(int) bool { return false }

func dequantVec([]float32, []byte, []float32, *[16]float32, int, int, int, bool) {}

func quantVecNF4([]byte, []float32, []float32, int, int, int) {}
