package conformance

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

// Bounds of the fault subtests.
const (
	// outageLen is how long the long outages last: past every lease.
	outageLen = 3 * TTL
	// downBound bounds how long a call, or a new watcher's first update,
	// may take while the server is down (the shared layer bounds every
	// backend call by its CallTimeout, 5s by default).
	downBound = 15 * time.Second
	// idleLen is how long IdleWatcherStaysFresh watches a quiet service.
	idleLen = 30 * time.Second
	// dupLen is how long DuplicateIDIsRefusedOrStable watches a contested ID.
	dupLen = 10 * time.Second
	// handful is how many changes of one contested ID a watcher may see
	// in dupLen: its addition and a few flips while a conflict is found out.
	handful = 4
)

// outage is a fault in progress; it is ended by end, or when the test ends
// (so a failing subtest leaves a working server to the cleanups after it).
type outage struct {
	t    *testing.T
	h    Harness
	stop bool
	mu   sync.Mutex
	on   bool
}

// down pauses (stop false) or stops (stop true, data kept) the server. The
// subtest is skipped if the harness cannot.
func down(t *testing.T, h Harness, stop bool) *outage {
	t.Helper()
	o := &outage{t: t, h: h, stop: stop}
	ctx := ctxT(t)
	if stop {
		skipIfUnsupported(t, h.StopServer(ctx))
	} else {
		skipIfUnsupported(t, h.PauseServer(ctx))
	}
	o.on = true
	t.Cleanup(func() {
		o.mu.Lock()
		on := o.on
		o.mu.Unlock()
		if on {
			o.end()
		}
	})
	return o
}

func (o *outage) what() string {
	if o.stop {
		return "stopped"
	}
	return "paused"
}

// end brings the server back (with its data).
func (o *outage) end() {
	o.t.Helper()
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.on {
		return
	}
	o.on = false
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var err error
	if o.stop {
		err = o.h.StartServer(ctx, false)
	} else {
		err = o.h.ResumeServer(ctx)
	}
	if err != nil {
		o.t.Fatalf("bringing the %s server back: %v", o.what(), err)
	}
}

// registeredAgain waits until every registration is Registered and Lookup
// through r lists exactly want.
func registeredAgain(t *testing.T, r registry.Registry, svc string, regs []*registry.Registration, want ...string) {
	t.Helper()
	slices.Sort(want)
	waitFor(t, recover, fmt.Sprintf("registrations Registered and Lookup = %v", short(want)), func() bool {
		for _, reg := range regs {
			if reg.Status().State != registry.Registered {
				return false
			}
		}
		return slices.Equal(lookupIDsQuiet(r, svc), want)
	})
}

// noStaleAfterFresh returns a check that fails a stale update that comes
// after a fresh one: once resynchronised, a healthy server keeps the
// watcher fresh.
func noStaleAfterFresh() func(record) error {
	fresh := false
	return func(rec record) error {
		if rec.stale && fresh {
			return errors.New("the watcher went stale again while the server was healthy")
		}
		if !rec.stale && rec.synced {
			fresh = true
		}
		return nil
	}
}

func both(checks ...func(record) error) func(record) error {
	return func(rec record) error {
		for _, c := range checks {
			if err := c(rec); err != nil {
				return err
			}
		}
		return nil
	}
}

// testOutageLongerThanTTL: the server is paused for longer than every
// lease; when it resumes, leases expire and are renewed or re-registered at
// once. No update, during the outage or after, may show a live instance
// missing; the watcher ends fresh with the exact list and stays so.
func testOutageLongerThanTTL(t *testing.T, h Harness) {
	svc := service("outage")
	r1, r2 := open(t, h), open(t, h)
	regs := []*registry.Registration{register(t, r1, instFor(h, svc, "a", 9001)), register(t, r2, instFor(h, svc, "b", 9002))}
	f := follow(t, open(t, h), svc)
	f.waitFresh(settle, "a", "b")
	mark := f.mark()
	o := down(t, h, false)
	start := time.Now()
	f.waitStale(recover, true)
	f.hold(time.Until(start.Add(outageLen)), mark, "while the server was paused", exactly("a", "b"))
	o.end()
	resumed := f.mark()
	t.Logf("paused for %v", time.Since(start).Round(time.Millisecond))
	f.waitFresh(recover, "a", "b")
	registeredAgain(t, r1, svc, regs, "a", "b")
	// Every update since the pause lists a and b, and once fresh the
	// watcher stays fresh, for long enough that a removal held back by a
	// resync grace, or a lease expiring late, would have shown.
	f.hold(outageLen, mark, "after the server resumed", both(exactly("a", "b"), afterMark(resumed, noStaleAfterFresh())))
	if got := lookupIDs(t, r2, svc); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("Lookup after the outage = %v, want [a b]", got)
	}
}

// afterMark applies check only to updates from mark on.
func afterMark(mark int, check func(record) error) func(record) error {
	return func(rec record) error {
		if rec.n < mark {
			return nil
		}
		return check(rec)
	}
}

// testIdleWatcherStaysFresh: nothing changes for idleLen on a healthy
// server; the watchers deliver nothing after their first update (no stale
// update, no relist that shows as one) and the registration is never lost.
func testIdleWatcherStaysFresh(t *testing.T, h Harness) {
	svc := service("idle")
	r := open(t, h)
	reg := register(t, r, instFor(h, svc, "a", 9001))
	fs := []*follower{follow(t, open(t, h), svc), follow(t, r, svc)}
	for _, f := range fs {
		f.waitFresh(settle, "a")
		if n := f.mark(); n != 1 {
			t.Fatalf("the first list took %d updates on a healthy server:\n%s", n, f.dump(0))
		}
	}
	none := func(rec record) error { return errors.New("an update on an idle service") }
	fs[0].hold(idleLen, 1, fmt.Sprintf("watching an idle service for %v", idleLen), none)
	fs[1].every(1, fmt.Sprintf("watching an idle service for %v (the registrar's own Registry)", idleLen), none)
	if s := reg.Status(); s.State != registry.Registered || s.Reregistrations != 0 {
		t.Fatalf("registration after %v idle: %+v; want registered, never re-registered", idleLen, s)
	}
	if got := lookupIDs(t, r, svc); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("Lookup = %v, want [a]", got)
	}
}

// testWatchStartedWhileDown: a watcher opened while the server is down
// delivers, within downBound, a stale update that is not synced and says
// why; once the server is back it syncs with the exact list.
func testWatchStartedWhileDown(t *testing.T, h Harness) {
	svc := service("startdown")
	r0 := open(t, h)
	regs := []*registry.Registration{register(t, r0, instFor(h, svc, "a", 9001))}
	for _, stop := range []bool{true, false} {
		o := down(t, h, stop)
		ctx, cancel := context.WithTimeout(context.Background(), downBound)
		r, err := h.MakeRegistry(ctx, TTL)
		cancel()
		if err != nil {
			t.Fatalf("MakeRegistry while the server is %s: %v (opening a client must not need the server)", o.what(), err)
		}
		t.Cleanup(func() { _ = r.Close() })
		start := time.Now()
		f := follow(t, r, svc)
		f.waitUntil(downBound, fmt.Sprintf("a first update of a watcher opened while the server is %s", o.what()), func(record) bool { return true })
		first := f.since(0)[0]
		t.Logf("server %s: first update after %v: %s", o.what(), time.Since(start).Round(time.Millisecond), first)
		if !first.stale || first.synced || first.size() != 0 || !errors.Is(first.err, registry.ErrUnavailable) {
			t.Fatalf("server %s: first update %s; want stale, not synced, empty, with an Err wrapping ErrUnavailable", o.what(), first)
		}
		o.end()
		f.waitFresh(recover, "a")
		if stop && !connectionBound(h) {
			// The data was kept and leases survive a restart: the first
			// list the watcher gets is the exact one.
			for _, rec := range f.since(0) {
				if rec.synced {
					if !slices.Equal(rec.ids, []string{"a"}) {
						t.Fatalf("after the restart the first synced update is %s, want [a]", rec)
					}
					break
				}
			}
		}
		registeredAgain(t, r0, svc, regs, "a")
	}
}

// call is one call made while the server is down.
type call struct {
	what string
	took time.Duration
	err  error
}

// testCallsFailFast: while the server is stopped or paused, Register,
// Lookup and Ping with context.Background() return within downBound with an
// error wrapping ErrUnavailable, on a client that was connected before and
// on one made during the outage.
func testCallsFailFast(t *testing.T, h Harness) {
	svc := service("failfast")
	r := open(t, h)
	register(t, r, instFor(h, svc, "warm", 9001))
	if err := r.Ping(ctxT(t)); err != nil {
		t.Fatalf("Ping: %v", err)
	}
	for _, stop := range []bool{true, false} {
		o := down(t, h, stop)
		ctx, cancel := context.WithTimeout(context.Background(), downBound)
		fresh, err := h.MakeRegistry(ctx, TTL)
		cancel()
		if err != nil {
			t.Fatalf("MakeRegistry while the server is %s: %v (opening a client must not need the server)", o.what(), err)
		}
		t.Cleanup(func() { _ = fresh.Close() })
		clients := []struct {
			name string
			r    registry.Registry
		}{{"connected client", r}, {"client made during the outage", fresh}}
		results := make(chan call, 3*len(clients))
		n := 0
		for ci, c := range clients {
			id := fmt.Sprintf("x-%s-%d", o.what(), ci)
			ops := []struct {
				op string
				fn func() error
			}{
				{"Register", func() error { _, err := c.r.Register(context.Background(), instFor(h, svc, id, 9002)); return err }},
				{"Lookup", func() error { _, err := c.r.Lookup(context.Background(), svc); return err }},
				{"Ping", func() error { return c.r.Ping(context.Background()) }},
			}
			for _, op := range ops {
				n++
				go func() {
					start := time.Now()
					err := op.fn()
					results <- call{what: op.op + " on the " + c.name, took: time.Since(start), err: err}
				}()
			}
		}
		timeout := time.After(downBound)
		var got []call
	collect:
		for len(got) < n {
			select {
			case c := <-results:
				got = append(got, c)
			case <-timeout:
				break collect
			}
		}
		hung := n - len(got)
		o.end() // lets calls that hang return
		for _, c := range got {
			t.Logf("server %s: %s: %v after %v", o.what(), c.what, c.err, c.took.Round(time.Millisecond))
			if !errors.Is(c.err, registry.ErrUnavailable) {
				t.Errorf("server %s: %s returned %v; want an error wrapping ErrUnavailable", o.what(), c.what, c.err)
			}
		}
		if hung > 0 {
			// Wait for them (the server is back) so no goroutine outlives the test.
			for range hung {
				select {
				case <-results:
				case <-time.After(recover):
				}
			}
			t.Fatalf("server %s: %d of %d calls with context.Background() did not return within %v", o.what(), hung, n, downBound)
		}
	}
}

// testDeregisterDuringOutage: a Deregister that cannot reach the server
// fails, the registration says it is still being withdrawn, and once the
// server is back the instance goes and stays gone (no ghost kept alive by
// the Registry's shared lease). Deregistered is reported only once the
// instance is withdrawn.
func testDeregisterDuringOutage(t *testing.T, h Harness) {
	svc := service("deregdown")
	r1, r2 := open(t, h), open(t, h)
	a := register(t, r1, instFor(h, svc, "a", 9001))
	register(t, r1, instFor(h, svc, "b", 9002)) // keeps r1's lease or session in use
	c := register(t, r2, instFor(h, svc, "c", 9003))
	register(t, r2, instFor(h, svc, "d", 9004))
	obs := open(t, h)
	f := follow(t, obs, svc)
	f.waitFresh(settle, "a", "b", "c", "d")
	mark := f.mark()
	start := time.Now()
	pending := map[string]*registry.Registration{}
	for _, step := range []struct {
		stop bool
		id   string
		reg  *registry.Registration
	}{{false, "a", a}, {true, "c", c}} {
		o := down(t, h, step.stop)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := step.reg.Deregister(ctx)
		cancel()
		if err == nil {
			t.Fatalf("Deregister of %s with a 1s context while the server was %s returned nil: it cannot have withdrawn the instance", step.id, o.what())
		}
		t.Logf("Deregister of %s while the server was %s: %v", step.id, o.what(), err)
		// The withdrawal is pending (its first attempt may still be in
		// flight, so Status.Err may not say why yet).
		if s := step.reg.Status(); s.State != registry.Withdrawing {
			t.Fatalf("status after the failed Deregister of %s: %v (err %v); want %v", step.id, s.State, s.Err, registry.Withdrawing)
		}
		pending[step.id] = step.reg
		o.end()
	}
	waitFor(t, downBound, "both instances withdrawn once the server is back", func() bool {
		for id, reg := range pending {
			if reg.Status().State != registry.Deregistered {
				continue
			}
			// Asked of a client made now, which reads the registry's own
			// state: a client that went through the outage may still
			// answer from what it was last sent (Nacos: the SDK's cache,
			// until the server pushes again), and that lag is the
			// watcher's property below, not the withdrawal's.
			fresh := open(t, h)
			ids := lookupIDsQuiet(fresh, svc)
			_ = fresh.Close()
			if ids == nil {
				continue // Lookup failed: ask again
			}
			if slices.Contains(ids, id) {
				t.Fatalf("the registration of %s says Deregistered but Lookup still lists it: %v", id, ids)
			}
			delete(pending, id)
		}
		return len(pending) == 0
	})
	f.waitFresh(settle, "b", "d")
	t.Logf("withdrawn %v after the first Deregister", time.Since(start).Round(time.Millisecond))
	gone := f.mark()
	f.hold(3*TTL, gone, "after the withdrawal", exactly("b", "d"))
	f.every(mark, "since the first Deregister", func(rec record) error {
		for _, id := range rec.added {
			return fmt.Errorf("%s added again", id)
		}
		return nil
	})
	if got := lookupIDs(t, obs, svc); !slices.Equal(got, []string{"b", "d"}) {
		t.Fatalf("Lookup 3 TTLs after the withdrawal = %v, want [b d]", got)
	}
	for _, reg := range []*registry.Registration{a, c} {
		if err := reg.Deregister(ctxT(t)); err != nil {
			t.Errorf("Deregister of %s again once withdrawn: %v, want nil", reg.Instance().ID, err)
		}
	}
}

// testCloseBoundedWhilePaused: Close of a Registry with registrations,
// watchers and an Update in flight returns within downBound while the
// server is paused; what it could not withdraw expires.
func testCloseBoundedWhilePaused(t *testing.T, h Harness) {
	svc := service("closepaused")
	r, err := h.MakeRegistry(ctxT(t), TTL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() }) // also when the subtest stops early (Close is idempotent)
	var regs []*registry.Registration
	for i, id := range []string{"a", "b", "c"} {
		regs = append(regs, register(t, r, instFor(h, svc, id, 9001+i)))
	}
	var ws []*registry.Watcher
	for _, s := range []string{svc, service("closepaused-other")} {
		w, err := r.Watch(ctxT(t), s)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Next(ctxT(t)); err != nil {
			t.Fatal(err)
		}
		ws = append(ws, w)
	}
	obs := open(t, h)
	o := down(t, h, false)
	updated := make(chan error, 1)
	go func() {
		updated <- regs[0].Update(context.Background(), changed(h, instFor(h, svc, "a", 9001)))
	}()
	// Give the Update a head start so that it is in flight when Close
	// starts (whichever runs first, both must return in time).
	var updateErr error
	updateDone := false
	select {
	case updateErr = <-updated:
		updateDone = true
	case <-time.After(200 * time.Millisecond):
	}
	closed := make(chan error, 1)
	start := time.Now()
	go func() { closed <- r.Close() }()
	select {
	case err := <-closed:
		t.Logf("Close while paused returned after %v: %v", time.Since(start).Round(time.Millisecond), err)
	case <-time.After(downBound):
		o.end()
		<-closed
		t.Fatalf("Close while the server was paused did not return within %v", downBound)
	}
	if !updateDone {
		select {
		case updateErr = <-updated:
		case <-time.After(downBound):
			o.end()
			<-updated
			t.Fatalf("Update with context.Background() while the server was paused did not return within %v", downBound)
		}
	}
	t.Logf("Update with context.Background() while paused: %v", updateErr)
	if updateErr == nil {
		t.Errorf("Update while the server was paused returned nil")
	}
	for _, w := range ws {
		ctx, cancel := context.WithTimeout(context.Background(), settle)
		_, err := w.Next(ctx)
		cancel()
		if !isClosed(err) {
			t.Errorf("Watcher.Next after Close: %v, want ErrClosed", err)
		}
	}
	o.end()
	waitFor(t, expiry, "the instances of the closed Registry to be gone", func() bool {
		ids := lookupIDsQuiet(obs, svc)
		return ids != nil && len(ids) == 0
	})
}

// testDuplicateID: one Registry refuses a second Register of a live
// (service, ID); two Registries registering one ID at two addresses settle:
// the watcher sees at most a handful of changes of it, and the losing side
// is told ErrConflict (by Register or in its Status).
func testDuplicateID(t *testing.T, h Harness) {
	svc := service("dup")
	r := open(t, h)
	f := follow(t, open(t, h), svc)
	f.waitFresh(settle)
	first := register(t, r, instFor(h, svc, "one", 7001))
	f.waitFresh(settle, "one")
	for _, port := range []int{7001, 7002} {
		if _, err := r.Register(ctxT(t), instFor(h, svc, "one", port)); !errors.Is(err, registry.ErrConflict) {
			t.Fatalf("second Register of a live (service, ID) in one Registry at port %d: error %v; want ErrConflict", port, err)
		}
	}
	if s := first.Status(); s.State != registry.Registered {
		t.Fatalf("the first registration after the refused ones: %+v", s)
	}
	if list, err := r.Lookup(ctxT(t), svc); err != nil || len(list) != 1 || list[0].Addr != "127.0.0.1:7001" {
		t.Fatalf("Lookup after the refused Registers = %v, %v; want one at 127.0.0.1:7001", list, err)
	}

	// Two registrars, one ID, two addresses.
	r1, r2 := open(t, h), open(t, h)
	mark := f.mark()
	reg1 := register(t, r1, instFor(h, svc, "same", 7101))
	reg2, err2 := r2.Register(ctxT(t), instFor(h, svc, "same", 7102))
	if err2 != nil && !errors.Is(err2, registry.ErrConflict) {
		t.Fatalf("Register of an ID another registrar holds at another address: %v; want success or ErrConflict", err2)
	}
	t.Logf("second registrar's Register: %v", err2)
	changes := 0
	f.hold(dupLen, mark, fmt.Sprintf("two registrars holding one ID for %v", dupLen), func(rec record) error {
		for _, l := range [][]string{rec.added, rec.changed, rec.removed} {
			if slices.Contains(l, "same") {
				changes++
			}
		}
		if changes > handful {
			return fmt.Errorf("%d changes of the contested ID: the registrars are fighting over it", changes)
		}
		return nil
	})
	got, ok := f.get("same")
	if !ok {
		t.Fatalf("after %v neither registrar's instance is listed:\n%s", dupLen, f.dump(mark))
	}
	winner, loser := reg1, reg2
	if got.Addr == "127.0.0.1:7102" {
		winner, loser = reg2, reg1
	}
	if winner == nil {
		t.Fatalf("the watcher lists %v, but that Register failed with %v", got, err2)
	}
	if s := winner.Status(); s.State != registry.Registered {
		t.Errorf("the registration the watcher lists (%s) is %v: %v", got.Addr, s.State, s.Err)
	}
	if loser == nil {
		if !errors.Is(err2, registry.ErrConflict) {
			t.Errorf("the losing Register failed with %v, want ErrConflict", err2)
		}
	} else if s := loser.Status(); s.State == registry.Registered || !errors.Is(s.Err, registry.ErrConflict) {
		t.Errorf("the losing registration (%s) reports %v with %v; want not registered, with an error wrapping ErrConflict", loser.Instance().Addr, s.State, s.Err)
	}
	if list, err := r.Lookup(ctxT(t), svc); err != nil {
		t.Fatal(err)
	} else if i := slices.IndexFunc(list, func(in registry.Instance) bool { return in.ID == "same" }); i < 0 || list[i].Addr != got.Addr {
		t.Errorf("Lookup = %v, the watcher lists %v", list, got)
	}
}

// testBurstMixed: several registrars add 500 instances, update 250 times
// and remove 250, interleaved. Every delivered update is consistent with a
// state the server went through: per ID an addition, then changes to values
// written later, then at most one removal of an instance that was removed,
// never an addition again; the final list is exact and equal to Lookup.
func testBurstMixed(t *testing.T, h Harness) {
	const (
		n       = 500
		writers = 4
		workers = 24
	)
	svc := service("mixed")
	regs := make([]registry.Registry, writers)
	for i := range regs {
		regs[i] = open(t, h)
	}
	// Per ID (i%4): 0 added and updated twice, 1 and 3 added and removed,
	// 2 added only. 250 updates, 250 removals, 250 left.
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("m%03d", i)
	}
	updates := func(i int) int {
		if i%4 == 0 {
			return 2
		}
		return 0
	}
	removed := func(i int) bool { return i%2 == 1 }
	// The value of ID i at its rev-th write: rev in the metadata, or, where
	// the registry stores an address only, in the port.
	value := func(i, rev int) registry.Instance {
		if addressOnly(h) {
			return instFor(h, svc, ids[i], 20000+3*i+rev)
		}
		in := instFor(h, svc, ids[i], 20000+i)
		in.Metadata["rev"] = strconv.Itoa(rev)
		return in
	}
	revOf := func(i int, in registry.Instance) (int, error) {
		if addressOnly(h) {
			_, port, _ := net.SplitHostPort(in.Addr)
			p, err := strconv.Atoi(port)
			return p - 20000 - 3*i, err
		}
		return strconv.Atoi(in.Metadata["rev"])
	}
	index := map[string]int{}
	for i, id := range ids {
		index[id] = i
	}
	type seen struct {
		rev     int
		present bool
		gone    bool
	}
	state := map[string]*seen{} // used by the hook only, in the watch goroutine
	hook := func(u registry.Update) error {
		if u.Stale {
			return fmt.Errorf("stale update during a burst on a healthy server: %v", u.Err)
		}
		check := func(in registry.Instance) (int, error) {
			i, ok := index[in.ID]
			if !ok {
				return 0, fmt.Errorf("unknown instance %v", in)
			}
			rev, err := revOf(i, in)
			if err != nil || rev < 0 || rev > updates(i) || !in.Equal(value(i, rev)) {
				return 0, fmt.Errorf("%v was never written", in)
			}
			return rev, nil
		}
		for _, in := range u.Added {
			rev, err := check(in)
			if err != nil {
				return err
			}
			s := state[in.ID]
			if s != nil {
				return fmt.Errorf("%s added again (present=%v, removed before=%v)", in.ID, s.present, s.gone)
			}
			state[in.ID] = &seen{rev: rev, present: true}
		}
		for _, in := range u.Changed {
			rev, err := check(in)
			if err != nil {
				return err
			}
			s := state[in.ID]
			if s == nil || !s.present {
				return fmt.Errorf("%s changed while not present", in.ID)
			}
			if rev < s.rev {
				return fmt.Errorf("%s went back from rev %d to %d", in.ID, s.rev, rev)
			}
			s.rev = rev
		}
		for _, in := range u.Removed {
			s := state[in.ID]
			if s == nil || !s.present {
				return fmt.Errorf("%s removed while not present", in.ID)
			}
			if !removed(index[in.ID]) {
				return fmt.Errorf("%s removed, but it was never deregistered", in.ID)
			}
			s.present, s.gone = false, true
		}
		return nil
	}
	f := followWith(t, open(t, h), svc, hook)
	f.waitFresh(settle)

	order := rand.Perm(n)
	work := make(chan int)
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	start := time.Now()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				r := regs[(i/4)%writers]
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				err := func() error {
					reg, err := r.Register(ctx, value(i, 0))
					if err != nil {
						return err
					}
					for rev := 1; rev <= updates(i); rev++ {
						if err := reg.Update(ctx, value(i, rev)); err != nil {
							return err
						}
					}
					if removed(i) {
						return reg.Deregister(ctx)
					}
					return nil
				}()
				cancel()
				if err != nil {
					errs <- fmt.Errorf("%s: %w", ids[i], err)
					return
				}
			}
		}()
	}
	for _, i := range order {
		work <- i
	}
	close(work)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("500 adds, 250 updates, 250 removals by %d registrars in %v", writers, time.Since(start).Round(time.Millisecond))
	var want []string
	for i, id := range ids {
		if !removed(i) {
			want = append(want, id)
		}
	}
	f.waitFresh(recover, want...)
	// The IDs are right; the last updates may still be on their way (an
	// Update returns once the server has it, not once every watcher has).
	var wrong string
	finalValues := func() bool {
		for i, id := range ids {
			if removed(i) {
				continue
			}
			if got, _ := f.get(id); !got.Equal(value(i, updates(i))) {
				wrong = fmt.Sprintf("%v %v, want %v", got, got.Metadata, value(i, updates(i)).Metadata)
				return false
			}
		}
		return true
	}
	for deadline := time.Now().Add(recover); !finalValues(); {
		if time.Now().After(deadline) {
			t.Fatalf("watcher ends with %s", wrong)
		}
		time.Sleep(testutil.PollInterval) // polling, not synchronisation
	}
	f.check()
	// Lookup, on another client, agrees with the watcher (push-based
	// backends' clients converge independently: wait for it, bounded).
	var disagree string
	agree := func() bool {
		list, err := regs[0].Lookup(ctxT(t), svc)
		if err != nil {
			disagree = err.Error()
			return false
		}
		if len(list) != len(want) {
			disagree = fmt.Sprintf("Lookup has %d instances, want %d", len(list), len(want))
			return false
		}
		for _, in := range list {
			if got, _ := f.get(in.ID); !got.Equal(in) {
				disagree = fmt.Sprintf("Lookup has %v %v, the watcher %v %v", in, in.Metadata, got, got.Metadata)
				return false
			}
		}
		return true
	}
	for deadline := time.Now().Add(recover); !agree(); {
		if time.Now().After(deadline) {
			t.Fatal(disagree)
		}
		time.Sleep(testutil.PollInterval) // polling, not synchronisation
	}
	t.Logf("the watcher got %d updates", f.mark())
}

// testFreezeNeverShrinks: the server is paused, then stopped, each time for
// longer than every lease, and comes back with its data. No update during
// or after the outages shrinks the list: a stale update never removes
// anything, and an instance delivered as removed and then added again (a
// re-registration shown as remove-then-add) fails. The final list is exact.
func testFreezeNeverShrinks(t *testing.T, h Harness) {
	svc := service("noshrink")
	r1, r2 := open(t, h), open(t, h)
	all := []string{"a", "b", "c", "d", "e"}
	var regs []*registry.Registration
	for i, id := range all {
		r := r1
		if i >= 3 {
			r = r2
		}
		regs = append(regs, register(t, r, instFor(h, svc, id, 9001+i)))
	}
	f := follow(t, open(t, h), svc)
	f.waitFresh(settle, all...)
	removedAt := map[string]record{}
	check := func(rec record) error {
		if rec.stale && (len(rec.removed) > 0 || len(rec.ids) < len(all)) {
			return errors.New("a stale update shrank the list")
		}
		for _, id := range rec.removed {
			removedAt[id] = rec
		}
		for _, id := range rec.added {
			if prev, ok := removedAt[id]; ok {
				return fmt.Errorf("%s was delivered as removed (%s) and then added again: a live instance must never be shown gone", id, prev)
			}
		}
		return nil
	}
	m := f.mark()
	for _, stop := range []bool{false, true} {
		o := down(t, h, stop)
		start := time.Now()
		f.waitStale(recover, true)
		m = f.hold(time.Until(start.Add(outageLen)), m, "while the server was "+o.what(), check)
		o.end()
		f.waitFresh(recover, all...)
		registeredAgain(t, r1, svc, regs, all...)
		m = f.hold(0, m, "after the server came back", check)
	}
	f.hold(outageLen, m, "after the outages", both(check, exactly(all...)))
}

// testNamespaceIsolation: registries in namespaces whose names are
// prefixes of each other, and one in the default namespace, never see each
// other's instances of the same service.
func testNamespaceIsolation(t *testing.T, h Harness) {
	nm, ok := h.(NamespaceMaker)
	if !ok {
		t.Skip("the harness has no NamespaceMaker: it cannot make clients scoped to a namespace")
	}
	svc := service("ns")
	mk := func(ns string) registry.Registry {
		r, err := nm.MakeRegistryIn(ctxT(t), TTL, ns)
		skipIfUnsupported(t, err)
		t.Cleanup(func() { _ = r.Close() })
		return r
	}
	spaces := []struct {
		ns string
		r  registry.Registry
		id string
	}{{"team-a", mk("team-a"), "in-a"}, {"team-ab", mk("team-ab"), "in-ab"}, {"", open(t, h), "in-default"}}
	fs := make([]*follower, len(spaces))
	for i, s := range spaces {
		register(t, s.r, instFor(h, svc, s.id, 9001+i))
		fs[i] = follow(t, s.r, svc)
	}
	for i, s := range spaces {
		if got := lookupIDs(t, s.r, svc); !slices.Equal(got, []string{s.id}) {
			t.Fatalf("Lookup in namespace %q = %v, want [%s]", s.ns, got, s.id)
		}
		fs[i].waitFresh(settle, s.id)
	}
	// Later registrations stay in their namespace too.
	for i, s := range spaces {
		register(t, s.r, instFor(h, svc, s.id+"-2", 9101+i))
	}
	for i, s := range spaces {
		fs[i].waitFresh(settle, s.id, s.id+"-2")
		fs[i].every(0, fmt.Sprintf("watcher in namespace %q", s.ns), func(rec record) error {
			for _, id := range rec.ids {
				if id != s.id && id != s.id+"-2" {
					return fmt.Errorf("it lists %s of another namespace", id)
				}
			}
			return nil
		})
	}
}

// testPermissionDenied: a client with valid credentials but no rights gets
// errors wrapping ErrPermission (not ErrUnavailable) from Register and
// Lookup, and a watcher whose first update says so.
func testPermissionDenied(t *testing.T, h Harness) {
	rm, ok := h.(RestrictedMaker)
	if !ok {
		t.Skip("the harness has no RestrictedMaker: it cannot make a client without rights")
	}
	r, err := rm.MakeRestrictedRegistry(ctxT(t), TTL)
	skipIfUnsupported(t, err)
	t.Cleanup(func() { _ = r.Close() })
	svc := service("denied")
	ctx, cancel := context.WithTimeout(context.Background(), downBound)
	defer cancel()
	denied := func(what string, err error) {
		t.Helper()
		t.Logf("%s: %v", what, err)
		if !errors.Is(err, registry.ErrPermission) || errors.Is(err, registry.ErrUnavailable) {
			t.Errorf("%s without rights: %v; want an error wrapping ErrPermission and not ErrUnavailable", what, err)
		}
	}
	reg, err := r.Register(ctx, instFor(h, svc, "a", 9001))
	if err == nil {
		t.Errorf("Register without rights succeeded: %+v", reg.Status())
	}
	denied("Register", err)
	_, err = r.Lookup(ctx, svc)
	denied("Lookup", err)
	f := follow(t, r, svc)
	f.waitUntil(downBound, "the first update of a watcher without rights", func(record) bool { return true })
	first := f.since(0)[0]
	if first.synced || first.size() != 0 {
		t.Errorf("first update of a watcher without rights: %s; want not synced, empty", first)
	}
	denied("the first Watch update's Err", first.err)
	// The other clients are not affected.
	ok2 := open(t, h)
	register(t, ok2, instFor(h, svc, "b", 9002))
	if got := lookupIDs(t, ok2, svc); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("Lookup by a client with rights = %v, want [b]", got)
	}
}

// testNoLeaksAfterFaults: registrations and watchers are open through
// pause/resume and stop/start cycles, more are made during the outage, then
// everything is closed: no goroutine is left.
//
// goleak's IgnoreCurrent tells goroutines apart by ID, and a server restart
// makes clients that outlive the test's own (the harness's admin client, a
// child process's waiter) replace their goroutines with new ones. So the
// leak check compares, per kind of goroutine (its entry function and the
// function that started it), how many there are with how many there were
// before the test's clients existed: a leak is a kind that grew.
func testNoLeaksAfterFaults(t *testing.T, h Harness) {
	warm := open(t, h)
	_ = lookupIDs(t, warm, service("warm"))
	before := countKinds(goroutineStacks())
	svc := service("leakfault")
	r1, err := h.MakeRegistry(ctxT(t), TTL)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := h.MakeRegistry(ctxT(t), TTL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r1.Close(); _ = r2.Close() }) // if the test fails early
	regs := []*registry.Registration{register(t, r1, instFor(h, svc, "a", 9001)), register(t, r1, instFor(h, svc, "b", 9002))}
	f := follow(t, r2, svc)
	idle, err := r2.Watch(ctxT(t), svc) // never read: Close must stop it
	if err != nil {
		t.Fatal(err)
	}
	_ = idle
	f.waitFresh(settle, "a", "b")
	var during []registry.Registry
	for _, stop := range []bool{false, true} {
		o := down(t, h, stop)
		f.waitStale(recover, true)
		r3, err := h.MakeRegistry(ctxT(t), TTL)
		if err != nil {
			t.Fatal(err)
		}
		during = append(during, r3)
		t.Cleanup(func() { _ = r3.Close() })
		if _, err := r3.Watch(ctxT(t), svc); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		if _, err := r3.Register(ctx, instFor(h, svc, "c", 9003)); err == nil {
			t.Errorf("Register while the server was %s succeeded", o.what())
		}
		cancel()
		o.end()
		f.waitFresh(recover, "a", "b")
		registeredAgain(t, r1, svc, regs, "a", "b")
	}
	f.stop()
	for _, r := range append([]registry.Registry{r1, r2}, during...) {
		if err := r.Close(); err != nil {
			t.Logf("Close: %v", err)
		}
	}
	var extra []goroutine
	deadline := time.Now().Add(settle)
	for {
		extra = grown(before, goroutineStacks())
		if len(extra) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(testutil.PollInterval) // polling interval, not synchronisation
	}
	if len(extra) > 0 {
		var b strings.Builder
		for _, g := range extra {
			b.WriteString(g.stack + "\n\n")
		}
		t.Fatalf("%d goroutines more than before the clients were made, %v after everything was closed:\n%s", len(extra), settle, b.String())
	}
}

// Packages whose goroutines belong to the harness's servers (a child
// process's waiter, an in-process test server, envtest, containers), not
// to the client under test.
var harnessPackages = []string{
	"github.com/rollcall-go/rollcall/internal/testserver",
	"sigs.k8s.io/controller-runtime/pkg/envtest",
	"sigs.k8s.io/controller-runtime/pkg/internal/testing",
	"github.com/testcontainers/testcontainers-go",
	"github.com/Shopify/toxiproxy",
	"go.etcd.io/etcd/server",
}

// goroutine is one goroutine's stack, and its kind: the function it runs
// and the one that started it, which stay the same for its whole life.
type goroutine struct {
	kind, stack string
	harness     bool // a function of harnessPackages is on its stack
}

// goroutineStacks returns every goroutine but the calling one.
func goroutineStacks() []goroutine {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []goroutine
	for i, block := range strings.Split(strings.TrimSpace(string(buf)), "\n\n") {
		if i == 0 {
			continue // the calling goroutine comes first
		}
		g := goroutine{stack: block}
		entry, creator := "", ""
		for _, line := range strings.Split(block, "\n")[1:] {
			if line == "" || strings.HasPrefix(line, "\t") || strings.HasPrefix(line, "...") {
				continue
			}
			if c, ok := strings.CutPrefix(line, "created by "); ok {
				creator, _, _ = strings.Cut(c, " in goroutine")
				break
			}
			fn := line
			if j := strings.LastIndex(fn, "("); j > 0 {
				fn = fn[:j]
			}
			entry = fn
			for _, p := range harnessPackages {
				if strings.HasPrefix(fn, p) {
					g.harness = true
				}
			}
		}
		g.kind = entry + " started by " + creator
		out = append(out, g)
	}
	return out
}

func countKinds(gs []goroutine) map[string]int {
	n := map[string]int{}
	for _, g := range gs {
		n[g.kind]++
	}
	return n
}

// grown returns the goroutines of the kinds there are more of now than in
// before, but the harness's.
func grown(before map[string]int, now []goroutine) []goroutine {
	seen := map[string]int{}
	var out []goroutine
	for _, g := range now {
		seen[g.kind]++
		if seen[g.kind] > before[g.kind] && !g.harness {
			out = append(out, g)
		}
	}
	return out
}
