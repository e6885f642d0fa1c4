package lora

import "math"

// factors returns an exact low-rank factorisation ΔW = B·A (scale not
// applied) of a module, B [Out × r], A [r × In], when one exists that is
// cheaper than the dense delta: LoRA is its own; LoHa's Hadamard product
// factors as a row-wise Khatri–Rao product of rank r1·r2; LoKr's Kronecker
// product factors as kron(U,P)·kron(V,Q) from factorisations w1 = U·V and
// w2 = P·Q. ok is false when the factorisation would cost more than the
// dense [Out × In] delta (or the type has none: full diff).
func factors(m *Module) (b, a Mat, ok bool) {
	cheap := func(r int) bool { return r*(m.Out+m.In) < m.Out*m.In }
	switch m.Type {
	case TypeLoRA:
		return m.Up, m.Down, true
	case TypeLoHa:
		r1, r2 := m.W1a.Cols, m.W2a.Cols
		if !cheap(r1 * r2) {
			return Mat{}, Mat{}, false
		}
		r := r1 * r2
		b = Mat{Rows: m.Out, Cols: r, Data: make([]float32, m.Out*r)}
		a = Mat{Rows: r, Cols: m.In, Data: make([]float32, r*m.In)}
		for i := 0; i < m.Out; i++ {
			for x := 0; x < r1; x++ {
				for y := 0; y < r2; y++ {
					b.Data[i*r+x*r2+y] = m.W1a.Data[i*r1+x] * m.W2a.Data[i*r2+y]
				}
			}
		}
		for x := 0; x < r1; x++ {
			for y := 0; y < r2; y++ {
				row := a.Data[(x*r2+y)*m.In:]
				for j := 0; j < m.In; j++ {
					row[j] = m.W1b.Data[x*m.In+j] * m.W2b.Data[y*m.In+j]
				}
			}
		}
		return b, a, true
	case TypeLoKr:
		u, v := lokrSplit(m.K1, m.K1a, m.K1b)
		p, q := lokrSplit(m.K2, m.K2a, m.K2b)
		if !cheap(u.Cols * p.Cols) {
			return Mat{}, Mat{}, false
		}
		return kron(u, p), kron(v, q), true
	}
	return Mat{}, Mat{}, false
}

// lokrSplit returns w = U·V with the smaller inner dimension: the stored
// factors when decomposed, otherwise (w, I) or (I, w).
func lokrSplit(w, wa, wb Mat) (Mat, Mat) {
	if !w.ok() {
		return wa, wb
	}
	if w.Cols <= w.Rows {
		return w, eye(w.Cols)
	}
	return eye(w.Rows), w
}

func eye(n int) Mat {
	m := Mat{Rows: n, Cols: n, Data: make([]float32, n*n)}
	for i := 0; i < n; i++ {
		m.Data[i*n+i] = 1
	}
	return m
}

// kron returns the Kronecker product of x [p×q] and y [s×t], [ps × qt].
func kron(x, y Mat) Mat {
	out := Mat{Rows: x.Rows * y.Rows, Cols: x.Cols * y.Cols}
	out.Data = make([]float32, out.Rows*out.Cols)
	for i := 0; i < x.Rows; i++ {
		for j := 0; j < x.Cols; j++ {
			xv := x.Data[i*x.Cols+j]
			if xv == 0 {
				continue
			}
			for k := 0; k < y.Rows; k++ {
				row := out.Data[(i*y.Rows+k)*out.Cols+j*y.Cols:]
				for l := 0; l < y.Cols; l++ {
					row[l] = xv * y.Data[k*y.Cols+l]
				}
			}
		}
	}
	return out
}

// matmul returns x·y in float32 with float64 accumulation.
func matmul(x, y Mat) Mat {
	out := Mat{Rows: x.Rows, Cols: y.Cols, Data: make([]float32, x.Rows*y.Cols)}
	acc := make([]float64, y.Cols)
	for i := 0; i < x.Rows; i++ {
		clear(acc)
		for k := 0; k < x.Cols; k++ {
			xv := float64(x.Data[i*x.Cols+k])
			if xv == 0 {
				continue
			}
			yr := y.Data[k*y.Cols : (k+1)*y.Cols]
			for j, v := range yr {
				acc[j] += xv * float64(v)
			}
		}
		for j, v := range acc {
			out.Data[i*y.Cols+j] = float32(v)
		}
	}
	return out
}

// dense returns the module's ΔW [Out × In], scale not applied, for the
// types that need no base weight.
func dense(m *Module) Mat {
	switch m.Type {
	case TypeFull:
		return m.Diff
	case TypeLoHa:
		p1, p2 := matmul(m.W1a, m.W1b), matmul(m.W2a, m.W2b)
		for i := range p1.Data {
			p1.Data[i] *= p2.Data[i]
		}
		return p1
	case TypeLoKr:
		w1, w2 := m.K1, m.K2
		if !w1.ok() {
			w1 = matmul(m.K1a, m.K1b)
		}
		if !w2.ok() {
			w2 = matmul(m.K2a, m.K2b)
		}
		return kron(w1, w2)
	}
	b, a, _ := factors(m)
	return matmul(b, a)
}

// doraDelta returns the weight-decomposed delta W' − W for a DoRA module on
// base rows w [Out × In]: W' = mag · (W + scale·ΔW) / ‖W + scale·ΔW‖, the
// norm taken per output row (PEFT, LyCORIS wd_on_out) or per input column,
// as the magnitude's shape says.
func doraDelta(m *Module, w []float32) Mat {
	d := dense(m)
	s := float32(m.Scale)
	merged := make([]float64, len(w))
	for i := range w {
		merged[i] = float64(w[i]) + float64(s*d.Data[i])
	}
	norms := make([]float64, m.Out)
	if m.MagnitudePerInput {
		norms = make([]float64, m.In)
	}
	for i := 0; i < m.Out; i++ {
		for j := 0; j < m.In; j++ {
			v := merged[i*m.In+j]
			if m.MagnitudePerInput {
				norms[j] += v * v
			} else {
				norms[i] += v * v
			}
		}
	}
	out := Mat{Rows: m.Out, Cols: m.In, Data: make([]float32, m.Out*m.In)}
	for i := 0; i < m.Out; i++ {
		for j := 0; j < m.In; j++ {
			k := i
			if m.MagnitudePerInput {
				k = j
			}
			n := math.Sqrt(norms[k])
			if n == 0 {
				n = 1
			}
			out.Data[i*m.In+j] = float32(float64(m.Magnitude[k])*merged[i*m.In+j]/n - float64(w[i*m.In+j]))
		}
	}
	return out
}
