package conformance

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/rollcall-go/rollcall/registry"
)

// TTL is the lease TTL the suite registers with. Short, so that expiry
// tests are quick; the deadlines below are generous multiples of it.
const TTL = 2 * time.Second

const (
	// settle bounds how long a change may take to reach a watcher.
	settle = 10 * time.Second
	// expiry bounds how long a crashed registrar's instance may stay.
	expiry = 5*TTL + 10*time.Second
	// recover bounds re-registration and watch resync after a fault.
	recover = 30 * time.Second
)

// RunConformanceTests runs the suite; each property is its own subtest,
// named after the contract it checks, with a fresh Harness.
func RunConformanceTests(t *testing.T, newHarness HarnessMaker) {
	tests := []struct {
		name string
		fn   func(*testing.T, Harness)
	}{
		{"RegisterIsVisibleToLookupAndWatch", testRegisterVisible},
		{"DeregisterRemovesAtOnce", testDeregister},
		{"LeaseExpiresAfterCrash", testLeaseExpiresAfterCrash},
		{"KeepaliveHoldsAcrossManyTTLs", testKeepalive},
		{"WatchDeliversAddUpdateRemoveInOrder", testWatchOrder},
		{"WatchBurstLosesNothing", testWatchBurst},
		{"WatchDeliversAuthoritativeEmpty", testAuthoritativeEmpty},
		{"WatchKeepsLastListWhileServerPaused", func(t *testing.T, h Harness) { testFreeze(t, h, false) }},
		{"WatchKeepsLastListWhileServerStopped", func(t *testing.T, h Harness) { testFreeze(t, h, true) }},
		{"ReregistersAfterLeaseRevoked", testReregisterRevoked},
		{"ReregistersAfterEntryDeleted", testReregisterDeleted},
		{"ReregistersAfterServerRestartWithWipedData", testReregisterWiped},
		{"ServiceNamesArePrefixIsolated", testPrefixIsolation},
		{"ServicesListsServicesWithInstances", testServices},
		{"InvalidInstancesAreRejected", testInvalidInstances},
		{"InvalidURLsAreRejected", testInvalidURLs},
		{"GarbageInRegistryIsSkipped", testGarbage},
		{"UpdateChangesMetadata", testUpdate},
		{"CloseAndDeregisterAreIdempotent", testIdempotent},
		{"NoGoroutineLeaks", testNoLeaks},
		// Fault paths: every backend keeps the guarantees through them.
		{"WatchSurvivesOutageLongerThanTTL", testOutageLongerThanTTL},
		{"IdleWatcherStaysFresh", testIdleWatcherStaysFresh},
		{"WatchStartedWhileServerDownIsStale", testWatchStartedWhileDown},
		{"ColdStartWhileServerDownServesTheSnapshot", testColdStartFromSnapshot},
		{"CallsFailFastWhileServerDown", testCallsFailFast},
		{"DeregisterDuringOutageCompletesWhenServerReturns", testDeregisterDuringOutage},
		{"CloseIsBoundedWhileServerPaused", testCloseBoundedWhilePaused},
		{"DuplicateIDIsRefusedOrStable", testDuplicateID},
		{"BurstOfAddsUpdatesAndRemovesLosesNothing", testBurstMixed},
		{"FreezeNeverShrinks", testFreezeNeverShrinks},
		{"RegistriesWithDifferentPrefixesAreIsolated", testNamespaceIsolation},
		{"PermissionDeniedIsReported", testPermissionDenied},
		{"NoGoroutineLeaksAfterFaults", testNoLeaksAfterFaults},
	}
	// Clustered registries (harnesses that are a ClusterMaker).
	for _, ct := range clusterTests {
		tests = append(tests, struct {
			name string
			fn   func(*testing.T, Harness)
		}{ct.name, func(t *testing.T, h Harness) { runCluster(t, h, ct.fn) }})
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
			defer cancel()
			watchdog := time.AfterFunc(4*time.Minute, func() {
				buf := make([]byte, 1<<20)
				n := runtime.Stack(buf, true)
				panic(fmt.Sprintf("conformance: %s did not finish in 4 minutes\n%s", t.Name(), buf[:n]))
			})
			defer watchdog.Stop()
			h, err := newHarness(ctx, t)
			if err != nil {
				t.Fatalf("making harness: %v", err)
			}
			defer h.Close()
			tc.fn(t, h)
		})
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// open makes a registry client that the test closes at its end.
func open(t *testing.T, h Harness) registry.Registry {
	t.Helper()
	r, err := h.MakeRegistry(ctxT(t), TTL)
	if err != nil {
		t.Fatalf("MakeRegistry: %v", err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return r
}

var svcSeq struct {
	sync.Mutex
	n int
}

// service returns a service name not used before in this process.
func service(base string) string {
	svcSeq.Lock()
	defer svcSeq.Unlock()
	svcSeq.n++
	return fmt.Sprintf("%s-%d-%d", base, time.Now().UnixNano()%1_000_000, svcSeq.n)
}

func inst(svc, id string, port int) registry.Instance {
	return registry.Instance{Service: svc, ID: id, Addr: fmt.Sprintf("127.0.0.1:%d", port),
		Metadata: map[string]string{registry.MetaZone: "z1", registry.MetaVersion: "v1", registry.MetaWeight: "3", "team": "core"}}
}

// instFor is inst for h's registry: without metadata if it stores an
// address only (AddressOnly).
func instFor(h Harness, svc, id string, port int) registry.Instance {
	in := inst(svc, id, port)
	if addressOnly(h) {
		in.Metadata = nil
	}
	return in
}

// changed returns in with something changed that h's registry stores: the
// version, or the address (port+10) if it stores an address only.
func changed(h Harness, in registry.Instance) registry.Instance {
	in = in.Clone()
	if addressOnly(h) {
		host, port, _ := net.SplitHostPort(in.Addr)
		p, _ := strconv.Atoi(port)
		in.Addr = net.JoinHostPort(host, strconv.Itoa(p+10))
		return in
	}
	in.Metadata[registry.MetaVersion] = "v2"
	return in
}

func register(t *testing.T, r registry.Registry, in registry.Instance) *registry.Registration {
	t.Helper()
	reg, err := r.Register(ctxT(t), in)
	if err != nil {
		t.Fatalf("Register(%v): %v", in, err)
	}
	return reg
}

func lookupIDs(t *testing.T, r registry.Registry, svc string) []string {
	t.Helper()
	list, err := r.Lookup(ctxT(t), svc)
	if err != nil {
		t.Fatalf("Lookup(%q): %v", svc, err)
	}
	ids := make([]string, len(list))
	for i, in := range list {
		ids[i] = in.ID
	}
	return ids
}

func testRegisterVisible(t *testing.T, h Harness) {
	r := open(t, h)
	svc := service("visible")
	want := instFor(h, svc, "a", 9001)
	register(t, r, want)
	// Register returns once the instance is visible.
	list, err := r.Lookup(ctxT(t), svc)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || !list[0].Equal(want) {
		t.Fatalf("Lookup = %v, want [%v]", list, want)
	}
	if w := list[0].Weight(); w != 3 && !addressOnly(h) {
		t.Errorf("Weight() = %d, want 3", w)
	}
	// Another client sees it too, through Lookup and Watch.
	r2 := open(t, h)
	if got := lookupIDs(t, r2, svc); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("second client Lookup = %v", got)
	}
	f := follow(t, r2, svc)
	f.waitIDs(settle, "a")
	if got, _ := f.get("a"); !got.Equal(want) {
		t.Fatalf("watched instance = %v, want %v", got, want)
	}
	if err := r.Ping(ctxT(t)); err != nil {
		t.Fatalf("Ping: %v", err)
	}
}

func testDeregister(t *testing.T, h Harness) {
	r := open(t, h)
	svc := service("dereg")
	f := follow(t, open(t, h), svc)
	a := register(t, r, instFor(h, svc, "a", 9001))
	register(t, r, instFor(h, svc, "b", 9002))
	f.waitIDs(settle, "a", "b")
	start := time.Now()
	if err := a.Deregister(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if got := lookupIDs(t, r, svc); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("Lookup after Deregister = %v, want [b]", got)
	}
	f.waitIDs(settle, "b")
	if d := time.Since(start); d >= TTL {
		t.Fatalf("removal took %v, as long as a TTL: Deregister must withdraw at once", d)
	}
	if a.Status().State != registry.Deregistered {
		t.Fatalf("status = %v", a.Status())
	}
}

func testLeaseExpiresAfterCrash(t *testing.T, h Harness) {
	svc := service("crash")
	f := follow(t, open(t, h), svc)
	survivor := open(t, h)
	register(t, survivor, instFor(h, svc, "alive", 9001))
	r, err := h.MakeRegistry(ctxT(t), TTL)
	if err != nil {
		t.Fatal(err)
	}
	register(t, r, instFor(h, svc, "crashed", 9002))
	f.waitIDs(settle, "alive", "crashed")
	skipIfUnsupported(t, h.Crash(r))
	f.waitIDs(expiry, "alive")
	if got := lookupIDs(t, survivor, svc); !slices.Equal(got, []string{"alive"}) {
		t.Fatalf("Lookup after expiry = %v", got)
	}
}

func testKeepalive(t *testing.T, h Harness) {
	r := open(t, h)
	svc := service("keep")
	f := follow(t, open(t, h), svc)
	reg := register(t, r, instFor(h, svc, "a", 9001))
	f.waitIDs(settle, "a")
	mark := f.mark()
	// Observe for many TTLs: the instance must never go away.
	end := time.Now().Add(6 * TTL)
	for time.Now().Before(end) {
		if got := lookupIDs(t, r, svc); !slices.Equal(got, []string{"a"}) {
			t.Fatalf("instance missing after %v: %v", time.Until(end), got)
		}
		time.Sleep(TTL / 4) // sampling interval over the observed span
	}
	for _, rec := range f.since(mark) {
		if len(rec.removed) > 0 {
			t.Fatalf("watcher saw %v removed while the registrar was alive", rec.removed)
		}
	}
	if s := reg.Status(); s.State != registry.Registered || s.Reregistrations != 0 {
		t.Fatalf("status after %v: %+v; want registered with no re-registrations", 6*TTL, s)
	}
}

func testWatchOrder(t *testing.T, h Harness) {
	r := open(t, h)
	svc := service("order")
	f := follow(t, open(t, h), svc)
	f.waitIDs(settle) // empty first snapshot
	in := instFor(h, svc, "a", 9001)
	reg := register(t, r, in)
	f.waitIDs(settle, "a")
	in = changed(h, in)
	if err := reg.Update(ctxT(t), in); err != nil {
		t.Fatal(err)
	}
	waitFor(t, settle, "the update to reach the watcher", func() bool {
		got, ok := f.get("a")
		return ok && got.Equal(in)
	})
	if err := reg.Deregister(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	f.waitIDs(settle)
	f.check()
	var seq []string
	for _, rec := range f.since(0) {
		for range rec.added {
			seq = append(seq, "add")
		}
		for range rec.changed {
			seq = append(seq, "change")
		}
		for range rec.removed {
			seq = append(seq, "remove")
		}
	}
	if !slices.Equal(seq, []string{"add", "change", "remove"}) {
		t.Fatalf("watcher saw %v, want [add change remove]", seq)
	}
}

func testWatchBurst(t *testing.T, h Harness) {
	const n = 500
	svc := service("burst")
	f := follow(t, open(t, h), svc)
	f.waitIDs(settle)
	r := open(t, h)
	var want []string
	for i := range n {
		want = append(want, fmt.Sprintf("i%04d", i))
	}
	errs := make(chan error, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i, id := range want {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			_, err := r.Register(ctxT(t), instFor(h, svc, id, 10000+i))
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	f.waitIDs(recover, want...)
	f.check()
	total := 0
	for _, rec := range f.since(0) {
		total += len(rec.added)
		if len(rec.removed) > 0 {
			t.Fatalf("burst of registrations produced removals %v", rec.removed)
		}
	}
	if total != n {
		t.Fatalf("watcher saw %d additions, want %d", total, n)
	}
	if got := lookupIDs(t, r, svc); !slices.Equal(got, want) {
		t.Fatalf("Lookup has %d instances, want %d", len(got), n)
	}
}

func testAuthoritativeEmpty(t *testing.T, h Harness) {
	r := open(t, h)
	svc := service("empty")
	f := follow(t, r, svc)
	waitFor(t, settle, "first snapshot", func() bool { rec, ok := f.last(); return ok && rec.synced })
	if rec, _ := f.last(); rec.stale || rec.size() != 0 {
		t.Fatalf("first update of an unknown service: %+v, want synced, not stale, empty", rec)
	}
	reg := register(t, r, instFor(h, svc, "a", 9001))
	f.waitIDs(settle, "a")
	if err := reg.Deregister(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	f.waitIDs(settle)
	if rec, _ := f.last(); rec.stale {
		t.Fatalf("empty list delivered as stale: %+v", rec)
	}
}

// testFreeze: while the server is down the watcher keeps its list, says
// stale, and resyncs when the server is back; registrations come back.
// Every update is checked: none during the outage shrinks the list, no
// stale one after it does.
func testFreeze(t *testing.T, h Harness, stop bool) {
	svc := service("freeze")
	r := open(t, h)
	f := follow(t, open(t, h), svc)
	regs := []*registry.Registration{
		register(t, r, instFor(h, svc, "a", 9001)),
		register(t, r, instFor(h, svc, "b", 9002)),
	}
	f.waitIDs(settle, "a", "b")
	mark := f.mark()
	o := down(t, h, stop)
	f.waitStale(recover, true)
	if _, err := r.Lookup(shortCtx(t), svc); err == nil {
		t.Errorf("Lookup succeeded while the server was down")
	}
	// Stay down past the TTL: every update meanwhile keeps both instances.
	f.hold(2*TTL, mark, "while the server was "+o.what(), func(rec record) error {
		if len(rec.removed) > 0 || !slices.Equal(rec.ids, []string{"a", "b"}) {
			return errors.New("the list changed during the outage, want a and b kept")
		}
		return nil
	})
	o.end()
	f.waitStale(recover, false)
	f.waitIDs(recover, "a", "b")
	f.every(mark, "after the outage", func(rec record) error {
		if rec.stale && (len(rec.removed) > 0 || rec.size() < 2) {
			return errors.New("a stale update shrank the list")
		}
		return nil
	})
	registeredAgain(t, r, svc, regs, "a", "b")
}

func shortCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func lookupIDsQuiet(r registry.Registry, svc string) []string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	list, err := r.Lookup(ctx, svc)
	if err != nil {
		return nil
	}
	ids := make([]string, len(list))
	for i, in := range list {
		ids[i] = in.ID
	}
	return ids
}

func testReregisterRevoked(t *testing.T, h Harness) {
	r := open(t, h)
	svc := service("revoked")
	reg := register(t, r, instFor(h, svc, "a", 9001))
	f := follow(t, open(t, h), svc)
	f.waitIDs(settle, "a")
	skipIfUnsupported(t, h.RevokeLeases(ctxT(t)))
	waitFor(t, recover, "re-registration after the lease was revoked", func() bool {
		return reg.Status().Reregistrations >= 1 && slices.Equal(lookupIDsQuiet(r, svc), []string{"a"})
	})
	f.waitIDs(recover, "a")
}

func testReregisterDeleted(t *testing.T, h Harness) {
	r := open(t, h)
	svc := service("deleted")
	reg := register(t, r, instFor(h, svc, "a", 9001))
	register(t, r, instFor(h, svc, "b", 9002))
	skipIfUnsupported(t, h.DeleteInstance(ctxT(t), svc, "a"))
	waitFor(t, recover, "re-registration after the entry was deleted", func() bool {
		return reg.Status().Reregistrations >= 1 && slices.Equal(lookupIDsQuiet(r, svc), []string{"a", "b"})
	})
}

func testReregisterWiped(t *testing.T, h Harness) {
	r := open(t, h)
	svc := service("wiped")
	regs := []*registry.Registration{register(t, r, instFor(h, svc, "a", 9001)), register(t, r, instFor(h, svc, "b", 9002))}
	f := follow(t, open(t, h), svc)
	f.waitIDs(settle, "a", "b")
	ctx := ctxT(t)
	skipIfUnsupported(t, h.StopServer(ctx))
	skipIfUnsupported(t, h.StartServer(ctx, true))
	waitFor(t, recover, "re-registration after the server lost its data", func() bool {
		for _, reg := range regs {
			if reg.Status().Reregistrations < 1 || reg.Status().State != registry.Registered {
				return false
			}
		}
		return slices.Equal(lookupIDsQuiet(r, svc), []string{"a", "b"})
	})
	f.waitIDs(recover, "a", "b")
	f.waitStale(recover, false)
}

func testPrefixIsolation(t *testing.T, h Harness) {
	r := open(t, h)
	base := service("user")
	register(t, r, instFor(h, base, "a", 9001))
	register(t, r, instFor(h, base+"2", "b", 9002))
	register(t, r, instFor(h, base+".v2", "c", 9003))
	register(t, r, instFor(h, base+"-x", "d", 9004))
	if got := lookupIDs(t, r, base); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("Lookup(%q) = %v, want [a]", base, got)
	}
	f := follow(t, r, base)
	f.waitIDs(settle, "a")
	register(t, r, instFor(h, base+"2", "e", 9005))
	register(t, r, instFor(h, base, "f", 9006))
	f.waitIDs(settle, "a", "f")
}

func testInvalidInstances(t *testing.T, h Harness) {
	r := open(t, h)
	svc := service("invalid")
	long := strings.Repeat("x", 300)
	bad := []registry.Instance{
		{Service: "", Addr: "127.0.0.1:1"},
		{Service: "a/b", Addr: "127.0.0.1:1"},
		{Service: "a b", Addr: "127.0.0.1:1"},
		{Service: "ctl\x01", Addr: "127.0.0.1:1"},
		{Service: long, Addr: "127.0.0.1:1"},
		{Service: svc, Addr: ""},
		{Service: svc, Addr: "127.0.0.1"},
		{Service: svc, Addr: "127.0.0.1:0"},
		{Service: svc, Addr: "127.0.0.1:70000"},
		{Service: svc, Addr: ":80"},
		{Service: svc, ID: "x/y", Addr: "127.0.0.1:1"},
		{Service: svc, Addr: "127.0.0.1:1", Metadata: map[string]string{registry.MetaWeight: "-1"}},
		{Service: svc, Addr: "127.0.0.1:1", Metadata: map[string]string{"": "v"}},
		{Service: svc, Addr: "127.0.0.1:1", Metadata: map[string]string{"k": strings.Repeat("v", 20000)}},
	}
	for _, in := range bad {
		reg, err := r.Register(ctxT(t), in)
		if !errors.Is(err, registry.ErrInvalidInstance) {
			t.Errorf("Register(%q) = %v, %v; want ErrInvalidInstance", in, reg, err)
		}
	}
	for _, name := range []string{"", "a/b", long} {
		if _, err := r.Lookup(ctxT(t), name); !errors.Is(err, registry.ErrInvalidInstance) {
			t.Errorf("Lookup(%q) error = %v, want ErrInvalidInstance", name, err)
		}
		if _, err := r.Watch(ctxT(t), name); !errors.Is(err, registry.ErrInvalidInstance) {
			t.Errorf("Watch(%q) error = %v, want ErrInvalidInstance", name, err)
		}
	}
	if got := lookupIDs(t, r, svc); len(got) != 0 {
		t.Fatalf("invalid registrations left %v behind", got)
	}
}

func testInvalidURLs(t *testing.T, h Harness) {
	good, bad := h.URLs()
	for _, u := range bad {
		r, err := registry.Open(ctxT(t), u)
		if err == nil {
			r.Close()
			t.Errorf("Open(%q) succeeded, want an error", u)
			continue
		}
		if !errors.Is(err, registry.ErrInvalidURL) {
			t.Errorf("Open(%q) = %v, want ErrInvalidURL", u, err)
		}
		for _, secret := range []string{"s3cret", "hunter2"} {
			if strings.Contains(err.Error(), secret) {
				t.Errorf("Open error reveals a credential: %v", err)
			}
		}
	}
	if good == "" {
		return
	}
	r, err := registry.Open(ctxT(t), good)
	if err != nil {
		t.Fatalf("Open(%q): %v", good, err)
	}
	defer r.Close()
	svc := service("url")
	reg := register(t, r, instFor(h, svc, "a", 9001))
	if got := lookupIDs(t, r, svc); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("Lookup through %q = %v", good, got)
	}
	if err := reg.Deregister(ctxT(t)); err != nil {
		t.Fatal(err)
	}
}

func testGarbage(t *testing.T, h Harness) {
	r := open(t, h)
	svc := service("garbage")
	register(t, r, instFor(h, svc, "good", 9001))
	f := follow(t, open(t, h), svc)
	f.waitIDs(settle, "good")
	skipIfUnsupported(t, h.WriteGarbage(ctxT(t), svc))
	register(t, r, instFor(h, svc, "after", 9002))
	f.waitIDs(settle, "after", "good")
	if got := lookupIDs(t, r, svc); !slices.Equal(got, []string{"after", "good"}) {
		t.Fatalf("Lookup with garbage present = %v, want [after good]", got)
	}
	// A new watcher starts cleanly with the garbage present.
	f2 := follow(t, open(t, h), svc)
	f2.waitIDs(settle, "after", "good")
}

func testUpdate(t *testing.T, h Harness) {
	if addressOnly(h) {
		t.Skip("the registry stores an address only (AddressOnly): no metadata to update; WatchDeliversAddUpdateRemoveInOrder updates the address")
	}
	r := open(t, h)
	svc := service("update")
	in := instFor(h, svc, "a", 9001)
	reg := register(t, r, in)
	in.Metadata = map[string]string{registry.MetaVersion: "v9", "new": "yes"}
	in.Addr = "127.0.0.1:9100"
	if err := reg.Update(ctxT(t), in); err != nil {
		t.Fatal(err)
	}
	waitFor(t, settle, "updated instance in Lookup", func() bool {
		list, err := r.Lookup(ctxT(t), svc)
		return err == nil && len(list) == 1 && list[0].Equal(in)
	})
	other := in
	other.ID = "b"
	if err := reg.Update(ctxT(t), other); !errors.Is(err, registry.ErrInvalidInstance) {
		t.Fatalf("Update with another ID: %v, want ErrInvalidInstance", err)
	}
}

func testIdempotent(t *testing.T, h Harness) {
	r, err := h.MakeRegistry(ctxT(t), TTL)
	if err != nil {
		t.Fatal(err)
	}
	svc := service("idem")
	reg := register(t, r, instFor(h, svc, "a", 9001))
	kept := register(t, r, instFor(h, svc, "b", 9002))
	other := open(t, h)
	if err := reg.Deregister(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if err := reg.Deregister(ctxT(t)); err != nil {
		t.Fatalf("second Deregister: %v", err)
	}
	w, err := r.Watch(ctxT(t), svc)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	// Close withdrew what was still registered.
	if got := lookupIDs(t, other, svc); len(got) != 0 {
		t.Fatalf("after Close, Lookup = %v, want nothing", got)
	}
	if err := kept.Deregister(ctxT(t)); err != nil {
		t.Fatalf("Deregister after Close: %v", err)
	}
	// A closed watcher delivers nothing: Next says ErrClosed at once, every
	// time (not an update, not the end of the caller's context).
	for i := range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), settle)
		u, err := w.Next(ctx)
		cancel()
		if !errors.Is(err, registry.ErrClosed) {
			t.Fatalf("Watcher.Next #%d after the Registry's Close: %+v, %v; want ErrClosed", i+1, u, err)
		}
	}
	select {
	case <-w.Done():
	default:
		t.Fatalf("Watcher.Done not closed after the Registry's Close")
	}
	if err := w.Close(); err != nil {
		t.Errorf("Watcher.Close after the Registry's Close: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Errorf("second Watcher.Close: %v", err)
	}
	if s := kept.Status(); s.State != registry.Deregistered {
		t.Errorf("status of a registration the Registry's Close withdrew: %v (%v), want %v", s.State, s.Err, registry.Deregistered)
	}
	if err := kept.Update(ctxT(t), instFor(h, svc, "b", 9012)); !errors.Is(err, registry.ErrClosed) {
		t.Errorf("Update after Close: %v, want ErrClosed", err)
	}
	if _, err := r.Register(ctxT(t), instFor(h, svc, "c", 9003)); !errors.Is(err, registry.ErrClosed) {
		t.Errorf("Register after Close: %v, want ErrClosed", err)
	}
	if _, err := r.Lookup(ctxT(t), svc); !errors.Is(err, registry.ErrClosed) {
		t.Errorf("Lookup after Close: %v, want ErrClosed", err)
	}
	if _, err := r.Watch(ctxT(t), svc); !errors.Is(err, registry.ErrClosed) {
		t.Errorf("Watch after Close: %v, want ErrClosed", err)
	}
	if err := r.Ping(ctxT(t)); !errors.Is(err, registry.ErrClosed) {
		t.Errorf("Ping after Close: %v, want ErrClosed", err)
	}
}

func testNoLeaks(t *testing.T, h Harness) {
	// Warm up what the harness itself keeps running, then take the baseline.
	warm := open(t, h)
	_ = lookupIDs(t, warm, service("warm"))
	opt := goleak.IgnoreCurrent()
	for range 3 {
		r, err := h.MakeRegistry(ctxT(t), TTL)
		if err != nil {
			t.Fatal(err)
		}
		svc := service("leak")
		reg := register(t, r, instFor(h, svc, "a", 9001))
		w, err := r.Watch(ctxT(t), svc)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Next(ctxT(t)); err != nil {
			t.Fatal(err)
		}
		w2, err := r.Watch(ctxT(t), svc) // left open: Close must stop it
		if err != nil {
			t.Fatal(err)
		}
		_ = w2
		if err := reg.Deregister(ctxT(t)); err != nil {
			t.Fatal(err)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
	}
	var leak error
	deadline := time.Now().Add(settle)
	for leak = goleak.Find(opt); leak != nil && time.Now().Before(deadline); leak = goleak.Find(opt) {
	}
	if leak != nil {
		t.Fatal(leak)
	}
}
