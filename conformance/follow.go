package conformance

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

var waitFor = testutil.WaitFor

// record is what a follower keeps of one update.
type record struct {
	n                       int // position in the history
	at                      time.Time
	stale, synced           bool
	snapshot                time.Time // Update.Snapshot
	err                     error
	ids                     []string // Instances() of the update, sorted
	added, changed, removed []string
}

func (r record) size() int { return len(r.ids) }

func (r record) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "update #%d at %s: stale=%v synced=%v", r.n, r.at.Format("15:04:05.000"), r.stale, r.synced)
	if !r.snapshot.IsZero() {
		fmt.Fprintf(&b, " snapshot=%s", r.snapshot.Format("15:04:05.000"))
	}
	if r.err != nil {
		fmt.Fprintf(&b, " err=%q", r.err)
	}
	fmt.Fprintf(&b, " list(%d)=%s", len(r.ids), short(r.ids))
	for _, d := range []struct {
		sign string
		ids  []string
	}{{"+", r.added}, {"~", r.changed}, {"-", r.removed}} {
		if len(d.ids) > 0 {
			fmt.Fprintf(&b, " %s%s", d.sign, short(d.ids))
		}
	}
	return b.String()
}

func short(ids []string) string {
	if len(ids) <= 12 {
		return fmt.Sprint(ids)
	}
	return fmt.Sprintf("%v ... (%d more)", ids[:12], len(ids)-12)
}

// follower consumes a Watcher in the background and records every update.
// It checks each update as it arrives: the deltas must add up to the
// snapshot, no instance is added twice, changed or removed before it was
// added; an update that is not synced is stale and empty; a stale update
// says why. The first inconsistency is kept (later errors, including the
// one that ends the watch, never overwrite it) and check reports it.
type follower struct {
	t      *testing.T
	w      *registry.Watcher
	cancel context.CancelFunc
	wg     sync.WaitGroup
	hook   func(registry.Update) error // optional per-update check, run by loop

	mu       sync.Mutex
	cur      map[string]registry.Instance // built from the deltas
	snap     []registry.Instance          // Instances() of the last update
	history  []record
	bad      error // the first inconsistency seen
	end      error // why the watch loop ended
	stopping bool  // stop was called: the loop's end is expected
}

// follow watches service through r until the test ends.
func follow(t *testing.T, r registry.Registry, service string) *follower {
	t.Helper()
	return followWith(t, r, service, nil)
}

// followWith is follow with a check run on every update as it arrives;
// the first error it returns is kept as the follower's inconsistency.
func followWith(t *testing.T, r registry.Registry, service string, hook func(registry.Update) error) *follower {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w, err := r.Watch(ctx, service)
	if err != nil {
		cancel()
		t.Fatalf("Watch(%q): %v", service, err)
	}
	f := &follower{t: t, w: w, cancel: cancel, hook: hook, cur: map[string]registry.Instance{}}
	f.wg.Add(1)
	go f.loop(ctx)
	t.Cleanup(f.stop)
	return f
}

// fail records the first inconsistency; f.mu is held.
func (f *follower) fail(format string, args ...any) {
	if f.bad == nil {
		f.bad = fmt.Errorf(format, args...)
	}
}

func (f *follower) loop(ctx context.Context) {
	defer f.wg.Done()
	for {
		u, err := f.w.Next(ctx)
		if err != nil {
			f.mu.Lock()
			f.end = err
			f.mu.Unlock()
			return
		}
		var hookErr error
		if f.hook != nil {
			hookErr = f.hook(u)
		}
		snap := u.Instances()
		f.mu.Lock()
		n := len(f.history)
		rec := record{n: n, at: time.Now(), stale: u.Stale, synced: u.Synced, snapshot: u.Snapshot, err: u.Err, ids: make([]string, len(snap))}
		for i, in := range snap {
			rec.ids[i] = in.ID
		}
		if hookErr != nil {
			f.fail("update #%d: %v", n, hookErr)
		}
		for _, in := range u.Added {
			if _, dup := f.cur[in.ID]; dup {
				f.fail("update #%d: instance %s added twice", n, in.ID)
			}
			f.cur[in.ID] = in
			rec.added = append(rec.added, in.ID)
		}
		for _, in := range u.Changed {
			if _, ok := f.cur[in.ID]; !ok {
				f.fail("update #%d: instance %s changed before it was added", n, in.ID)
			}
			f.cur[in.ID] = in
			rec.changed = append(rec.changed, in.ID)
		}
		for _, in := range u.Removed {
			if _, ok := f.cur[in.ID]; !ok {
				f.fail("update #%d: instance %s removed but never added", n, in.ID)
			}
			delete(f.cur, in.ID)
			rec.removed = append(rec.removed, in.ID)
		}
		if !slices.Equal(rec.ids, keys(f.cur)) {
			f.fail("update #%d: snapshot %s, but the deltas add up to %s", n, short(rec.ids), short(keys(f.cur)))
		}
		if !u.Synced && (!u.Stale || len(snap) > 0) {
			f.fail("update #%d is not synced but stale=%v with %d instances: an update before the first list must be stale and empty", n, u.Stale, len(snap))
		}
		if !u.Synced && n > 0 && f.history[n-1].synced {
			f.fail("update #%d is not synced after a synced one", n)
		}
		if u.Stale && u.Err == nil {
			f.fail("update #%d is stale without an Err saying why", n)
		}
		if !u.Snapshot.IsZero() && !u.Stale {
			f.fail("update #%d comes from a snapshot but is not stale", n)
		}
		if u.Snapshot.IsZero() && n > 0 && !f.history[n-1].snapshot.IsZero() && u.Stale && !u.Synced {
			f.fail("update #%d lost the snapshot's list", n)
		}
		f.snap = snap
		f.history = append(f.history, rec)
		f.mu.Unlock()
	}
}

func (f *follower) stop() {
	f.mu.Lock()
	f.stopping = true
	f.mu.Unlock()
	f.cancel()
	f.w.Close()
	f.wg.Wait()
}

// check fails the test if an update was inconsistent, or if the watch ended
// before the test stopped it (a Watcher ends only on Close, its context or
// the registry's Close: an error never ends it).
func (f *follower) check() {
	f.t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.bad != nil {
		f.t.Fatalf("watcher of %s: %v\nhistory:\n%s", f.w.Service(), f.bad, f.historyLocked(0))
	}
	if f.end != nil && !f.stopping {
		f.t.Fatalf("watcher of %s ended before the test closed it: %v", f.w.Service(), f.end)
	}
}

// dump returns the records from mark on, one a line, for failure messages.
func (f *follower) dump(mark int) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.historyLocked(mark)
}

func (f *follower) historyLocked(mark int) string {
	var b strings.Builder
	from := max(mark, len(f.history)-40)
	if from > mark {
		fmt.Fprintf(&b, "  (%d earlier updates)\n", from-mark)
	}
	for _, rec := range f.history[from:] {
		b.WriteString("  " + rec.String() + "\n")
	}
	return b.String()
}

// ids returns the IDs in the latest snapshot, sorted.
func (f *follower) ids() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]string, 0, len(f.snap))
	for _, in := range f.snap {
		out = append(out, in.ID)
	}
	return out
}

func (f *follower) get(id string) (registry.Instance, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	in, ok := f.cur[id]
	return in, ok
}

func (f *follower) last() (record, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.history) == 0 {
		return record{}, false
	}
	return f.history[len(f.history)-1], true
}

func (f *follower) mark() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.history)
}

func (f *follower) since(mark int) []record {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.history[mark:])
}

// waitIDs waits until the snapshot holds exactly want.
func (f *follower) waitIDs(timeout time.Duration, want ...string) {
	f.t.Helper()
	slices.Sort(want)
	waitFor(f.t, timeout, fmt.Sprintf("watcher of %s to show %v", f.w.Service(), short(want)), func() bool {
		rec, ok := f.last()
		return ok && rec.synced && slices.Equal(rec.ids, want)
	})
	f.check()
}

// waitFresh waits until the latest update is synced, not stale, and holds
// exactly want.
func (f *follower) waitFresh(timeout time.Duration, want ...string) {
	f.t.Helper()
	slices.Sort(want)
	f.waitUntil(timeout, fmt.Sprintf("watcher of %s to be fresh with %v", f.w.Service(), short(want)), func(rec record) bool {
		return rec.synced && !rec.stale && slices.Equal(rec.ids, want)
	})
}

func (f *follower) waitStale(timeout time.Duration, stale bool) {
	f.t.Helper()
	f.waitUntil(timeout, fmt.Sprintf("watcher of %s to report stale=%v", f.w.Service(), stale), func(rec record) bool {
		return rec.stale == stale
	})
}

// waitUntil waits until the latest update satisfies cond; on timeout the
// failure shows the recent history.
func (f *follower) waitUntil(timeout time.Duration, what string, cond func(record) bool) {
	f.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if rec, ok := f.last(); ok && cond(rec) {
			f.check()
			return
		}
		if time.Now().After(deadline) {
			f.check()
			f.t.Fatalf("timed out after %v waiting for %s; history:\n%s", timeout, what, f.dump(0))
		}
		time.Sleep(testutil.PollInterval) // polling interval, not synchronisation
	}
}

// hold observes the watcher for d: every update from mark on (those already
// recorded and each one arriving during d) must pass check, and the test
// fails at the first that does not. It returns the mark after the last
// update seen.
func (f *follower) hold(d time.Duration, mark int, what string, check func(record) error) int {
	f.t.Helper()
	end := time.Now().Add(d)
	for {
		recs := f.since(mark)
		for _, rec := range recs {
			if err := check(rec); err != nil {
				f.t.Fatalf("%s: %s: %v\nhistory:\n%s", what, rec, err, f.dump(0))
			}
		}
		mark += len(recs)
		f.check()
		if time.Now().After(end) {
			return mark
		}
		time.Sleep(testutil.PollInterval) // polling interval, not synchronisation
	}
}

// every applies check to every update from mark on that is recorded now.
func (f *follower) every(mark int, what string, check func(record) error) {
	f.t.Helper()
	f.hold(0, mark, what, check)
}

func keys(m map[string]registry.Instance) []string {
	return slices.Sorted(maps.Keys(m))
}

// exactly is a check that every update lists exactly want.
func exactly(want ...string) func(record) error {
	slices.Sort(want)
	return func(rec record) error {
		if !slices.Equal(rec.ids, want) {
			return fmt.Errorf("the list is %s, want exactly %s", short(rec.ids), short(want))
		}
		return nil
	}
}

// isClosed reports whether err says a closed Watcher, Registry or
// Registration.
func isClosed(err error) bool { return errors.Is(err, registry.ErrClosed) }
