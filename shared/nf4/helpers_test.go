package nf4

import "github.com/arenahost/arenahost/shared/half"

func f16(h uint16) float32 { return half.F16ToF32(h) }
