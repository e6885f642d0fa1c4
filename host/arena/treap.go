package arena

// treap is an ordered set of unique keys with expected O(log n) insert,
// delete and ceiling/floor search. The arena keeps two kinds of them: one of
// every free extent ordered by (size, segment, offset) for best-fit search,
// and one per segment of its live allocations ordered by offset for
// descriptor lookup. It is not safe for concurrent use; the arena's mutex
// guards it.
type treap[K any] struct {
	root *tnode[K]
	cmp  func(a, b K) int
	n    int
	seed uint64
}

type tnode[K any] struct {
	key         K
	prio        uint64
	left, right *tnode[K]
}

func newTreap[K any](cmp func(a, b K) int) *treap[K] {
	return &treap[K]{cmp: cmp, seed: 0x853c49e6748fea9b}
}

// next is splitmix64: cheap, deterministic priorities are enough for balance.
func (t *treap[K]) next() uint64 {
	t.seed += 0x9e3779b97f4a7c15
	z := t.seed
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// Len returns the number of keys.
func (t *treap[K]) Len() int { return t.n }

// Insert adds k; it reports false (and changes nothing) when an equal key
// is already present.
func (t *treap[K]) Insert(k K) bool {
	if _, ok := t.find(k); ok {
		return false
	}
	t.root = t.insert(t.root, &tnode[K]{key: k, prio: t.next()})
	t.n++
	return true
}

func (t *treap[K]) insert(n, nw *tnode[K]) *tnode[K] {
	if n == nil {
		return nw
	}
	if nw.prio > n.prio {
		nw.left, nw.right = t.split(n, nw.key)
		return nw
	}
	if t.cmp(nw.key, n.key) < 0 {
		n.left = t.insert(n.left, nw)
	} else {
		n.right = t.insert(n.right, nw)
	}
	return n
}

// split divides n into the keys < k and the keys >= k.
func (t *treap[K]) split(n *tnode[K], k K) (l, r *tnode[K]) {
	if n == nil {
		return nil, nil
	}
	if t.cmp(n.key, k) < 0 {
		n.right, r = t.split(n.right, k)
		return n, r
	}
	l, n.left = t.split(n.left, k)
	return l, n
}

func merge[K any](l, r *tnode[K]) *tnode[K] {
	switch {
	case l == nil:
		return r
	case r == nil:
		return l
	case l.prio > r.prio:
		l.right = merge(l.right, r)
		return l
	default:
		r.left = merge(l, r.left)
		return r
	}
}

// Delete removes k and reports whether it was present.
func (t *treap[K]) Delete(k K) bool {
	var ok bool
	t.root, ok = t.erase(t.root, k)
	if ok {
		t.n--
	}
	return ok
}

func (t *treap[K]) erase(n *tnode[K], k K) (*tnode[K], bool) {
	if n == nil {
		return nil, false
	}
	var ok bool
	switch c := t.cmp(k, n.key); {
	case c == 0:
		return merge(n.left, n.right), true
	case c < 0:
		n.left, ok = t.erase(n.left, k)
	default:
		n.right, ok = t.erase(n.right, k)
	}
	return n, ok
}

func (t *treap[K]) find(k K) (K, bool) {
	for n := t.root; n != nil; {
		switch c := t.cmp(k, n.key); {
		case c == 0:
			return n.key, true
		case c < 0:
			n = n.left
		default:
			n = n.right
		}
	}
	var zero K
	return zero, false
}

// Ceil returns the smallest key >= k.
func (t *treap[K]) Ceil(k K) (K, bool) {
	var best *tnode[K]
	for n := t.root; n != nil; {
		if t.cmp(n.key, k) >= 0 {
			best, n = n, n.left
		} else {
			n = n.right
		}
	}
	if best == nil {
		var zero K
		return zero, false
	}
	return best.key, true
}

// Floor returns the largest key <= k.
func (t *treap[K]) Floor(k K) (K, bool) {
	var best *tnode[K]
	for n := t.root; n != nil; {
		if t.cmp(n.key, k) <= 0 {
			best, n = n, n.right
		} else {
			n = n.left
		}
	}
	if best == nil {
		var zero K
		return zero, false
	}
	return best.key, true
}

// Max returns the largest key.
func (t *treap[K]) Max() (K, bool) {
	n := t.root
	if n == nil {
		var zero K
		return zero, false
	}
	for n.right != nil {
		n = n.right
	}
	return n.key, true
}

// Ascend calls f for every key in order until f returns false.
func (t *treap[K]) Ascend(f func(K) bool) {
	var walk func(n *tnode[K]) bool
	walk = func(n *tnode[K]) bool {
		if n == nil {
			return true
		}
		return walk(n.left) && f(n.key) && walk(n.right)
	}
	walk(t.root)
}
