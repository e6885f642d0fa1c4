//go:build amd64

#include "textflag.h"

// The factor-product micro-kernels of SideLayer.DeltaRows (delta_amd64.go).
// Each adds, for rows rows and one strip of columns, the products of the
// given rank groups and single ranks into dst, in the scalar code's exact
// order: per element, s = b0·a0 + b1·a1; s += b2·a2; s += b3·a3; d += s
// for each group of four ranks, then d += b·a for each single rank. Every
// product and sum is rounded on its own (VMULPS, VADDPS: no FMA), so the
// bits equal the scalar path's, which the CUDA kernel and the C++
// emulator reproduce too.
//
// Arguments (ABI0, all counts in elements):
//   dst *float32, ldd int   the strip's first column in row 0 of the tile; row stride
//   b *float32, ldb int     B_cat row 0 (strengths folded in); row stride (Σr)
//   a *float32, lda int     the strip's first column in A_cat row 0; row stride (In)
//   gs *int32, ng int       first rank of each group of four to add
//   ss *int32, ns int       single ranks to add after the groups
//   rows int
//
// Registers: DI dst row, SI b row, DX a strip, R8/R9/R10 the strides in
// bytes, R11/R12 groups, R13/R14 singles, R15 rows left, AX index, BX and
// CX the group's A rows k and k+2.

#define ARGS \
	MOVQ dst+0(FP), DI   \
	MOVQ ldd+8(FP), R8   \
	SHLQ $2, R8          \
	MOVQ b+16(FP), SI    \
	MOVQ ldb+24(FP), R9  \
	SHLQ $2, R9          \
	MOVQ a+32(FP), DX    \
	MOVQ lda+40(FP), R10 \
	SHLQ $2, R10         \
	MOVQ gs+48(FP), R11  \
	MOVQ ng+56(FP), R12  \
	MOVQ ss+64(FP), R13  \
	MOVQ ns+72(FP), R14  \
	MOVQ rows+80(FP), R15

// GROUP adds one column vector's group product: acc += ((b0·a0 + b1·a1)
// + b2·a2) + b3·a3, with b0..b3 broadcast in B0..B3.
#define GROUP(off, acc, s, t, B0, B1, B2, B3) \
	VMULPS off(BX), B0, s          \
	VMULPS off(BX)(R10*1), B1, t   \
	VADDPS t, s, s                 \
	VMULPS off(CX), B2, t          \
	VADDPS t, s, s                 \
	VMULPS off(CX)(R10*1), B3, t   \
	VADDPS t, s, s                 \
	VADDPS s, acc, acc

// GROUPHEAD loads group AX's k, broadcasts b[k..k+3] into B0..B3 and
// points BX and CX at A rows k and k+2.
#define GROUPHEAD(B0, B1, B2, B3) \
	MOVLQSX (R11)(AX*4), BX      \
	VBROADCASTSS 0(SI)(BX*4), B0  \
	VBROADCASTSS 4(SI)(BX*4), B1  \
	VBROADCASTSS 8(SI)(BX*4), B2  \
	VBROADCASTSS 12(SI)(BX*4), B3 \
	IMULQ R10, BX                 \
	ADDQ DX, BX                   \
	LEAQ (BX)(R10*2), CX

// SINGLEHEAD broadcasts b[k] for single AX into B0 and points BX at A row k.
#define SINGLEHEAD(B0) \
	MOVLQSX (R13)(AX*4), BX    \
	VBROADCASTSS (SI)(BX*4), B0 \
	IMULQ R10, BX               \
	ADDQ DX, BX

#define SINGLE(off, acc, t, B0) \
	VMULPS off(BX), B0, t \
	VADDPS t, acc, acc

// func factors512x64(dst *float32, ldd int, b *float32, ldb int, a *float32, lda int, gs *int32, ng int, ss *int32, ns int, rows int)
TEXT ·factors512x64(SB), NOSPLIT, $0-88
	ARGS
	TESTQ R15, R15
	JZ    done512x64

row512x64:
	VMOVUPS 0(DI), Z0
	VMOVUPS 64(DI), Z1
	VMOVUPS 128(DI), Z2
	VMOVUPS 192(DI), Z3
	XORQ    AX, AX

group512x64:
	CMPQ AX, R12
	JGE  singles512x64
	GROUPHEAD(Z4, Z5, Z6, Z7)
	GROUP(0, Z0, Z8, Z9, Z4, Z5, Z6, Z7)
	GROUP(64, Z1, Z10, Z11, Z4, Z5, Z6, Z7)
	GROUP(128, Z2, Z12, Z13, Z4, Z5, Z6, Z7)
	GROUP(192, Z3, Z14, Z15, Z4, Z5, Z6, Z7)
	INCQ AX
	JMP  group512x64

singles512x64:
	XORQ AX, AX

single512x64:
	CMPQ AX, R14
	JGE  store512x64
	SINGLEHEAD(Z4)
	SINGLE(0, Z0, Z8, Z4)
	SINGLE(64, Z1, Z9, Z4)
	SINGLE(128, Z2, Z10, Z4)
	SINGLE(192, Z3, Z11, Z4)
	INCQ AX
	JMP  single512x64

store512x64:
	VMOVUPS Z0, 0(DI)
	VMOVUPS Z1, 64(DI)
	VMOVUPS Z2, 128(DI)
	VMOVUPS Z3, 192(DI)
	ADDQ    R8, DI
	ADDQ    R9, SI
	DECQ    R15
	JNZ     row512x64

done512x64:
	VZEROUPPER
	RET

// func factors512x16(dst *float32, ldd int, b *float32, ldb int, a *float32, lda int, gs *int32, ng int, ss *int32, ns int, rows int)
TEXT ·factors512x16(SB), NOSPLIT, $0-88
	ARGS
	TESTQ R15, R15
	JZ    done512x16

row512x16:
	VMOVUPS 0(DI), Z0
	XORQ    AX, AX

group512x16:
	CMPQ AX, R12
	JGE  singles512x16
	GROUPHEAD(Z4, Z5, Z6, Z7)
	GROUP(0, Z0, Z8, Z9, Z4, Z5, Z6, Z7)
	INCQ AX
	JMP  group512x16

singles512x16:
	XORQ AX, AX

single512x16:
	CMPQ AX, R14
	JGE  store512x16
	SINGLEHEAD(Z4)
	SINGLE(0, Z0, Z8, Z4)
	INCQ AX
	JMP  single512x16

store512x16:
	VMOVUPS Z0, 0(DI)
	ADDQ    R8, DI
	ADDQ    R9, SI
	DECQ    R15
	JNZ     row512x16

done512x16:
	VZEROUPPER
	RET

// func factors256x32(dst *float32, ldd int, b *float32, ldb int, a *float32, lda int, gs *int32, ng int, ss *int32, ns int, rows int)
TEXT ·factors256x32(SB), NOSPLIT, $0-88
	ARGS
	TESTQ R15, R15
	JZ    done256x32

row256x32:
	VMOVUPS 0(DI), Y0
	VMOVUPS 32(DI), Y1
	VMOVUPS 64(DI), Y2
	VMOVUPS 96(DI), Y3
	XORQ    AX, AX

group256x32:
	CMPQ AX, R12
	JGE  singles256x32
	GROUPHEAD(Y4, Y5, Y6, Y7)
	GROUP(0, Y0, Y8, Y9, Y4, Y5, Y6, Y7)
	GROUP(32, Y1, Y10, Y11, Y4, Y5, Y6, Y7)
	GROUP(64, Y2, Y12, Y13, Y4, Y5, Y6, Y7)
	GROUP(96, Y3, Y14, Y15, Y4, Y5, Y6, Y7)
	INCQ AX
	JMP  group256x32

singles256x32:
	XORQ AX, AX

single256x32:
	CMPQ AX, R14
	JGE  store256x32
	SINGLEHEAD(Y4)
	SINGLE(0, Y0, Y8, Y4)
	SINGLE(32, Y1, Y9, Y4)
	SINGLE(64, Y2, Y10, Y4)
	SINGLE(96, Y3, Y11, Y4)
	INCQ AX
	JMP  single256x32

store256x32:
	VMOVUPS Y0, 0(DI)
	VMOVUPS Y1, 32(DI)
	VMOVUPS Y2, 64(DI)
	VMOVUPS Y3, 96(DI)
	ADDQ    R8, DI
	ADDQ    R9, SI
	DECQ    R15
	JNZ     row256x32

done256x32:
	VZEROUPPER
	RET

// func factors256x8(dst *float32, ldd int, b *float32, ldb int, a *float32, lda int, gs *int32, ng int, ss *int32, ns int, rows int)
TEXT ·factors256x8(SB), NOSPLIT, $0-88
	ARGS
	TESTQ R15, R15
	JZ    done256x8

row256x8:
	VMOVUPS 0(DI), Y0
	XORQ    AX, AX

group256x8:
	CMPQ AX, R12
	JGE  singles256x8
	GROUPHEAD(Y4, Y5, Y6, Y7)
	GROUP(0, Y0, Y8, Y9, Y4, Y5, Y6, Y7)
	INCQ AX
	JMP  group256x8

singles256x8:
	XORQ AX, AX

single256x8:
	CMPQ AX, R14
	JGE  store256x8
	SINGLEHEAD(Y4)
	SINGLE(0, Y0, Y8, Y4)
	INCQ AX
	JMP  single256x8

store256x8:
	VMOVUPS Y0, 0(DI)
	ADDQ    R8, DI
	ADDQ    R9, SI
	DECQ    R15
	JNZ     row256x8

done256x8:
	VZEROUPPER
	RET

// G2 adds one column vector's group product for one row with the four A
// vectors in registers and b0..b3 broadcast in Z8..Z11.
#define G2(acc, a0, a1, a2, a3, s, t) \
	VMULPS a0, Z8, s   \
	VMULPS a1, Z9, t   \
	VADDPS t, s, s     \
	VMULPS a2, Z10, t  \
	VADDPS t, s, s     \
	VMULPS a3, Z11, t  \
	VADDPS t, s, s     \
	VADDPS s, acc, acc

// func factors512x64r2(dst *float32, ldd int, b *float32, ldb int, a *float32, lda int, gs *int32, ng int, ss *int32, ns int, rows int)
// factors512x64 on rows/2 pairs of rows (rows even): each group's 16 A
// vectors are loaded once into Z16..Z31 and used by both rows.
TEXT ·factors512x64r2(SB), NOSPLIT, $0-88
	ARGS
	SHRQ $1, R15
	JZ   doner2

rowr2:
	VMOVUPS 0(DI), Z0
	VMOVUPS 64(DI), Z1
	VMOVUPS 128(DI), Z2
	VMOVUPS 192(DI), Z3
	VMOVUPS 0(DI)(R8*1), Z4
	VMOVUPS 64(DI)(R8*1), Z5
	VMOVUPS 128(DI)(R8*1), Z6
	VMOVUPS 192(DI)(R8*1), Z7
	XORQ    AX, AX

groupr2:
	CMPQ    AX, R12
	JGE     singlesr2
	MOVLQSX (R11)(AX*4), BX
	LEAQ    (SI)(BX*4), CX
	IMULQ   R10, BX
	ADDQ    DX, BX
	VMOVUPS 0(BX), Z16
	VMOVUPS 64(BX), Z17
	VMOVUPS 128(BX), Z18
	VMOVUPS 192(BX), Z19
	VMOVUPS 0(BX)(R10*1), Z20
	VMOVUPS 64(BX)(R10*1), Z21
	VMOVUPS 128(BX)(R10*1), Z22
	VMOVUPS 192(BX)(R10*1), Z23
	LEAQ    (BX)(R10*2), BX
	VMOVUPS 0(BX), Z24
	VMOVUPS 64(BX), Z25
	VMOVUPS 128(BX), Z26
	VMOVUPS 192(BX), Z27
	VMOVUPS 0(BX)(R10*1), Z28
	VMOVUPS 64(BX)(R10*1), Z29
	VMOVUPS 128(BX)(R10*1), Z30
	VMOVUPS 192(BX)(R10*1), Z31
	VBROADCASTSS 0(CX), Z8
	VBROADCASTSS 4(CX), Z9
	VBROADCASTSS 8(CX), Z10
	VBROADCASTSS 12(CX), Z11
	G2(Z0, Z16, Z20, Z24, Z28, Z12, Z13)
	G2(Z1, Z17, Z21, Z25, Z29, Z14, Z15)
	G2(Z2, Z18, Z22, Z26, Z30, Z12, Z13)
	G2(Z3, Z19, Z23, Z27, Z31, Z14, Z15)
	VBROADCASTSS 0(CX)(R9*1), Z8
	VBROADCASTSS 4(CX)(R9*1), Z9
	VBROADCASTSS 8(CX)(R9*1), Z10
	VBROADCASTSS 12(CX)(R9*1), Z11
	G2(Z4, Z16, Z20, Z24, Z28, Z12, Z13)
	G2(Z5, Z17, Z21, Z25, Z29, Z14, Z15)
	G2(Z6, Z18, Z22, Z26, Z30, Z12, Z13)
	G2(Z7, Z19, Z23, Z27, Z31, Z14, Z15)
	INCQ AX
	JMP  groupr2

singlesr2:
	XORQ AX, AX

singler2:
	CMPQ    AX, R14
	JGE     storer2
	MOVLQSX (R13)(AX*4), BX
	LEAQ    (SI)(BX*4), CX
	IMULQ   R10, BX
	ADDQ    DX, BX
	VMOVUPS 0(BX), Z16
	VMOVUPS 64(BX), Z17
	VMOVUPS 128(BX), Z18
	VMOVUPS 192(BX), Z19
	VBROADCASTSS (CX), Z8
	VBROADCASTSS (CX)(R9*1), Z9
	VMULPS  Z16, Z8, Z12
	VADDPS  Z12, Z0, Z0
	VMULPS  Z17, Z8, Z13
	VADDPS  Z13, Z1, Z1
	VMULPS  Z18, Z8, Z14
	VADDPS  Z14, Z2, Z2
	VMULPS  Z19, Z8, Z15
	VADDPS  Z15, Z3, Z3
	VMULPS  Z16, Z9, Z12
	VADDPS  Z12, Z4, Z4
	VMULPS  Z17, Z9, Z13
	VADDPS  Z13, Z5, Z5
	VMULPS  Z18, Z9, Z14
	VADDPS  Z14, Z6, Z6
	VMULPS  Z19, Z9, Z15
	VADDPS  Z15, Z7, Z7
	INCQ    AX
	JMP     singler2

storer2:
	VMOVUPS Z0, 0(DI)
	VMOVUPS Z1, 64(DI)
	VMOVUPS Z2, 128(DI)
	VMOVUPS Z3, 192(DI)
	VMOVUPS Z4, 0(DI)(R8*1)
	VMOVUPS Z5, 64(DI)(R8*1)
	VMOVUPS Z6, 128(DI)(R8*1)
	VMOVUPS Z7, 192(DI)(R8*1)
	LEAQ    (DI)(R8*2), DI
	LEAQ    (SI)(R9*2), SI
	DECQ    R15
	JNZ     rowr2

doner2:
	VZEROUPPER
	RET
