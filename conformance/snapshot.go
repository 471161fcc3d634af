package conformance

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/registry"
)

// testColdStartFromSnapshot: a client that ran with snapshot=DIR wrote the
// list it watched; the server stops; a new client (a restarted process)
// opened by the same URL gets that list at once, stale and marked as a
// snapshot, instead of nothing; once the server is back its list is the
// registry's, exact, and fresh.
func testColdStartFromSnapshot(t *testing.T, h Harness) {
	good, _ := h.URLs()
	if good == "" {
		t.Skip("the harness gives no URL to open a registry by")
	}
	sep := "?"
	if strings.Contains(good, "?") {
		sep = "&"
	}
	url := good + sep + "snapshot=" + t.TempDir() + "&snapshot_wait=500ms"
	openURL := func() registry.Registry {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), downBound)
		defer cancel()
		r, err := registry.Open(ctx, url)
		if err != nil {
			t.Fatalf("Open(%q): %v", registry.Redact(url), err)
		}
		t.Cleanup(func() { _ = r.Close() })
		return r
	}
	svc := service("coldstart")
	r0 := open(t, h)
	regs := []*registry.Registration{register(t, r0, instFor(h, svc, "a", 9001)), register(t, r0, instFor(h, svc, "b", 9002))}

	// A first client follows the service until its list is exact, then
	// closes: its snapshot holds a and b.
	first := openURL()
	f1 := follow(t, first, svc)
	f1.waitFresh(settle, "a", "b")
	f1.stop()
	if err := first.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	o := down(t, h, true)
	start := time.Now()
	f := follow(t, openURL(), svc)
	f.waitUntil(downBound, "the snapshot's list while the server is stopped", func(rec record) bool {
		return rec.synced && !rec.snapshot.IsZero()
	})
	served := f.since(0)
	got := served[len(served)-1]
	t.Logf("snapshot served %v after Watch: %s", time.Since(start).Round(time.Millisecond), got)
	if !got.stale || !slices.Equal(got.ids, []string{"a", "b"}) {
		t.Fatalf("served %s; want the snapshot's [a b], stale", got)
	}
	for _, rec := range served {
		if rec.synced && rec.snapshot.IsZero() {
			t.Fatalf("%s: a synced update not from the snapshot while the server is stopped", rec)
		}
	}
	o.end()
	f.waitUntil(recover, "the registry's own list, fresh", func(rec record) bool {
		return !rec.stale && rec.snapshot.IsZero() && slices.Equal(rec.ids, []string{"a", "b"})
	})
	registeredAgain(t, r0, svc, regs, "a", "b")
	f.check()
}
