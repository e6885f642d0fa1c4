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

DATA  lowbyte<>+0(SB)/4, $0x000000ff
GLOBL lowbyte<>(SB), RODATA|NOPTR, $4

// BF16Y rounds the 8 floats of T to bfloat16 in place (as dequantBlocks512).
#define BF16Y(T, tmp, nan) \
	VPSRLD    $16, T, tmp     \
	VPAND     Y3, tmp, tmp    \
	VPADDD    tmp, T, tmp     \
	VPADDD    Y2, tmp, tmp    \
	VPAND     Y6, tmp, tmp    \
	VCMPPS    $3, T, T, nan   \
	VBLENDVPS nan, Y6, tmp, T

// LOOKUPY writes table[idx] (16 entries: Y4 low half, Y12 high half) for
// the 8 codes in idx to (DI)+off; idx is clobbered.
#define LOOKUPY(idx, off) \
	VPERMPS   Y4, idx, Y13       \
	VPERMPS   Y12, idx, Y14      \
	VPSLLD    $28, idx, idx      \
	VBLENDVPS idx, Y14, Y13, Y13 \
	VMOVUPS   Y13, off(DI)

// func dequantBlocks256(dst *float32, packed *byte, absmax *float32, nb int, bs int, code *[16]float32, bf16 bool)
TEXT ·dequantBlocks256(SB), NOSPLIT, $0-49
	MOVQ         dst+0(FP), DI
	MOVQ         packed+8(FP), SI
	MOVQ         absmax+16(FP), R8
	MOVQ         nb+24(FP), R9
	MOVQ         bs+32(FP), R10
	MOVQ         code+40(FP), AX
	MOVBQZX      bf16+48(FP), R11
	VMOVUPS      (AX), Y1
	VMOVUPS      32(AX), Y11
	VPBROADCASTD bf16rnd<>+0(SB), Y2
	VPBROADCASTD bf16rnd<>+4(SB), Y3
	VPBROADCASTD bf16rnd<>+8(SB), Y6
	VPBROADCASTW nibble<>+0(SB), X7
	TESTQ        R9, R9
	JZ           dq2done

dq2block:
	VBROADCASTSS (R8), Y4
	VMULPS       Y4, Y11, Y12
	VMULPS       Y4, Y1, Y4
	TESTQ        R11, R11
	JZ           dq2tab
	BF16Y(Y4, Y5, Y13)
	BF16Y(Y12, Y5, Y13)

dq2tab:
	MOVQ R10, CX

dq2loop:
	VPMOVZXBW (SI), X0
	VPSRLW    $4, X0, X8
	VPAND     X7, X0, X9
	VPSLLW    $8, X9, X9
	VPOR      X8, X9, X0
	VPMOVZXBD X0, Y9
	VPSRLDQ   $8, X0, X0
	VPMOVZXBD X0, Y10
	LOOKUPY(Y9, 0)
	LOOKUPY(Y10, 32)
	ADDQ      $8, SI
	ADDQ      $64, DI
	SUBQ      $16, CX
	JNZ       dq2loop
	ADDQ      $4, R8
	DECQ      R9
	JNZ       dq2block

dq2done:
	VZEROUPPER
	RET

// CNT adds (x > t_k) for threshold k (8 copies at k·32(R11)) to the code
// counts Y5 (elements 0–7, in Y3) and Y6 (8–15, in Y4).
#define CNT(k) \
	VCMPPS $0x1e, (k*32)(R11), Y3, Y8 \
	VPSUBD Y8, Y5, Y5                 \
	VCMPPS $0x1e, (k*32)(R11), Y4, Y8 \
	VPSUBD Y8, Y6, Y6

// func quantBlocks256(packed *byte, absmax *float32, src *float32, nb int, bs int, thr *[120]float32)
// NF4 by counting the 15 thresholds below x (thr holds each 8 times).
TEXT ·quantBlocks256(SB), NOSPLIT, $0-48
	MOVQ         packed+0(FP), DI
	MOVQ         absmax+8(FP), R8
	MOVQ         src+16(FP), SI
	MOVQ         nb+24(FP), R9
	MOVQ         bs+32(FP), R10
	MOVQ         thr+40(FP), R11
	VPBROADCASTD bf16rnd<>+12(SB), Y15
	VPBROADCASTD lowbyte<>+0(SB), Y14
	MOVL         $1, AX
	VCVTSI2SSL   AX, X10, X10
	TESTQ        R9, R9
	JZ           q2done

q2block:
	VXORPS Y0, Y0, Y0
	MOVQ   SI, BX
	MOVQ   R10, CX

q2max:
	VANDPS (BX), Y15, Y1
	VMAXPS Y0, Y1, Y0
	ADDQ   $32, BX
	SUBQ   $8, CX
	JNZ    q2max
	VEXTRACTF128 $1, Y0, X1
	VMAXPS    X1, X0, X0
	VPERMILPS $0x4e, X0, X1
	VMAXPS    X1, X0, X0
	VPERMILPS $0xb1, X0, X1
	VMAXPS    X1, X0, X0
	VMOVSS    X0, (R8)
	VDIVSS    X0, X10, X2
	VBROADCASTSS X2, Y2
	MOVQ      R10, CX

q2loop:
	VMULPS (SI), Y2, Y3
	VMULPS 32(SI), Y2, Y4
	VPXOR  Y5, Y5, Y5
	VPXOR  Y6, Y6, Y6
	CNT(0)
	CNT(1)
	CNT(2)
	CNT(3)
	CNT(4)
	CNT(5)
	CNT(6)
	CNT(7)
	CNT(8)
	CNT(9)
	CNT(10)
	CNT(11)
	CNT(12)
	CNT(13)
	CNT(14)
	// 16 codes → 8 bytes, element 2j in the high nibble.
	VPACKUSDW    Y6, Y5, Y5
	VPERMQ       $0xd8, Y5, Y5
	VPSLLD       $4, Y5, Y8
	VPSRLD       $16, Y5, Y9
	VPOR         Y8, Y9, Y8
	VPAND        Y14, Y8, Y8
	VEXTRACTI128 $1, Y8, X9
	VPACKUSDW    X9, X8, X8
	VPACKUSWB    X8, X8, X8
	VMOVQ        X8, (DI)
	ADDQ         $64, SI
	ADDQ         $8, DI
	SUBQ         $16, CX
	JNZ          q2loop
	ADDQ         $4, R8
	DECQ         R9
	JNZ          q2block

q2done:
	VZEROUPPER
	RET
