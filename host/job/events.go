package job

import (
	"sync"

	"github.com/arenahost/arenahost/sdk/api"
)

// Event is one thing that happened to a job, with the job's snapshot at
// that moment. Frame is set for EventFrame; its bytes are shared and must
// not be modified.
type Event struct {
	Type  string
	Job   api.Job
	Frame *Frame
}

// DefaultSubscriptionBuffer is the events a subscriber may lag behind
// before the oldest are dropped.
const DefaultSubscriptionBuffer = 64

// Subscription is one client's bounded, drop-oldest queue of events.
// Publishing into it never blocks: a client that stops reading loses its
// oldest events, never slows the job or the other clients.
type Subscription struct {
	job string // "" = every job
	m   *Manager

	mu      sync.Mutex
	q       []Event
	head, n int
	dropped uint64
	closed  bool
	c       chan struct{}
}

// C is signalled (capacity 1) when events are waiting.
func (s *Subscription) C() <-chan struct{} { return s.c }

// Next removes and returns the waiting events, oldest first.
func (s *Subscription) Next() []Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Event, 0, s.n)
	for range s.n {
		out = append(out, s.q[s.head])
		s.q[s.head] = Event{}
		s.head = (s.head + 1) % len(s.q)
	}
	s.n = 0
	return out
}

// Dropped is how many events this subscriber lost to overflow.
func (s *Subscription) Dropped() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dropped
}

// Close unsubscribes.
func (s *Subscription) Close() {
	s.m.subMu.Lock()
	delete(s.m.subs, s)
	s.m.subMu.Unlock()
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
}

func (s *Subscription) push(e Event) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	if s.n == len(s.q) {
		s.q[s.head] = Event{}
		s.head = (s.head + 1) % len(s.q)
		s.n--
		s.dropped++
	}
	s.q[(s.head+s.n)%len(s.q)] = e
	s.n++
	s.mu.Unlock()
	select {
	case s.c <- struct{}{}:
	default:
	}
}

// Subscribe returns a subscription to one job's events (jobID "" for every
// job) holding at most buffer events (0: DefaultSubscriptionBuffer).
func (m *Manager) Subscribe(jobID string, buffer int) *Subscription {
	if buffer <= 0 {
		buffer = DefaultSubscriptionBuffer
	}
	s := &Subscription{job: jobID, m: m, q: make([]Event, buffer), c: make(chan struct{}, 1)}
	m.subMu.Lock()
	m.subs[s] = struct{}{}
	m.subMu.Unlock()
	return s
}

func (m *Manager) broadcast(e Event) {
	m.subMu.RLock()
	defer m.subMu.RUnlock()
	for s := range m.subs {
		if s.job == "" || s.job == e.Job.ID {
			s.push(e)
		}
	}
}
