package comfyui

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"
)

// item is one queued prompt; its queue form is ComfyUI's 5-element list
// [number, prompt_id, prompt, extra_data, outputs_to_execute].
type item struct {
	number   float64
	id       string
	raw      map[string]any // the graph as sent, echoed in /queue and /history
	graph    map[string]graphNode
	extra    map[string]any
	outputs  []string
	clientID string
}

func (it *item) list() []any {
	return []any{jsonNumber(it.number), it.id, it.raw, it.extra, it.outputs}
}

// jsonNumber is a queue number as ComfyUI writes it: a whole number as an
// integer (1, not 1.0), any other as it is.
func jsonNumber(f float64) any {
	if f == float64(int64(f)) {
		return int64(f)
	}
	return f
}

// histEntry is one /history entry.
type histEntry struct {
	Prompt  []any          `json:"prompt"`
	Outputs map[string]any `json:"outputs"`
	Status  histStatus     `json:"status"`
	Meta    map[string]any `json:"meta"`
}

type histStatus struct {
	StatusStr string  `json:"status_str"`
	Completed bool    `json:"completed"`
	Messages  [][]any `json:"messages"`
}

// queue holds the pending prompts, the running one and the history, and
// runs prompts one at a time (the host runs one pipeline job at a time).
type queue struct {
	s      *Server
	mu     sync.Mutex
	wake   chan struct{}
	stop   chan struct{}
	done   chan struct{}
	number float64

	pending []*item
	running *item
	cancel  context.CancelFunc
	runNode string // node executing now

	history map[string]*histEntry
	order   []string // history ids, oldest first
}

func newQueue(s *Server) *queue {
	return &queue{s: s, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{}), history: map[string]*histEntry{}}
}

func (q *queue) close() {
	q.mu.Lock()
	select {
	case <-q.stop:
	default:
		close(q.stop)
	}
	if q.cancel != nil {
		q.cancel()
	}
	q.mu.Unlock()
	<-q.done
}

// remaining is ComfyUI's queue_remaining: pending plus running.
func (q *queue) remaining() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := len(q.pending)
	if q.running != nil {
		n++
	}
	return n
}

// nextNumber returns the number a prompt without one gets.
func (q *queue) nextNumber(front bool) float64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := q.number
	q.number++
	if front {
		return -n
	}
	return n
}

func (q *queue) put(it *item) {
	q.mu.Lock()
	q.pending = append(q.pending, it)
	sort.SliceStable(q.pending, func(i, j int) bool { return q.pending[i].number < q.pending[j].number })
	q.mu.Unlock()
	q.s.statusChanged()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// snapshot returns the running and pending lists.
func (q *queue) snapshot() (running, pending [][]any) {
	q.mu.Lock()
	defer q.mu.Unlock()
	running, pending = [][]any{}, [][]any{}
	if q.running != nil {
		running = append(running, q.running.list())
	}
	for _, it := range q.pending {
		pending = append(pending, it.list())
	}
	return running, pending
}

// deletePending removes pending prompts by id (clear: all of them).
func (q *queue) deletePending(ids []string, clear bool) {
	q.mu.Lock()
	drop := map[string]bool{}
	for _, id := range ids {
		drop[id] = true
	}
	kept := q.pending[:0]
	for _, it := range q.pending {
		if !clear && !drop[it.id] {
			kept = append(kept, it)
		}
	}
	q.pending = kept
	q.mu.Unlock()
	q.s.statusChanged()
}

// interrupt stops the running prompt (only if it has id, when id is set).
func (q *queue) interrupt(id string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.running != nil && q.cancel != nil && (id == "" || q.running.id == id) {
		q.cancel()
	}
}

func (q *queue) historyOf(id string, maxItems, offset int) map[string]any {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := map[string]any{}
	if id != "" {
		if h, ok := q.history[id]; ok {
			out[id] = h
		}
		return out
	}
	if offset < 0 && maxItems >= 0 {
		offset = len(q.order) - maxItems
	}
	for i, k := range q.order {
		if i < offset {
			continue
		}
		out[k] = q.history[k]
		if maxItems >= 0 && len(out) >= maxItems {
			break
		}
	}
	return out
}

func (q *queue) deleteHistory(ids []string, clear bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if clear {
		q.history, q.order = map[string]*histEntry{}, nil
		return
	}
	for _, id := range ids {
		delete(q.history, id)
	}
	kept := q.order[:0]
	for _, k := range q.order {
		if q.history[k] != nil {
			kept = append(kept, k)
		}
	}
	q.order = kept
}

// run executes prompts until close.
func (q *queue) run() {
	defer close(q.done)
	for {
		q.mu.Lock()
		var it *item
		if len(q.pending) > 0 {
			it, q.pending = q.pending[0], q.pending[1:]
		}
		var ctx context.Context
		if it != nil {
			ctx, q.cancel = context.WithCancel(context.Background())
			q.running = it
		}
		q.mu.Unlock()
		if it == nil {
			select {
			case <-q.stop:
				return
			case <-q.wake:
				continue
			}
		}
		select {
		case <-q.stop:
			q.mu.Lock()
			q.running, q.cancel = nil, nil
			q.mu.Unlock()
			return
		default:
		}
		q.s.statusChanged()
		x := &execution{s: q.s, ctx: ctx, it: it, results: map[string][]any{}, outputs: map[string]any{}, meta: map[string]any{}}
		x.execute()
		q.mu.Lock()
		q.cancel()
		q.history[it.id] = &histEntry{Prompt: it.list(), Outputs: x.outputs, Meta: x.meta,
			Status: histStatus{StatusStr: x.statusStr(), Completed: x.err == nil, Messages: x.messages}}
		q.order = append(q.order, it.id)
		for len(q.order) > q.s.opts.MaxHistory {
			delete(q.history, q.order[0])
			q.order = q.order[1:]
		}
		q.running, q.cancel, q.runNode = nil, nil, ""
		q.mu.Unlock()
		// As ComfyUI: history first, then the queue status, then
		// "executing null" (clients fetch the history when they see it).
		q.s.statusChanged()
		q.s.hub.send(it.clientID, "executing", map[string]any{"node": nil, "prompt_id": it.id})
	}
}

// execution is one prompt being run.
type execution struct {
	s        *Server
	ctx      context.Context
	it       *item
	results  map[string][]any
	executed []string
	outputs  map[string]any
	meta     map[string]any
	messages [][]any
	err      error
	errNode  string
}

func (x *execution) statusStr() string {
	if x.err != nil {
		return "error"
	}
	return "success"
}

// message records an execution_* message in the history and sends it to
// the prompt's client (or to every client when broadcast).
func (x *execution) message(typ string, data map[string]any, broadcast bool) {
	data["timestamp"] = time.Now().UnixMilli()
	x.messages = append(x.messages, []any{typ, data})
	if x.it.clientID != "" {
		x.s.hub.send(x.it.clientID, typ, data)
	} else if broadcast {
		x.s.hub.send("", typ, data)
	}
}

func (x *execution) execute() {
	id := x.it.id
	x.message("execution_start", map[string]any{"prompt_id": id}, false)
	x.message("execution_cached", map[string]any{"nodes": []string{}, "prompt_id": id}, false)
	for _, o := range x.it.outputs {
		if _, err := x.eval(o); err != nil {
			x.err = err
			break
		}
	}
	if x.err == nil {
		x.message("execution_success", map[string]any{"prompt_id": id}, false)
		return
	}
	node := x.errNode
	class := x.it.graph[node].ClassType
	executed := append([]string{}, x.executed...)
	if errors.Is(x.err, ErrInterrupted) || errors.Is(x.err, context.Canceled) || x.ctx.Err() != nil {
		x.err = ErrInterrupted
		x.message("execution_interrupted", map[string]any{"prompt_id": id, "node_id": node, "node_type": class, "executed": executed}, true)
		return
	}
	x.s.log.Warn("comfyui: prompt failed", "prompt_id", id, "node", node, "class_type", class, "err", x.err)
	x.message("execution_error", map[string]any{"prompt_id": id, "node_id": node, "node_type": class, "executed": executed,
		"exception_message": x.err.Error(), "exception_type": "arenahost.Error", "traceback": []string{},
		"current_inputs": map[string]any{}, "current_outputs": []string{}}, false)
}

// eval runs node id after the nodes it links to, once.
func (x *execution) eval(id string) ([]any, error) {
	if r, ok := x.results[id]; ok {
		return r, nil
	}
	if err := x.ctx.Err(); err != nil {
		x.errNode = id
		return nil, err
	}
	n := x.it.graph[id]
	def := nodes[n.ClassType]
	in := map[string]any{}
	for _, spec := range def.inputs {
		v, ok := n.Inputs[spec.name]
		if !ok {
			continue
		}
		if l, isLink := v.([]any); isLink && len(l) == 2 {
			src := fmt.Sprint(l[0])
			r, err := x.eval(src)
			if err != nil {
				return nil, err
			}
			in[spec.name] = r[int(l[1].(float64))]
			continue
		}
		in[spec.name] = v
	}
	x.s.q.mu.Lock()
	x.s.q.runNode = id
	x.s.q.mu.Unlock()
	x.s.hub.send(x.it.clientID, "executing", map[string]any{"node": id, "display_node": id, "prompt_id": x.it.id})
	out, ui, err := def.run(x, id, in)
	if err != nil {
		x.errNode = id
		return nil, err
	}
	x.results[id] = out
	x.executed = append(x.executed, id)
	if ui != nil {
		x.outputs[id] = ui
		x.meta[id] = map[string]any{"node_id": id, "display_node": id, "parent_node": nil, "real_node_id": id}
		x.s.hub.send(x.it.clientID, "executed", map[string]any{"node": id, "display_node": id, "output": ui, "prompt_id": x.it.id})
	}
	return out, nil
}
