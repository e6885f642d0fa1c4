package lora_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/arenahost/arenahost/host/lora"
	"github.com/arenahost/arenahost/host/server"
	"github.com/arenahost/arenahost/shared/half"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
)

// boundRaw reads the descriptors and bytes of the factors bound to w.
func boundRaw(t *testing.T, s *server.Server, w string) (a, b *pluginv1.TensorDescriptor, ab, bb []byte) {
	t.Helper()
	lf, ab, bb := boundLayer(t, s, w)
	return lf.GetA(), lf.GetB(), ab, bb
}

// asBF16 is what a bfloat16 forward makes of F32 factor bytes: each value
// rounded to nearest even (torch's .to(torch.bfloat16), half.F32ToBF16).
func asBF16(t *testing.T, f32 []byte) []byte {
	t.Helper()
	v, err := tensor.Float32s(f32)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 2*len(v))
	half.EncodeBF16(out, v)
	return out
}

// TestSideBF16Factors: factor_dtype bf16 stores every side factor as the
// F32 factor rounded once to bfloat16, bit for bit, in descriptors that say
// BF16, at half the bytes; a strength change under it rewrites in bf16 what
// an F32 apply at the new strengths rounds to; switching the dtype is a
// full apply, the same dtype again a no-op, and a request naming none keeps
// the bound one; an unknown dtype is refused with the model unchanged. On the CPU arena and the simulated GPU (where
// the plugin uploads the rounded factors).
func TestSideBF16Factors(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) { testSideBF16Factors(t, backend) })
	}
}

func testSideBF16Factors(t *testing.T, backend string) {
	s := newHostOn(t, backend)
	_, _, dir := fixtures(t)
	set := []oracleLoRA{kohyaOracle(0.8), peftOracle(1.3)}
	apply := func(dt string) *lora.Request {
		return &lora.Request{LoRAs: entries(dir, set...), FactorDType: dt}
	}
	f32, err := s.LoRAs.Apply(t.Context(), *apply(""))
	if err != nil {
		t.Fatal(err)
	}
	if f32.FactorDType != lora.FactorF32 {
		t.Fatalf("default factor dtype %q, want f32", f32.FactorDType)
	}
	want := map[string][2][]byte{}
	for _, w := range oracleWeights {
		da, db, ab, bb := boundRaw(t, s, w)
		if da.GetDtype() != pluginv1.DType_DTYPE_F32 || db.GetDtype() != pluginv1.DType_DTYPE_F32 {
			t.Fatalf("%s: default factors %v/%v, want F32", w, da.GetDtype(), db.GetDtype())
		}
		want[w] = [2][]byte{asBF16(t, ab), asBF16(t, bb)}
	}

	bf, err := s.LoRAs.Apply(t.Context(), *apply(lora.FactorBF16))
	if err != nil {
		t.Fatal(err)
	}
	if bf.Path != "apply" || bf.FactorDType != lora.FactorBF16 || bf.Report.SideBytes*2 != f32.Report.SideBytes {
		t.Fatalf("bf16 apply: path %q, dtype %q, side bytes %d (f32 %d): want a full apply at half the bytes", bf.Path, bf.FactorDType, bf.Report.SideBytes, f32.Report.SideBytes)
	}
	check := func(what string) {
		t.Helper()
		for _, w := range oracleWeights {
			da, db, ab, bb := boundRaw(t, s, w)
			if da.GetDtype() != pluginv1.DType_DTYPE_BF16 || db.GetDtype() != pluginv1.DType_DTYPE_BF16 || int(da.GetNbytes()) != len(want[w][0]) {
				t.Fatalf("%s: %s: factors %v/%v of %d bytes, want BF16 of %d", what, w, da.GetDtype(), db.GetDtype(), da.GetNbytes(), len(want[w][0]))
			}
			if !bytes.Equal(ab, want[w][0]) || !bytes.Equal(bb, want[w][1]) {
				t.Fatalf("%s: %s: bf16 factors differ from the f32 factors rounded to bf16", what, w)
			}
		}
	}
	check("bf16 apply")
	// A request that names no dtype (as the A1111 and ComfyUI routes send
	// them) keeps the bound one: a no-op, then a strength change in bf16.
	if again, err := s.LoRAs.Apply(t.Context(), *apply("")); err != nil || !again.NoOp || again.FactorDType != lora.FactorBF16 {
		t.Fatalf("same set, no dtype named: %+v %v, want a no-op keeping bf16", again, err)
	}
	if again, err := s.LoRAs.Apply(t.Context(), *apply(lora.FactorBF16)); err != nil || !again.NoOp {
		t.Fatalf("same set, same dtype: %+v %v, want a no-op", again, err)
	}

	// A strength change in bf16, against an f32 apply at the new strengths.
	set[0].strength = 0.4
	moved, err := s.LoRAs.Apply(t.Context(), *apply(""))
	if err != nil || moved.Path != "set_strengths" || moved.FactorDType != lora.FactorBF16 {
		t.Fatalf("strength change: %+v %v, want set_strengths in bf16", moved, err)
	}
	got := map[string][2][]byte{}
	for _, w := range oracleWeights {
		_, _, ab, bb := boundRaw(t, s, w)
		got[w] = [2][]byte{ab, bb}
	}
	if res, err := s.LoRAs.Apply(t.Context(), *apply(lora.FactorF32)); err != nil || res.Path != "apply" {
		t.Fatalf("back to f32: %+v %v, want a full apply", res, err)
	}
	for _, w := range oracleWeights {
		_, _, ab, bb := boundRaw(t, s, w)
		want[w] = [2][]byte{asBF16(t, ab), asBF16(t, bb)}
		if !bytes.Equal(got[w][0], want[w][0]) || !bytes.Equal(got[w][1], want[w][1]) {
			t.Fatalf("%s: bf16 factors after a strength change differ from an f32 apply's at those strengths, rounded", w)
		}
	}
	checkSide(t, s, dir, set)
	if again, err := s.LoRAs.Apply(t.Context(), *apply("")); err != nil || !again.NoOp || again.FactorDType != lora.FactorF32 {
		t.Fatalf("same set, no dtype named, after f32: %+v %v, want a no-op keeping f32", again, err)
	}

	// An unknown dtype: refused, nothing changed.
	before := snapshot(t, s)
	_, _, ab, _ := boundRaw(t, s, oracleWeights[0])
	if _, err := s.LoRAs.Apply(t.Context(), *apply("f16")); !errors.Is(err, lora.ErrBadLoRA) {
		t.Fatalf("factor dtype f16: %v, want ErrBadLoRA", err)
	}
	if st, _ := s.LoRAs.State(""); st.FactorDType != lora.FactorF32 {
		t.Fatalf("state after a refused apply: %+v", st)
	}
	if _, _, ab2, _ := boundRaw(t, s, oracleWeights[0]); !bytes.Equal(ab, ab2) {
		t.Fatal("a refused apply changed the bound factors")
	}
	sameBytes(t, "refused apply", before, snapshot(t, s))
}
