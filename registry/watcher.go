package registry

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/rollcall-go/rollcall/registry/driver"
)

// Watcher follows the instances of one service. Its first Next delivers the
// full list; each later Next delivers what changed since the previous one,
// coalescing everything that happened in between. While the backend is
// unreachable the Watcher keeps the last known list and delivers one update
// with Stale set; it restarts the backend watch with backoff, and once the
// backend answers again delivers only the difference. A Watcher is safe for
// concurrent use, but updates are meant for one consumer.
type Watcher struct {
	r       *registry
	service string
	ctx     context.Context
	cancel  context.CancelFunc
	done    chan struct{}
	notify  chan struct{} // capacity 1: something changed since the last Next

	mu        sync.Mutex
	known     map[string]Instance // the backend's latest view
	dirty     map[string]struct{} // IDs changed since the last delivery
	synced    bool                // known holds a complete list
	stale     bool
	err       error
	lastStale bool            // Stale of the last delivered update
	outage    bool            // the backend watch failed since the last Reset
	inGrace   bool            // a resync grace window is open (see Options.ResyncGrace)
	pre       map[string]bool // IDs known when the window opened
	held      map[string]bool // of those, the ones missing from the registry, kept meanwhile
	graceGen  int
	announce  bool          // deliver an update even if nothing else changed (the stale reason did)
	snapAt    time.Time     // when the snapshot known holds was written; zero once the registry answered
	snapWake  chan struct{} // capacity 1: the snapshot loop has something to look at; nil without snapshots
	snap      *heldSnapshot // read at the start, until served or the registry's list arrives
	staleAt   time.Time     // when the delivered updates turned stale (with metrics only)

	nextMu    sync.Mutex // one Next at a time; guards the fields below
	delivered map[string]Instance
	first     bool // the first update has been delivered
	base      map[string]Instance
	log       []change
}

type change struct {
	id   string
	inst Instance
	del  bool
}

// Update is what Watcher.Next delivers.
type Update struct {
	// Added, Changed and Removed are what happened since the previous
	// update, each sorted by ID. On the first update Added holds every
	// instance. Removed holds the instances as last delivered.
	Added, Changed, Removed []Instance
	// Stale is true while the backend is unreachable: the list is the last
	// one known, frozen, and Err says why.
	Stale bool
	Err   error
	// Synced is false only on updates delivered before the first complete
	// list arrived (a stale update with no instances, because nothing is
	// known yet).
	Synced bool
	// Snapshot is when the snapshot the list comes from was written (see
	// Options.Snapshot): set, with Stale, while a Watcher that could not
	// reach the registry at its start serves it; zero otherwise.
	Snapshot time.Time

	base map[string]Instance
	log  []change
}

// String describes the update for logs and command lines, as in
// "fresh: +1 ~0 -2" or "stale: +0 ~0 -0 (registry: unavailable: ...)".
func (u *Update) String() string {
	var b strings.Builder
	switch {
	case !u.Synced:
		b.WriteString("stale, nothing known yet")
	case u.Stale:
		b.WriteString("stale")
	default:
		b.WriteString("fresh")
	}
	fmt.Fprintf(&b, ": +%d ~%d -%d", len(u.Added), len(u.Changed), len(u.Removed))
	if u.Err != nil {
		fmt.Fprintf(&b, " (%v)", u.Err)
	}
	return b.String()
}

// Instances returns the complete list after this update, sorted by ID. It is
// built on demand; the slice is the caller's.
func (u *Update) Instances() []Instance {
	m := maps.Clone(u.base)
	if m == nil {
		m = map[string]Instance{}
	}
	for _, c := range u.log {
		if c.del {
			delete(m, c.id)
		} else {
			m[c.id] = c.inst
		}
	}
	return sortedValues(m)
}

func sortedValues(m map[string]Instance) []Instance {
	out := make([]Instance, 0, len(m))
	for _, in := range m {
		out = append(out, in.Clone())
	}
	sortByID(out)
	return out
}

func sortByID(s []Instance) {
	slices.SortFunc(s, func(a, b Instance) int { return strings.Compare(a.ID, b.ID) })
}

func newWatcher(r *registry, service string) *Watcher {
	ctx, cancel := context.WithCancel(r.ctx)
	w := &Watcher{r: r, service: service, ctx: ctx, cancel: cancel, done: make(chan struct{}), notify: make(chan struct{}, 1),
		known: map[string]Instance{}, dirty: map[string]struct{}{}, delivered: map[string]Instance{}, pre: map[string]bool{}, held: map[string]bool{}}
	if r.opts.Snapshot.Dir != "" {
		w.snapWake = make(chan struct{}, 1)
		if list, written, ok := r.loadSnapshot(service); ok {
			w.snap = &heldSnapshot{list: list, written: written}
		}
	}
	return w
}

// Close stops the watch and waits for its goroutine. It is idempotent.
func (w *Watcher) Close() error {
	w.cancel()
	<-w.done
	return nil
}

// Done is closed when the watcher has stopped (Close, the context given to
// Watch ended, or the registry closed).
func (w *Watcher) Done() <-chan struct{} { return w.done }

// Service returns the watched service's name.
func (w *Watcher) Service() string { return w.service }

// run owns the backend watch: it opens it, applies its events, and reopens
// it with backoff when it fails.
func (w *Watcher) run(parent context.Context) {
	defer w.r.wg.Done()
	defer close(w.done)
	defer w.r.dropWatcher(w)
	defer w.cancel()
	stop := context.AfterFunc(parent, w.cancel)
	defer stop()
	ctx := w.ctx
	log := w.r.log
	if w.snapWake != nil {
		snapDone := make(chan struct{})
		go w.snapshots(snapDone)
		defer func() { <-snapDone }() // run returns only once ctx is done
	}
	for attempt := 0; ; attempt++ {
		c := w.r.begin(ctx, "watch")
		st, err := w.r.b.Watch(c.ctx, w.service)
		err = c.end(err)
		var healthy time.Time // when the stream delivered its Reset
		if err == nil {
			for {
				var ev driver.Event
				ev, err = st.Next(ctx)
				if err != nil {
					break
				}
				if ev.Reset && healthy.IsZero() {
					healthy = time.Now()
				}
				w.apply(ev)
			}
			st.Close()
		}
		if ctx.Err() != nil {
			return
		}
		// Backoff grows across failures; it starts over only after a stream
		// that stayed up for a while, so a backend that lists but cannot
		// watch is not hammered.
		if !healthy.IsZero() && time.Since(healthy) >= w.r.opts.Backoff.Max {
			attempt = 0
		}
		log.Warn("registry: watch failed; keeping the last known list", "service", w.service, "err", err)
		w.setStale(err)
		d := w.r.opts.Backoff.Delay(attempt)
		if refusal(err) {
			d = w.r.opts.Backoff.Delay(maxAttempt)
		}
		if !sleepCtx(ctx, d) {
			return
		}
	}
}

func (w *Watcher) wake() { w.wakeLocked() }

// wakeLocked tells Next to look; it never blocks, so it may run under mu.
func (w *Watcher) wakeLocked() {
	select {
	case w.notify <- struct{}{}:
	default:
	}
}

func (w *Watcher) setStale(err error) {
	w.mu.Lock()
	w.stale, w.err = true, err
	w.outage = true
	if !w.synced && w.snap != nil {
		w.serveSnapshotLocked() // rather than nothing
	}
	// A window in progress closes; what it held is still in known and
	// belongs to the next window's instances known before the outage.
	w.inGrace = false
	w.graceGen++
	clear(w.pre)
	clear(w.held)
	w.mu.Unlock()
	w.wake()
	w.wakeSnapshots()
}

// openGrace opens the resync grace window after an outage: for
// ResyncGrace, a removal of an instance known now is held back (the
// instance stays listed and the watcher says Stale) and dropped if the
// instance comes back. Called under mu.
func (w *Watcher) openGraceLocked() {
	w.inGrace, w.announce = true, true
	clear(w.pre)
	clear(w.held)
	for id := range w.known {
		w.pre[id] = true
	}
	w.graceGen++
	gen := w.graceGen
	time.AfterFunc(w.r.opts.ResyncGrace, func() { w.endGrace(gen) })
}

// endGrace closes the window opened as generation gen: removals still held
// back are delivered and the watcher is fresh again.
func (w *Watcher) endGrace(gen int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if gen != w.graceGen || !w.inGrace {
		return
	}
	for id := range w.held {
		if _, ok := w.known[id]; ok {
			delete(w.known, id)
			w.dirty[id] = struct{}{}
		}
	}
	w.inGrace = false
	clear(w.pre)
	clear(w.held)
	w.stale, w.err = false, nil
	w.wakeLocked()
	w.wakeSnapshots()
}

// hold reports whether the removal of id is held back by the grace window,
// and records it. Called under mu.
func (w *Watcher) holdLocked(id string) bool {
	if !w.inGrace || !w.pre[id] {
		return false
	}
	if _, ok := w.known[id]; ok {
		w.held[id] = true
	}
	return true
}

// graceStaleLocked sets the state while a window is open: the watcher is
// stale for the whole window: the list may still lose instances whose
// leases ran out during the outage, and a server may report such a blip
// more than once (Consul: the catalog, then the check) before the renewals
// land, so the window never closes early. Called under mu.
func (w *Watcher) graceStaleLocked() {
	if !w.stale {
		w.announce = true
	}
	w.stale = true
	w.err = fmt.Errorf("%w: resynchronising after an outage: for up to %v, instances known before it that the registry misses (%d now) are kept", ErrUnavailable, w.r.opts.ResyncGrace, len(w.held))
}

// apply merges a backend event into known.
func (w *Watcher) apply(ev driver.Event) {
	w.mu.Lock()
	defer w.mu.Unlock()
	set := func(id string, in Instance) {
		if old, ok := w.known[id]; !ok || !old.Equal(in) {
			w.known[id] = in
			w.dirty[id] = struct{}{}
		}
	}
	del := func(id string) {
		if _, ok := w.known[id]; ok {
			delete(w.known, id)
			w.dirty[id] = struct{}{}
		}
	}
	wasStale := w.stale
	if ev.Reset {
		fresh := make(map[string]Instance, len(ev.Instances))
		var paused map[string]bool // listed, but not serving: gone for clients, never held back
		for _, di := range ev.Instances {
			if in, ok := w.r.accept(w.service, di); ok {
				fresh[in.ID] = in
			} else if di.Service == w.service && !serving(Instance(di)) {
				if paused == nil {
					paused = map[string]bool{}
				}
				paused[di.ID] = true
			}
		}
		// After an outage, removals of instances known before it are held
		// back for ResyncGrace while the watcher stays stale: their
		// registrars are usually renewing or re-registering them this very
		// moment (a TTL that ran out during the outage fires on the server
		// just after it answers again).
		// A list served from a snapshot is replaced by the registry's at
		// once: nothing says its instances are alive.
		if w.outage && w.synced && w.snapAt.IsZero() && w.r.opts.ResyncGrace > 0 {
			w.openGraceLocked()
		}
		w.outage, w.snapAt, w.snap = false, time.Time{}, nil
		for id := range w.known {
			if _, ok := fresh[id]; ok {
				continue
			}
			if paused[id] {
				del(id)
				delete(w.held, id)
			} else if !w.holdLocked(id) {
				del(id)
			}
		}
		for id, in := range fresh {
			set(id, in)
			delete(w.held, id)
		}
		w.synced = true
		if w.inGrace {
			w.graceStaleLocked()
		} else {
			w.stale, w.err = false, nil
		}
	} else {
		// In order: a key deleted and put again in one batch ends present.
		for _, c := range ev.Changes {
			if c.Instance == nil {
				if !w.holdLocked(c.ID) {
					del(c.ID)
				}
				continue
			}
			di := *c.Instance
			if di.ID != c.ID {
				w.r.log.Warn("registry: backend change names two IDs; treating it as a removal", "service", w.service, "id", c.ID, "instance", di.ID)
				del(c.ID)
				delete(w.held, c.ID)
				continue
			}
			if in, ok := w.r.accept(w.service, di); ok {
				set(in.ID, in)
				delete(w.held, in.ID)
			} else if c.ID != "" {
				// Overwritten by something invalid: the instance is gone.
				del(c.ID)
				delete(w.held, c.ID)
			}
		}
		if w.inGrace {
			w.graceStaleLocked()
		}
	}
	if len(w.dirty) > 0 || ev.Reset || w.stale != wasStale || w.announce {
		w.wakeLocked()
		w.wakeSnapshots()
	}
}

// Next blocks until there is an update and returns it. The first update
// holds the complete list (or, if the backend could not be reached yet, a
// Stale update with Synced false). Next returns ErrClosed after Close or
// once the context given to Watch is done, and ctx's error when ctx is done.
func (w *Watcher) Next(ctx context.Context) (Update, error) {
	w.nextMu.Lock()
	defer w.nextMu.Unlock()
	for {
		if u, ok := w.take(); ok {
			return u, nil
		}
		select {
		case <-w.notify:
		case <-w.done:
			if u, ok := w.take(); ok {
				return u, nil
			}
			return Update{}, opErr("watch", w.service, ErrClosed)
		case <-ctx.Done():
			return Update{}, ctx.Err()
		}
	}
}

// noteStaleLocked records, with metrics, how long the delivered updates
// stayed stale, as an update with stale is delivered. Called under mu.
func (w *Watcher) noteStaleLocked(stale bool) {
	if w.r.met == nil || stale == w.lastStale {
		return
	}
	if stale {
		w.staleAt = time.Now()
	} else if !w.staleAt.IsZero() {
		w.r.met.staleFor(w.service, time.Since(w.staleAt))
		w.staleAt = time.Time{}
	}
}

// take builds the pending update, if any.
func (w *Watcher) take() (Update, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ctx.Err() != nil {
		return Update{}, false
	}
	if !w.synced {
		if w.stale && !w.lastStale {
			w.noteStaleLocked(true)
			w.lastStale = true
			w.r.met.update(w.service)
			return Update{Stale: true, Err: w.err}, true
		}
		return Update{}, false
	}
	if w.first && len(w.dirty) == 0 && w.stale == w.lastStale && !w.announce {
		return Update{}, false
	}
	u := Update{Stale: w.stale, Err: w.err, Synced: true, Snapshot: w.snapAt}
	for id := range w.dirty {
		old, had := w.delivered[id]
		cur, has := w.known[id]
		switch {
		case has && !had:
			u.Added = append(u.Added, cur.Clone())
		case has && had && !old.Equal(cur):
			u.Changed = append(u.Changed, cur.Clone())
		case !has && had:
			u.Removed = append(u.Removed, old)
		default:
			continue
		}
		if has {
			w.delivered[id] = cur
			w.log = append(w.log, change{id: id, inst: cur})
		} else {
			delete(w.delivered, id)
			w.log = append(w.log, change{id: id, del: true})
		}
	}
	clear(w.dirty)
	if w.first && len(u.Added)+len(u.Changed)+len(u.Removed) == 0 && w.stale == w.lastStale && !w.announce {
		return Update{}, false
	}
	w.noteStaleLocked(w.stale)
	w.first, w.lastStale, w.announce = true, w.stale, false
	w.r.met.update(w.service)
	sortByID(u.Added)
	sortByID(u.Changed)
	sortByID(u.Removed)
	// The update shares base and a prefix of log, which are never written
	// again; rebuilding base once the log outgrows half of it keeps both the
	// memory and the work per update proportional to what changed.
	if len(w.log) > len(w.delivered)/2+64 {
		w.base = maps.Clone(w.delivered)
		w.log = nil
	}
	u.base, u.log = w.base, w.log[:len(w.log):len(w.log)]
	return u, true
}
