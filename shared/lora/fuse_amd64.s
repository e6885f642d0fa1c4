//go:build amd64

#include "textflag.h"

// Element-wise steps of fuseLayer's tile (fuse_amd64.go), n a multiple of
// 16.

// func addF32x512(dst, a, b *float32, n int)
// dst[i] = a[i] + b[i], one rounding, as the scalar loop.
TEXT ·addF32x512(SB), NOSPLIT, $0-32
	MOVQ dst+0(FP), DI
	MOVQ a+8(FP), SI
	MOVQ b+16(FP), DX
	MOVQ n+24(FP), CX
	TESTQ CX, CX
	JZ   adddone

addloop:
	VMOVUPS (SI), Z0
	VADDPS  (DX), Z0, Z0
	VMOVUPS Z0, (DI)
	ADDQ    $64, SI
	ADDQ    $64, DX
	ADDQ    $64, DI
	SUBQ    $16, CX
	JNZ     addloop

adddone:
	VZEROUPPER
	RET

// func fitSums512(w, orig, delta *float32, n int, acc *[24]float64)
// Per lane (8 each), in float64: acc[0:8] += eff·want, acc[8:16] += want²,
// acc[16:24] += (eff − want)², with eff = w − orig and want = delta.
TEXT ·fitSums512(SB), NOSPLIT, $0-40
	MOVQ   w+0(FP), DI
	MOVQ   orig+8(FP), SI
	MOVQ   delta+16(FP), DX
	MOVQ   n+24(FP), CX
	MOVQ   acc+32(FP), AX
	VPXORQ Z10, Z10, Z10
	VPXORQ Z11, Z11, Z11
	VPXORQ Z12, Z12, Z12
	VPXORQ Z13, Z13, Z13
	VPXORQ Z14, Z14, Z14
	VPXORQ Z15, Z15, Z15
	TESTQ  CX, CX
	JZ     fitdone

fitloop:
	VCVTPS2PD (DI), Z0
	VCVTPS2PD (SI), Z1
	VCVTPS2PD (DX), Z2
	VSUBPD    Z1, Z0, Z3
	VMULPD    Z2, Z3, Z4
	VADDPD    Z4, Z10, Z10
	VMULPD    Z2, Z2, Z4
	VADDPD    Z4, Z11, Z11
	VSUBPD    Z2, Z3, Z5
	VMULPD    Z5, Z5, Z5
	VADDPD    Z5, Z12, Z12
	VCVTPS2PD 32(DI), Z0
	VCVTPS2PD 32(SI), Z1
	VCVTPS2PD 32(DX), Z2
	VSUBPD    Z1, Z0, Z3
	VMULPD    Z2, Z3, Z4
	VADDPD    Z4, Z13, Z13
	VMULPD    Z2, Z2, Z4
	VADDPD    Z4, Z14, Z14
	VSUBPD    Z2, Z3, Z5
	VMULPD    Z5, Z5, Z5
	VADDPD    Z5, Z15, Z15
	ADDQ      $64, DI
	ADDQ      $64, SI
	ADDQ      $64, DX
	SUBQ      $16, CX
	JNZ       fitloop

fitdone:
	VADDPD  Z13, Z10, Z10
	VADDPD  Z14, Z11, Z11
	VADDPD  Z15, Z12, Z12
	VADDPD  (AX), Z10, Z10
	VADDPD  64(AX), Z11, Z11
	VADDPD  128(AX), Z12, Z12
	VMOVUPD Z10, (AX)
	VMOVUPD Z11, 64(AX)
	VMOVUPD Z12, 128(AX)
	VZEROUPPER
	RET

// func addF32x256(dst, a, b *float32, n int)
TEXT ·addF32x256(SB), NOSPLIT, $0-32
	MOVQ  dst+0(FP), DI
	MOVQ  a+8(FP), SI
	MOVQ  b+16(FP), DX
	MOVQ  n+24(FP), CX
	TESTQ CX, CX
	JZ    add2done

add2loop:
	VMOVUPS (SI), Y0
	VMOVUPS 32(SI), Y1
	VADDPS  (DX), Y0, Y0
	VADDPS  32(DX), Y1, Y1
	VMOVUPS Y0, (DI)
	VMOVUPS Y1, 32(DI)
	ADDQ    $64, SI
	ADDQ    $64, DX
	ADDQ    $64, DI
	SUBQ    $16, CX
	JNZ     add2loop

add2done:
	VZEROUPPER
	RET

// FIT4 adds the sums of 4 elements at off into the accumulators D, N, E.
#define FIT4(off, D, N, E) \
	VCVTPS2PD off(DI), Y0 \
	VCVTPS2PD off(SI), Y1 \
	VCVTPS2PD off(DX), Y2 \
	VSUBPD    Y1, Y0, Y3  \
	VMULPD    Y2, Y3, Y4  \
	VADDPD    Y4, D, D    \
	VMULPD    Y2, Y2, Y4  \
	VADDPD    Y4, N, N    \
	VSUBPD    Y2, Y3, Y5  \
	VMULPD    Y5, Y5, Y5  \
	VADDPD    Y5, E, E

// func fitSums256(w, orig, delta *float32, n int, acc *[24]float64)
// fitSums512 in two sets of 4 lanes: acc[0:4] and acc[4:8] and so on.
TEXT ·fitSums256(SB), NOSPLIT, $0-40
	MOVQ  w+0(FP), DI
	MOVQ  orig+8(FP), SI
	MOVQ  delta+16(FP), DX
	MOVQ  n+24(FP), CX
	MOVQ  acc+32(FP), AX
	VXORPD Y10, Y10, Y10
	VXORPD Y11, Y11, Y11
	VXORPD Y12, Y12, Y12
	VXORPD Y13, Y13, Y13
	VXORPD Y14, Y14, Y14
	VXORPD Y15, Y15, Y15
	TESTQ CX, CX
	JZ    fit2done

fit2loop:
	FIT4(0, Y10, Y11, Y12)
	FIT4(16, Y13, Y14, Y15)
	FIT4(32, Y10, Y11, Y12)
	FIT4(48, Y13, Y14, Y15)
	ADDQ $64, DI
	ADDQ $64, SI
	ADDQ $64, DX
	SUBQ $16, CX
	JNZ  fit2loop

fit2done:
	VADDPD  (AX), Y10, Y10
	VADDPD  32(AX), Y13, Y13
	VADDPD  64(AX), Y11, Y11
	VADDPD  96(AX), Y14, Y14
	VADDPD  128(AX), Y12, Y12
	VADDPD  160(AX), Y15, Y15
	VMOVUPD Y10, (AX)
	VMOVUPD Y13, 32(AX)
	VMOVUPD Y11, 64(AX)
	VMOVUPD Y14, 96(AX)
	VMOVUPD Y12, 128(AX)
	VMOVUPD Y15, 160(AX)
	VZEROUPPER
	RET
