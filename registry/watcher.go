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
// backend answers again delivers only the difference. The Watchers of one
// service in one Registry share one backend watch and its list (a Watcher
// that starts late gets that list at once); each delivers at its own pace.
// A Watcher is safe for concurrent use, but updates are meant for one
// consumer.
type Watcher struct {
	f       *feed
	service string
	done    chan struct{} // closed by Close
	notify  chan struct{} // capacity 1: something changed since the last Next
	once    sync.Once
	stop    func() bool // stops the AfterFunc of Watch's context; set under r.mu

	// Guarded by f.mu. What the Watcher delivered is the feed's history
	// up to a position: its base and log[:pos] (nothing before first),
	// except the IDs in pend, which hold what it delivered of those that
	// changed before the history was replaced.
	pos       int
	pend      map[string]delivered
	first     bool // the first update has been delivered
	announce  bool // deliver an update even if nothing else changed (the stale reason did)
	lastStale bool // Stale of the last delivered update
	closed    bool
	staleAt   time.Time // when the delivered updates turned stale (with metrics only)

	nextMu sync.Mutex // one Next at a time
}

// history is the feed's list as every Watcher of the feed delivers it: a
// base, never written once made, and an append-only log of changes since,
// whose entries never change. A Watcher keeps only its position in it (and
// the updates it delivered share base and a prefix of log), so an extra
// Watcher costs the same whatever the size of the list. When the log
// outgrows half the list the feed starts a new history from its list; a
// Watcher behind then keeps what it delivered of the IDs changed since
// (pend), as many as changed, never more than the list.
type history struct {
	base map[string]Instance
	log  []change
	last map[string]int // index in log of each ID's last change
}

// delivered is the value of an ID that a Watcher delivered; had is false if
// it delivered none (or its removal).
type delivered struct {
	inst Instance
	had  bool
}

// at returns the value of id after log[:pos]: ok is false if it was absent.
func (h *history) at(id string, pos int) (Instance, bool) {
	i, ok := h.last[id]
	if !ok {
		in, ok := h.base[id]
		return in, ok
	}
	for i >= pos {
		if i = h.log[i].prev; i < 0 {
			in, ok := h.base[id]
			return in, ok
		}
	}
	c := h.log[i]
	return c.inst, !c.del
}

// record appends the change of id to known's value (absent: removed).
func (h *history) record(id string, in Instance, present bool) {
	prev, ok := h.last[id]
	if !ok {
		prev = -1
	}
	h.last[id] = len(h.log)
	h.log = append(h.log, change{id: id, inst: in, del: !present, prev: prev})
}

// feed is the backend watch of one service in a registry, shared by every
// Watcher of the service: one backend stream, one known list, one freeze,
// resync grace and snapshot, and the history of the list that the Watchers
// deliver from; each Watcher keeps only its position in it.
type feed struct {
	r       *registry
	service string
	ctx     context.Context // canceled when the last Watcher closes, and by the registry's Close
	cancel  context.CancelFunc
	done    chan struct{} // closed when run returns

	mu       sync.Mutex
	subs     map[*Watcher]struct{}
	known    map[string]Instance // the backend's latest view
	h        *history            // known as the Watchers deliver it: known is h's base and log applied
	synced   bool                // known holds a complete list
	stale    bool
	err      error
	outage   bool            // the backend watch failed since the last Reset
	inGrace  bool            // a resync grace window is open (see Options.ResyncGrace)
	pre      map[string]bool // IDs known when the window opened
	held     map[string]bool // of those, the ones missing from the registry, kept meanwhile
	graceGen int
	snapAt   time.Time     // when the snapshot known holds was written; zero once the registry answered
	snapWake chan struct{} // capacity 1: the snapshot loop has something to look at; nil without snapshots
	snap     *heldSnapshot // read at the start, until served or the registry's list arrives
	staleCh  chan struct{} // closed and replaced when stale changes (StaleChanged)
	wasStale bool          // stale when staleCh was made
}

type change struct {
	id   string
	inst Instance
	del  bool
	prev int // the index of the previous change of id in its history's log; -1: base
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

func newFeed(r *registry, service string) *feed {
	ctx, cancel := context.WithCancel(r.ctx)
	f := &feed{r: r, service: service, ctx: ctx, cancel: cancel, done: make(chan struct{}),
		subs: map[*Watcher]struct{}{}, known: map[string]Instance{}, pre: map[string]bool{}, held: map[string]bool{}, staleCh: make(chan struct{}),
		h: &history{last: map[string]int{}}}
	if r.opts.Snapshot.Dir != "" {
		f.snapWake = make(chan struct{}, 1)
		if list, written, ok := r.loadSnapshot(service); ok {
			f.snap = &heldSnapshot{list: list, written: written}
		}
	}
	return f
}

// subscribe adds a new Watcher to f: what f knows is pending for it, so
// that a Watcher that starts late gets the list at once.
func (f *feed) subscribe() *Watcher {
	w := &Watcher{f: f, service: f.service, done: make(chan struct{}), notify: make(chan struct{}, 1)}
	f.mu.Lock()
	f.subs[w] = struct{}{}
	f.mu.Unlock()
	w.wake()
	return w
}

// markLocked records in the history that id changed to its value in known
// (or was removed from it), for every Watcher. Called under mu.
func (f *feed) markLocked(id string) {
	in, ok := f.known[id]
	f.h.record(id, in, ok)
}

// compactLocked starts a new history from known once the log has outgrown
// half of it, so that the memory and the work per update stay proportional
// to what changed. Called under mu.
func (f *feed) compactLocked() {
	if len(f.h.log) <= len(f.known)/2+64 {
		return
	}
	old := f.h
	for w := range f.subs {
		if w.first {
			for _, c := range old.log[w.pos:] {
				if _, ok := w.pend[c.id]; !ok {
					if w.pend == nil {
						w.pend = map[string]delivered{}
					}
					in, had := old.at(c.id, w.pos)
					w.pend[c.id] = delivered{in, had}
				}
			}
		}
		w.pos = 0
	}
	f.h = &history{base: maps.Clone(f.known), last: map[string]int{}}
}

// announceLocked makes every Watcher deliver an update even if no instance
// changed (the stale state or its reason did). Called under mu.
func (f *feed) announceLocked() {
	for w := range f.subs {
		w.announce = true
	}
}

// Close stops the watcher; the feed's backend watch stops with its last
// Watcher, and Close then waits for its goroutine. It is idempotent.
func (w *Watcher) Close() error {
	w.once.Do(func() {
		f, r := w.f, w.f.r
		r.mu.Lock()
		if w.stop != nil {
			w.stop()
		}
		delete(r.watchers, w)
		f.mu.Lock()
		delete(f.subs, w)
		w.closed = true
		last := len(f.subs) == 0
		f.mu.Unlock()
		if last && r.feeds[f.service] == f {
			delete(r.feeds, f.service)
		}
		r.mu.Unlock()
		close(w.done)
		if last {
			f.cancel()
			<-f.done
		}
	})
	return nil
}

// StaleChanged returns a channel that is closed when the watcher next turns
// stale or fresh again (see Stale); call it again after that. It follows the
// registry whether or not Next is being called, and never holds the watch
// up: for health endpoints and alerts.
func (w *Watcher) StaleChanged() <-chan struct{} {
	w.f.mu.Lock()
	defer w.f.mu.Unlock()
	return w.f.staleCh
}

// Stale reports whether the watcher is stale now (the registry cannot be
// reached, or it is resynchronising after an outage), and why. It is the
// state of the watch, which the next update delivers.
func (w *Watcher) Stale() (bool, error) {
	w.f.mu.Lock()
	defer w.f.mu.Unlock()
	return w.f.stale, w.f.err
}

// Done is closed when the watcher has stopped (Close, the context given to
// Watch ended, or the registry closed).
func (w *Watcher) Done() <-chan struct{} { return w.done }

// Service returns the watched service's name.
func (w *Watcher) Service() string { return w.service }

// run owns the backend watch: it opens it, applies its events, and reopens
// it with backoff when it fails.
func (f *feed) run() {
	defer f.r.wg.Done()
	defer close(f.done)
	defer f.cancel()
	ctx := f.ctx
	log := f.r.log
	if f.snapWake != nil {
		snapDone := make(chan struct{})
		go f.snapshots(snapDone)
		defer func() { <-snapDone }() // run returns only once ctx is done
	}
	for attempt := 0; ; attempt++ {
		c := f.r.begin(ctx, "watch")
		st, err := f.r.b.Watch(c.ctx, f.service)
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
				f.apply(ev)
			}
			st.Close()
		}
		if ctx.Err() != nil {
			return
		}
		// Backoff grows across failures; it starts over only after a stream
		// that stayed up for a while, so a backend that lists but cannot
		// watch is not hammered.
		if !healthy.IsZero() && time.Since(healthy) >= f.r.opts.Backoff.Max {
			attempt = 0
		}
		log.Warn("registry: watch failed; keeping the last known list", "service", f.service, "err", err)
		f.setStale(err)
		d := f.r.opts.Backoff.Delay(attempt)
		if refusal(err) {
			d = f.r.opts.Backoff.Delay(maxAttempt)
		}
		if !sleepCtx(ctx, d) {
			return
		}
	}
}

func (f *feed) wake() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.wakeLocked()
}

// wakeLocked tells every Watcher's Next to look, and StaleChanged's
// channel whether stale changed; it never blocks. Every change of the
// feed's state ends with it.
func (f *feed) wakeLocked() {
	if f.stale != f.wasStale {
		f.wasStale = f.stale
		close(f.staleCh)
		f.staleCh = make(chan struct{})
	}
	for w := range f.subs {
		w.wake()
	}
}

// wake tells Next to look; it never blocks, so it may run under f.mu.
func (w *Watcher) wake() {
	select {
	case w.notify <- struct{}{}:
	default:
	}
}

func (f *feed) setStale(err error) {
	f.mu.Lock()
	f.stale, f.err = true, err
	f.outage = true
	if !f.synced && f.snap != nil {
		f.serveSnapshotLocked() // rather than nothing
	}
	// A window in progress closes; what it held is still in known and
	// belongs to the next window's instances known before the outage.
	f.inGrace = false
	f.graceGen++
	clear(f.pre)
	clear(f.held)
	f.mu.Unlock()
	f.wake()
	f.wakeSnapshots()
}

// openGrace opens the resync grace window after an outage: for
// ResyncGrace, a removal of an instance known now is held back (the
// instance stays listed and the watcher says Stale) and dropped if the
// instance comes back. Called under mu.
func (f *feed) openGraceLocked() {
	f.inGrace = true
	f.announceLocked()
	clear(f.pre)
	clear(f.held)
	for id := range f.known {
		f.pre[id] = true
	}
	f.graceGen++
	gen := f.graceGen
	time.AfterFunc(f.r.opts.ResyncGrace, func() { f.endGrace(gen) })
}

// endGrace closes the window opened as generation gen: removals still held
// back are delivered and the watcher is fresh again.
func (f *feed) endGrace(gen int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if gen != f.graceGen || !f.inGrace {
		return
	}
	for id := range f.held {
		if _, ok := f.known[id]; ok {
			delete(f.known, id)
			f.markLocked(id)
		}
	}
	f.inGrace = false
	clear(f.pre)
	clear(f.held)
	f.stale, f.err = false, nil
	f.compactLocked()
	f.wakeLocked()
	f.wakeSnapshots()
}

// hold reports whether the removal of id is held back by the grace window,
// and records it. Called under mu.
func (f *feed) holdLocked(id string) bool {
	if !f.inGrace || !f.pre[id] {
		return false
	}
	if _, ok := f.known[id]; ok {
		f.held[id] = true
	}
	return true
}

// graceStaleLocked sets the state while a window is open: the watcher is
// stale for the whole window: the list may still lose instances whose
// leases ran out during the outage, and a server may report such a blip
// more than once (Consul: the catalog, then the check) before the renewals
// land, so the window never closes early. Called under mu.
func (f *feed) graceStaleLocked() {
	if !f.stale {
		f.announceLocked()
	}
	f.stale = true
	f.err = fmt.Errorf("%w: resynchronising after an outage: for up to %v, instances known before it that the registry misses (%d now) are kept", ErrUnavailable, f.r.opts.ResyncGrace, len(f.held))
}

// apply merges a backend event into known.
func (f *feed) apply(ev driver.Event) {
	f.mu.Lock()
	defer f.mu.Unlock()
	set := func(id string, in Instance) {
		if old, ok := f.known[id]; !ok || !old.Equal(in) {
			f.known[id] = in
			f.markLocked(id)
		}
	}
	del := func(id string) {
		if _, ok := f.known[id]; ok {
			delete(f.known, id)
			f.markLocked(id)
		}
	}
	if ev.Reset {
		fresh := make(map[string]Instance, len(ev.Instances))
		var paused map[string]bool // listed, but not serving: gone for clients, never held back
		for _, di := range ev.Instances {
			if in, ok := f.r.accept(f.service, di); ok {
				fresh[in.ID] = in
			} else if di.Service == f.service && !serving(Instance(di)) {
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
		if f.outage && f.synced && f.snapAt.IsZero() && f.r.opts.ResyncGrace > 0 {
			f.openGraceLocked()
		}
		f.outage, f.snapAt, f.snap = false, time.Time{}, nil
		for id := range f.known {
			if _, ok := fresh[id]; ok {
				continue
			}
			if paused[id] {
				del(id)
				delete(f.held, id)
			} else if !f.holdLocked(id) {
				del(id)
			}
		}
		for id, in := range fresh {
			set(id, in)
			delete(f.held, id)
		}
		f.synced = true
		if f.inGrace {
			f.graceStaleLocked()
		} else {
			f.stale, f.err = false, nil
		}
	} else {
		// In order: a key deleted and put again in one batch ends present.
		for _, c := range ev.Changes {
			if c.Instance == nil {
				if !f.holdLocked(c.ID) {
					del(c.ID)
				}
				continue
			}
			di := *c.Instance
			if di.ID != c.ID {
				f.r.log.Warn("registry: backend change names two IDs; treating it as a removal", "service", f.service, "id", c.ID, "instance", di.ID)
				del(c.ID)
				delete(f.held, c.ID)
				continue
			}
			if in, ok := f.r.accept(f.service, di); ok {
				set(in.ID, in)
				delete(f.held, in.ID)
			} else if c.ID != "" {
				// Overwritten by something invalid: the instance is gone.
				del(c.ID)
				delete(f.held, c.ID)
			}
		}
		if f.inGrace {
			f.graceStaleLocked()
		}
	}
	// Each Watcher's take finds out whether it has something to deliver.
	f.compactLocked()
	f.wakeLocked()
	f.wakeSnapshots()
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
	if w.f.r.met == nil || stale == w.lastStale {
		return
	}
	if stale {
		w.staleAt = time.Now()
	} else if !w.staleAt.IsZero() {
		w.f.r.met.staleFor(w.service, time.Since(w.staleAt))
		w.staleAt = time.Time{}
	}
}

// take builds the pending update, if any.
func (w *Watcher) take() (Update, bool) {
	w.f.mu.Lock()
	defer w.f.mu.Unlock()
	if w.closed {
		return Update{}, false
	}
	if !w.f.synced {
		if w.f.stale && !w.lastStale {
			w.noteStaleLocked(true)
			w.lastStale = true
			w.f.r.met.update(w.service)
			return Update{Stale: true, Err: w.f.err}, true
		}
		return Update{}, false
	}
	cur := w.f.h
	if w.first && w.pos == len(cur.log) && len(w.pend) == 0 && w.f.stale == w.lastStale && !w.announce {
		return Update{}, false
	}
	u := Update{Stale: w.f.stale, Err: w.f.err, Synced: true, Snapshot: w.f.snapAt}
	if !w.first {
		for _, in := range w.f.known {
			u.Added = append(u.Added, in.Clone())
		}
	} else {
		// The IDs changed since the Watcher's position (and those pending
		// from before the history was replaced), each compared once, at its
		// final state, with what the Watcher delivered of it.
		diff := func(id string, old Instance, had bool) {
			now, has := w.f.known[id]
			switch {
			case has && !had:
				u.Added = append(u.Added, now.Clone())
			case has && had && !old.Equal(now):
				u.Changed = append(u.Changed, now.Clone())
			case !has && had:
				u.Removed = append(u.Removed, old)
			}
		}
		for id, d := range w.pend {
			diff(id, d.inst, d.had)
		}
		for i, c := range cur.log[w.pos:] {
			if _, ok := w.pend[c.id]; ok || cur.last[c.id] != w.pos+i {
				continue // compared already, or changed again later
			}
			old, had := cur.at(c.id, w.pos)
			diff(c.id, old, had)
		}
		w.pend = nil
		if len(u.Added)+len(u.Changed)+len(u.Removed) == 0 && w.f.stale == w.lastStale && !w.announce {
			w.pos = len(cur.log)
			return Update{}, false
		}
	}
	w.pos = len(cur.log)
	w.noteStaleLocked(w.f.stale)
	w.first, w.lastStale, w.announce = true, w.f.stale, false
	w.f.r.met.update(w.service)
	sortByID(u.Added)
	sortByID(u.Changed)
	sortByID(u.Removed)
	// The update shares the history's base and a prefix of its log, which
	// are never written again.
	u.base, u.log = cur.base, cur.log[:w.pos:w.pos]
	return u, true
}
