package job

import "sync"

// runQueue hands out the run slots (Config.MaxRunning) in the order jobs
// were created: a job takes its place in line when Create returns, not
// when its goroutine happens to be scheduled, so jobs start first come,
// first served.
type runQueue struct {
	mu      sync.Mutex
	free    int
	waiting []chan struct{} // oldest first; closed when granted a slot
}

func newRunQueue(slots int) *runQueue { return &runQueue{free: slots} }

// enqueue takes a place in line; the channel is closed when the slot is
// the caller's (at once when one is free and nobody waits).
func (q *runQueue) enqueue() chan struct{} {
	ch := make(chan struct{})
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.free > 0 && len(q.waiting) == 0 {
		q.free--
		close(ch)
		return ch
	}
	q.waiting = append(q.waiting, ch)
	return ch
}

// leave gives up a place in line (a job cancelled before it ran); a slot
// granted meanwhile is passed on.
func (q *runQueue) leave(ch chan struct{}) {
	q.mu.Lock()
	for i, w := range q.waiting {
		if w == ch {
			q.waiting = append(q.waiting[:i], q.waiting[i+1:]...)
			q.mu.Unlock()
			return
		}
	}
	q.mu.Unlock()
	q.release() // it was granted: pass it on
}

// release frees a slot: the oldest waiter gets it.
func (q *runQueue) release() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.waiting) > 0 {
		close(q.waiting[0])
		q.waiting = q.waiting[1:]
		return
	}
	q.free++
}
