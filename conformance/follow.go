package conformance

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

var waitFor = testutil.WaitFor

// record is what a follower keeps of one update.
type record struct {
	at                      time.Time
	stale, synced           bool
	size                    int
	added, changed, removed []string
}

// follower consumes a Watcher in the background and records every update.
type follower struct {
	t      *testing.T
	w      *registry.Watcher
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	cur     map[string]registry.Instance // built from the deltas
	snap    []registry.Instance          // Instances() of the last update
	history []record
	err     error
}

func follow(t *testing.T, r registry.Registry, service string) *follower {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w, err := r.Watch(ctx, service)
	if err != nil {
		cancel()
		t.Fatalf("Watch(%q): %v", service, err)
	}
	f := &follower{t: t, w: w, cancel: cancel, cur: map[string]registry.Instance{}}
	f.wg.Add(1)
	go f.loop(ctx)
	t.Cleanup(f.stop)
	return f
}

func (f *follower) loop(ctx context.Context) {
	defer f.wg.Done()
	for {
		u, err := f.w.Next(ctx)
		if err != nil {
			f.mu.Lock()
			f.err = err
			f.mu.Unlock()
			return
		}
		snap := u.Instances()
		f.mu.Lock()
		rec := record{at: time.Now(), stale: u.Stale, synced: u.Synced, size: len(snap)}
		for _, in := range u.Added {
			if _, dup := f.cur[in.ID]; dup {
				f.err = fmt.Errorf("instance %s added twice", in.ID)
			}
			f.cur[in.ID] = in
			rec.added = append(rec.added, in.ID)
		}
		for _, in := range u.Changed {
			if _, ok := f.cur[in.ID]; !ok {
				f.err = fmt.Errorf("instance %s changed before it was added", in.ID)
			}
			f.cur[in.ID] = in
			rec.changed = append(rec.changed, in.ID)
		}
		for _, in := range u.Removed {
			if _, ok := f.cur[in.ID]; !ok {
				f.err = fmt.Errorf("instance %s removed but never added", in.ID)
			}
			delete(f.cur, in.ID)
			rec.removed = append(rec.removed, in.ID)
		}
		if len(snap) != len(f.cur) {
			f.err = fmt.Errorf("snapshot has %d instances, deltas add up to %d", len(snap), len(f.cur))
		}
		f.snap = snap
		f.history = append(f.history, rec)
		f.mu.Unlock()
	}
}

func (f *follower) stop() {
	f.cancel()
	f.w.Close()
	f.wg.Wait()
}

// check fails the test if the deltas were inconsistent.
func (f *follower) check() {
	f.t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil && f.err != context.Canceled {
		if _, closed := f.err.(*registry.Error); !closed {
			f.t.Fatalf("watcher: %v", f.err)
		}
	}
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
	waitFor(f.t, timeout, fmt.Sprintf("watcher of %s to show %v", f.w.Service(), want), func() bool {
		rec, ok := f.last()
		return ok && rec.synced && slices.Equal(f.ids(), want)
	})
	f.check()
}

func (f *follower) waitStale(timeout time.Duration, stale bool) {
	f.t.Helper()
	waitFor(f.t, timeout, fmt.Sprintf("watcher of %s to report stale=%v", f.w.Service(), stale), func() bool {
		rec, ok := f.last()
		return ok && rec.stale == stale
	})
}

func keys(m map[string]registry.Instance) []string {
	return slices.Sorted(maps.Keys(m))
}
