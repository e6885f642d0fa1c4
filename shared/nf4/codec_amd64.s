//go:build amd64

#include "textflag.h"

// AVX-512 kernels of the 4-bit codec (codec_simd.go). Both give the bits
// of the scalar code: dequantize is a table lookup (VPERMPS) in the
// block's 16 products code[i]·absmax, each rounded once (and, for
// bfloat16, rounded to it as half.F32ToBF16 does, NaN to 0xFFFF); quantize
// takes the block's absmax with VMAXPS (a NaN element never wins, as with
// the scalar "a > am"), 1/absmax with VDIVSS, x·inv with VMULPS, and the
// NF4 code as the count of thresholds strictly below x by a four-step
// binary search (a NaN compares false everywhere: code 0).

DATA  bf16rnd<>+0(SB)/4, $0x00007fff
DATA  bf16rnd<>+4(SB)/4, $0x00000001
DATA  bf16rnd<>+8(SB)/4, $0xffff0000
DATA  bf16rnd<>+12(SB)/4, $0x7fffffff
GLOBL bf16rnd<>(SB), RODATA|NOPTR, $16

DATA  nibble<>+0(SB)/2, $0x000f
GLOBL nibble<>(SB), RODATA|NOPTR, $2

DATA  steps<>+0(SB)/4, $7
DATA  steps<>+4(SB)/4, $3
DATA  steps<>+8(SB)/4, $1
DATA  steps<>+12(SB)/4, $8
DATA  steps<>+16(SB)/4, $4
DATA  steps<>+20(SB)/4, $2
DATA  steps<>+24(SB)/4, $1
GLOBL steps<>(SB), RODATA|NOPTR, $28

// func dequantBlocks512(dst *float32, packed *byte, absmax *float32, nb int, bs int, code *[16]float32, bf16 bool)
// nb whole blocks of bs values (a multiple of 16).
TEXT ·dequantBlocks512(SB), NOSPLIT, $0-49
	MOVQ         dst+0(FP), DI
	MOVQ         packed+8(FP), SI
	MOVQ         absmax+16(FP), R8
	MOVQ         nb+24(FP), R9
	MOVQ         bs+32(FP), R10
	MOVQ         code+40(FP), AX
	MOVBQZX      bf16+48(FP), R11
	VMOVUPS      (AX), Z1
	VPBROADCASTD bf16rnd<>+0(SB), Z2
	VPBROADCASTD bf16rnd<>+4(SB), Z3
	VPBROADCASTD bf16rnd<>+8(SB), Z6
	VPBROADCASTW nibble<>+0(SB), X7
	TESTQ        R9, R9
	JZ           dqdone

dqblock:
	VBROADCASTSS (R8), Z4
	VMULPS       Z4, Z1, Z4
	TESTQ        R11, R11
	JZ           dqtab
	// bfloat16: (b + 0x7fff + (b>>16 & 1)) & 0xffff0000, NaN → 0xffff0000.
	VPSRLD       $16, Z4, Z5
	VPANDD       Z3, Z5, Z5
	VPADDD       Z5, Z4, Z5
	VPADDD       Z2, Z5, Z5
	VPANDD       Z6, Z5, Z5
	VCMPPS       $3, Z4, Z4, K1
	VMOVDQA32    Z6, K1, Z5
	VMOVAPS      Z5, Z4

dqtab:
	MOVQ R10, CX

dqloop:
	// 8 packed bytes → 16 codes, high nibble first: word j = hi_j | lo_j<<8.
	VPMOVZXBW (SI), X0
	VPSRLW    $4, X0, X8
	VPAND     X7, X0, X9
	VPSLLW    $8, X9, X9
	VPOR      X8, X9, X0
	VPMOVZXBD X0, Z0
	VPERMPS   Z4, Z0, Z5
	VMOVUPS   Z5, (DI)
	ADDQ      $8, SI
	ADDQ      $64, DI
	SUBQ      $16, CX
	JNZ       dqloop
	ADDQ      $4, R8
	DECQ      R9
	JNZ       dqblock

dqdone:
	VZEROUPPER
	RET

// func quantBlocks512(packed *byte, absmax *float32, src *float32, nb int, bs int, thr *[16]float32)
// NF4, nb whole blocks of bs values (a multiple of 16).
TEXT ·quantBlocks512(SB), NOSPLIT, $0-48
	MOVQ         packed+0(FP), DI
	MOVQ         absmax+8(FP), R8
	MOVQ         src+16(FP), SI
	MOVQ         nb+24(FP), R9
	MOVQ         bs+32(FP), R10
	MOVQ         thr+40(FP), AX
	VMOVUPS      (AX), Z20
	VPBROADCASTD bf16rnd<>+12(SB), Z21
	VPBROADCASTD steps<>+0(SB), Z22
	VPBROADCASTD steps<>+4(SB), Z23
	VPBROADCASTD steps<>+8(SB), Z24
	VPBROADCASTD steps<>+12(SB), Z25
	VPBROADCASTD steps<>+16(SB), Z26
	VPBROADCASTD steps<>+20(SB), Z27
	VPBROADCASTD steps<>+24(SB), Z28
	MOVL         $1, AX
	VCVTSI2SSL   AX, X10, X10
	TESTQ        R9, R9
	JZ           qdone

qblock:
	// absmax: max |x| over the block.
	VPXORD  Z0, Z0, Z0
	MOVQ    SI, BX
	MOVQ    R10, CX

qmax:
	VANDPS  (BX), Z21, Z1
	VMAXPS  Z0, Z1, Z0
	ADDQ    $64, BX
	SUBQ    $16, CX
	JNZ     qmax
	VEXTRACTF64X4 $1, Z0, Y1
	VMAXPS  Y1, Y0, Y0
	VEXTRACTF128 $1, Y0, X1
	VMAXPS  X1, X0, X0
	VPERMILPS $0x4e, X0, X1
	VMAXPS  X1, X0, X0
	VPERMILPS $0xb1, X0, X1
	VMAXPS  X1, X0, X0
	VMOVSS  X0, (R8)
	VDIVSS  X0, X10, X2
	VBROADCASTSS X2, Z2
	MOVQ    R10, CX

qloop:
	VMULPS  (SI), Z2, Z3
	// code = #{thresholds t < x}: binary search over t[0..14].
	VPXORD  Z4, Z4, Z4
	VPERMPS Z20, Z22, Z5
	VCMPPS  $0x1e, Z5, Z3, K1
	VMOVDQA32 Z25, K1, Z4
	VPADDD  Z23, Z4, Z6
	VPERMPS Z20, Z6, Z5
	VCMPPS  $0x1e, Z5, Z3, K1
	VPADDD  Z26, Z4, K1, Z4
	VPADDD  Z24, Z4, Z6
	VPERMPS Z20, Z6, Z5
	VCMPPS  $0x1e, Z5, Z3, K1
	VPADDD  Z27, Z4, K1, Z4
	VPERMPS Z20, Z4, Z5
	VCMPPS  $0x1e, Z5, Z3, K1
	VPADDD  Z28, Z4, K1, Z4
	// 16 codes → 8 bytes, element 2j in the high nibble.
	VPMOVDB Z4, X5
	VPSLLW  $4, X5, X6
	VPSRLW  $8, X5, X7
	VPOR    X6, X7, X6
	VPMOVWB X6, X7
	VMOVQ   X7, (DI)
	ADDQ    $64, SI
	ADDQ    $8, DI
	SUBQ    $16, CX
	JNZ     qloop
	ADDQ    $4, R8
	DECQ    R9
	JNZ     qblock

qdone:
	VZEROUPPER
	RET
