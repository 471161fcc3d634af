package etcd_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

// TestFrozenMemberLosesNothing freezes each member of a 3-member etcd in
// turn (SIGSTOP, for more than twice the TTL) while the other two keep
// quorum, with the URL's default settings: a registrar's instances are
// never lost (whichever member carries its lease's keepalives), a watcher
// on another Registry never delivers a removal of them, a Lookup every
// 300 ms on the watcher's Registry with a 2 s deadline always answers with
// them all, and a registration and a deregistration made during the freeze
// reach the watcher (within a generous bound: the freeze is 12 s). While
// the frozen member was the leader, Lookups begun before the others
// elected a new one may fail (no member can answer a linearizable read).
func TestFrozenMemberLosesNothing(t *testing.T) {
	c := testserver.StartEtcdCluster(t, 3)
	url := "etcd://" + strings.Join(c.Endpoints(), ",") + "/?ttl=5s"
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	open := func() registry.Registry {
		r, err := registry.Open(ctx, url)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		return r
	}
	registrar, client := open(), open()
	const service, n = "frozen", 10
	var stable []string
	for i := range n {
		id := fmt.Sprintf("s%d", i)
		stable = append(stable, id)
		if _, err := registrar.Register(ctx, registry.Instance{Service: service, ID: id, Addr: fmt.Sprintf("127.0.0.1:%d", 7000+i)}); err != nil {
			t.Fatal(err)
		}
	}
	w, err := client.Watch(ctx, service)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	rec := record(t, w)
	lastHas := func(want []string, not string) func() bool {
		return func() bool {
			u, ok := rec.last()
			return ok && !u.Stale && containsAll(ids(u), want) && (not == "" || !slices.Contains(ids(u), not))
		}
	}
	testutil.WaitFor(t, 20*time.Second, "the watcher to list the instances", lastHas(stable, ""))

	const freeze = 12 * time.Second // more than twice the TTL
	for i, m := range c.Members {
		leader, err := c.Leader()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("round %d: freezing member %d (leader: %d)", i, i, leader)
		m.Pause()
		start := time.Now()
		// While the cluster elects a new leader, no member can answer a
		// linearizable read: a Lookup begun before that may fail. Every
		// other one must answer.
		var elected atomic.Int64 // when a new leader was found, as UnixNano
		if leader != i {
			elected.Store(start.UnixNano())
		} else {
			go func() {
				for time.Since(start) < freeze {
					if l, err := c.Leader(); err == nil && l != i {
						elected.Store(time.Now().UnixNano())
						return
					}
					time.Sleep(50 * time.Millisecond) // polling pace
				}
			}()
		}
		// Lookups every 300 ms for the whole freeze, as application
		// traffic on the watcher's Registry would make.
		lookups := make(chan error, 1)
		go func() {
			var failed, tolerated []string
			count := 0
			for time.Since(start) < freeze {
				count++
				begun := time.Now()
				lctx, lcancel := context.WithTimeout(ctx, 2*time.Second)
				list, err := client.Lookup(lctx, service)
				lcancel()
				var got []string
				for _, in := range list {
					got = append(got, in.ID)
				}
				switch {
				case err != nil && (elected.Load() == 0 || begun.UnixNano() < elected.Load()):
					tolerated = append(tolerated, fmt.Sprintf("+%v: %v", time.Since(start).Round(time.Millisecond), err))
				case err != nil:
					failed = append(failed, fmt.Sprintf("+%v: %v", time.Since(start).Round(time.Millisecond), err))
				case !containsAll(got, stable):
					failed = append(failed, fmt.Sprintf("+%v: listed %v", time.Since(start).Round(time.Millisecond), got))
				}
				time.Sleep(300 * time.Millisecond) // the traffic's pace
			}
			if len(tolerated) > 0 {
				t.Logf("round %d: %d Lookups begun before a new leader was elected failed: %s", i, len(tolerated), strings.Join(tolerated, "; "))
			}
			if len(failed) > 0 {
				lookups <- fmt.Errorf("%d of %d Lookups failed or lacked an instance: %s", len(failed), count, strings.Join(failed, "; "))
				return
			}
			lookups <- nil
		}()
		// A change made during the freeze, once the others have a leader,
		// reaches the watcher.
		testutil.WaitFor(t, freeze, "a leader among the members not frozen", func() bool { return elected.Load() != 0 })
		extra := fmt.Sprintf("extra%d", i)
		rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
		g, err := registrar.Register(rctx, registry.Instance{Service: service, ID: extra, Addr: fmt.Sprintf("127.0.0.1:%d", 7100+i)})
		rcancel()
		if err != nil {
			t.Errorf("round %d: Register during the freeze: %v", i, err)
		} else {
			testutil.WaitFor(t, freeze, fmt.Sprintf("round %d: the registration made during the freeze to reach the watcher", i), lastHas(append([]string{extra}, stable...), ""))
			dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
			if err := g.Deregister(dctx); err != nil {
				t.Errorf("round %d: Deregister during the freeze: %v", i, err)
			}
			dcancel()
			testutil.WaitFor(t, freeze, fmt.Sprintf("round %d: the deregistration made during the freeze to reach the watcher", i), lastHas(stable, extra))
		}
		if err := <-lookups; err != nil {
			t.Errorf("round %d: %v", i, err)
		}
		m.Resume()
		c.WaitHealthy()
		for _, u := range rec.all() {
			if !containsAll(ids(u), stable) {
				t.Fatalf("round %d: the watcher delivered an update without a live instance:\n%s", i, describe(rec.all()))
			}
		}
		t.Logf("round %d: %d updates so far", i, len(rec.all()))
	}
	t.Logf("updates:\n%s", describe(rec.all()))
	testutil.WaitFor(t, 20*time.Second, "the watcher to end fresh with the instances", lastHas(stable, ""))
}

func containsAll(got, want []string) bool {
	for _, id := range want {
		if !slices.Contains(got, id) {
			return false
		}
	}
	return true
}
