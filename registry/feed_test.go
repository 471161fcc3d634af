package registry_test

import (
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/backends/memory"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

// nextIDs returns the list after w's next update.
func nextIDs(t *testing.T, w *registry.Watcher) []string {
	t.Helper()
	u, err := w.Next(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	return ids(u.Instances())
}

// The Watchers of one service in one Registry share one backend watch (100
// gRPC ClientConns on a service were 100 etcd watchers): each still gets
// every change, a Watcher that starts late gets the list at once, closing
// some leaves the others going, and the backend watch ends with the last
// one. Before, the server counted 100 watches.
func TestWatchersOfAServiceShareOneBackendWatch(t *testing.T) {
	srv := memory.NewServer()
	r := memory.New(srv, &memory.Options{TTL: time.Hour})
	t.Cleanup(func() { r.Close() })
	ga, err := r.Register(testCtx(t), registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	const n = 100
	ws := make([]*registry.Watcher, n)
	for i := range ws {
		if ws[i], err = r.Watch(testCtx(t), "s"); err != nil {
			t.Fatal(err)
		}
		defer ws[i].Close()
	}
	for i, w := range ws {
		if got := nextIDs(t, w); !slices.Equal(got, []string{"a"}) {
			t.Fatalf("watcher %d: first list %v, want [a]", i, got)
		}
	}
	other, err := r.Watch(testCtx(t), "t")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if got := nextIDs(t, other); len(got) != 0 {
		t.Fatalf("service t: %v", got)
	}
	if got := srv.Watches(); got != 2 {
		t.Fatalf("%d backend watches for %d Watchers of s and 1 of t, want 2", got, n)
	}
	if _, err := r.Register(testCtx(t), registry.Instance{Service: "s", ID: "b", Addr: "127.0.0.1:2"}); err != nil {
		t.Fatal(err)
	}
	for i, w := range ws {
		if got := nextIDs(t, w); !slices.Equal(got, []string{"a", "b"}) {
			t.Fatalf("watcher %d after b registered: %v", i, got)
		}
	}
	late, err := r.Watch(testCtx(t), "s")
	if err != nil {
		t.Fatal(err)
	}
	defer late.Close()
	if got := nextIDs(t, late); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("late watcher: first list %v, want [a b]", got)
	}
	for _, w := range ws {
		w.Close()
	}
	if err := ga.Deregister(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if got := nextIDs(t, late); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("late watcher after the others closed and a was deregistered: %v", got)
	}
	late.Close()
	testutil.WaitFor(t, 10*time.Second, "the backend watch of s to end with its last Watcher", func() bool { return srv.Watches() == 1 })
	again, err := r.Watch(testCtx(t), "s")
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if got := nextIDs(t, again); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("a Watcher after all closed: %v, want [b]", got)
	}
}

// StaleChanged and Stale follow the registry without Next being called: the
// channel closes when the server is paused, and again once the watcher is
// fresh after it resumes.
func TestStaleChangedWithoutNext(t *testing.T) {
	srv, r := pausedRegistry(t, 200*time.Millisecond)
	if _, err := r.Register(testCtx(t), registry.Instance{Service: "s", ID: "a", Addr: "127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
	w, err := r.Watch(testCtx(t), "s")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if got := nextIDs(t, w); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("first list %v", got)
	}
	if stale, err := w.Stale(); stale || err != nil {
		t.Fatalf("Stale() = %v, %v on a healthy server", stale, err)
	}
	ch := w.StaleChanged()
	srv.Pause()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatal("StaleChanged not closed within 10s of the pause")
	}
	stale, err := w.Stale()
	if !stale || !errors.Is(err, registry.ErrUnavailable) {
		t.Fatalf("Stale() = %v, %v while paused, want true, ErrUnavailable", stale, err)
	}
	ch = w.StaleChanged()
	srv.Resume()
	select {
	case <-ch:
	case <-time.After(20 * time.Second):
		t.Fatal("StaleChanged not closed within 20s of the resume")
	}
	if stale, err := w.Stale(); stale || err != nil {
		t.Fatalf("Stale() = %v, %v after the resume", stale, err)
	}
}

// Watchers that read at different paces over many changes (the feed's
// history is replaced several times meanwhile) each get updates whose
// Added, Changed and Removed are exactly the difference from what they
// delivered before, whose Instances() is that list, and end with the
// registry's list.
func TestWatchersAtDifferentPacesGetExactDiffs(t *testing.T) {
	srv := memory.NewServer()
	writer := memory.New(srv, &memory.Options{TTL: time.Hour})
	t.Cleanup(func() { writer.Close() })
	reader := memory.New(srv, &memory.Options{TTL: time.Hour})
	t.Cleanup(func() { reader.Close() })
	ctx := testCtx(t)

	type model map[string]registry.Instance
	check := func(name string, m model, u registry.Update) {
		t.Helper()
		for _, in := range u.Removed {
			if old, ok := m[in.ID]; !ok || !old.Equal(in) {
				t.Fatalf("%s: removed %v, delivered before as %v (%v)", name, in, old, ok)
			}
			delete(m, in.ID)
		}
		for _, in := range u.Changed {
			if old, ok := m[in.ID]; !ok || old.Equal(in) {
				t.Fatalf("%s: changed %v, delivered before as %v (%v)", name, in, old, ok)
			}
			m[in.ID] = in
		}
		for _, in := range u.Added {
			if old, ok := m[in.ID]; ok {
				t.Fatalf("%s: added %v, delivered before as %v", name, in, old)
			}
			m[in.ID] = in
		}
		got := u.Instances()
		if len(got) != len(m) {
			t.Fatalf("%s: Instances() has %d, the diffs make %d", name, len(got), len(m))
		}
		for _, in := range got {
			if !m[in.ID].Equal(in) {
				t.Fatalf("%s: Instances() has %v, the diffs make %v", name, in, m[in.ID])
			}
		}
	}
	paces := []int{1, 37, 1000} // read after every change, every 37th, at the end
	ws := make([]*registry.Watcher, len(paces))
	models := make([]model, len(paces))
	for i := range ws {
		w, err := reader.Watch(ctx, "s")
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		u, err := w.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		ws[i], models[i] = w, model{}
		check("first", models[i], u)
	}
	// drain reads w until its model is the writer's list.
	drain := func(i int) {
		t.Helper()
		want, err := writer.Lookup(ctx, "s")
		if err != nil {
			t.Fatal(err)
		}
		exact := func() bool {
			if len(models[i]) != len(want) {
				return false
			}
			for _, in := range want {
				if !models[i][in.ID].Equal(in) {
					return false
				}
			}
			return true
		}
		for !exact() {
			u, err := ws[i].Next(ctx)
			if err != nil {
				t.Fatal(err)
			}
			check("watcher "+string(rune('A'+i)), models[i], u)
		}
	}
	regs := map[string]*registry.Registration{}
	for op := range 600 {
		id := string(rune('a' + op*7%26))
		in := registry.Instance{Service: "s", ID: id, Addr: "127.0.0.1:1", Metadata: map[string]string{"op": string(rune('0' + op%10))}}
		switch g := regs[id]; {
		case g == nil:
			g, err := writer.Register(ctx, in)
			if err != nil {
				t.Fatal(err)
			}
			regs[id] = g
		case op%3 == 0:
			if err := g.Deregister(ctx); err != nil {
				t.Fatal(err)
			}
			delete(regs, id)
		default:
			if err := g.Update(ctx, in); err != nil {
				t.Fatal(err)
			}
		}
		for i, p := range paces {
			if (op+1)%p == 0 {
				drain(i)
			}
		}
	}
	for i := range paces {
		drain(i)
	}
}
