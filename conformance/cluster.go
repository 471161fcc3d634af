package conformance

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/registry"
)

// ClusterMaker is a Harness that can also run its backend as a cluster of
// members, as users run it in production (etcd with 3 members, Consul
// servers behind a client agent). The cluster properties run only on
// harnesses that offer it; MakeCluster returns an error wrapping
// ErrUnsupported to decline (the properties are then skipped with its
// text).
type ClusterMaker interface {
	// MakeCluster starts a cluster for one subtest; it is stopped when t
	// ends.
	MakeCluster(ctx context.Context, t *testing.T) (Cluster, error)
}

// Cluster is a registry of several members that keeps working while a
// majority of them is up. Members are numbered from 0 to Members()-1.
type Cluster interface {
	// MakeRegistry returns a new client of the cluster, as a separate
	// process would have, reaching it the way production clients do
	// (every etcd member's endpoint; the Consul client agent).
	MakeRegistry(ctx context.Context, ttl time.Duration) (registry.Registry, error)
	Members() int
	// Leader is the member that leads now; an error if none does.
	Leader(ctx context.Context) (int, error)
	// Freeze stops member i as SIGSTOP does (it holds its connections and
	// answers nothing); Thaw resumes it.
	Freeze(ctx context.Context, i int) error
	Thaw(ctx context.Context, i int) error
	// Stop kills member i, keeping its data; Start starts it again with its
	// data and returns once it answers.
	Stop(ctx context.Context, i int) error
	Start(ctx context.Context, i int) error
	// WaitHealthy returns once every member answers and one leads.
	WaitHealthy(ctx context.Context) error
}

// clusterTTL is the TTL of the cluster properties: long against the
// members' election timeout, as production TTLs are.
const clusterTTL = 5 * time.Second

// clusterTests are the properties of clustered registries.
var clusterTests = []struct {
	name string
	fn   func(*testing.T, *clusterRun)
}{
	{"ClusterLeaderLossKeepsEverything", testLeaderLoss},
	{"ClusterFrozenMemberLosesNoRegistration", testFrozenMember},
	{"ClusterWatchFollowsChangesWhileAMemberIsFrozen", testWatchWhileFrozen},
	{"ClusterQuorumLossFreezesThenRecoversExactly", testQuorumLoss},
	{"ClusterRollingRestartLosesNothing", testRollingRestart},
}

// clusterRun is one cluster property's cluster and its bookkeeping.
type clusterRun struct {
	t *testing.T
	c Cluster
}

func runCluster(t *testing.T, h Harness, fn func(*testing.T, *clusterRun)) {
	if addressOnly(h) {
		t.Skip("the registry stores an address only (AddressOnly); the cluster properties register instances with metadata")
	}
	cm, ok := h.(ClusterMaker)
	if !ok {
		t.Skip("the harness has no ClusterMaker: its backend runs as a single server here")
	}
	c, err := cm.MakeCluster(ctxT(t), t)
	skipIfUnsupported(t, err)
	fn(t, &clusterRun{t: t, c: c})
}

func (cr *clusterRun) open() registry.Registry {
	cr.t.Helper()
	r, err := cr.c.MakeRegistry(ctxT(cr.t), clusterTTL)
	if err != nil {
		cr.t.Fatalf("MakeRegistry: %v", err)
	}
	cr.t.Cleanup(func() { _ = r.Close() })
	return r
}

func (cr *clusterRun) do(what string, err error) {
	cr.t.Helper()
	if err != nil {
		cr.t.Fatalf("%s: %v", what, err)
	}
}

// leader waits for a leader other than not (-1: any) and returns it.
func (cr *clusterRun) leader(not int) int {
	cr.t.Helper()
	l := -1
	waitFor(cr.t, recover, fmt.Sprintf("a leader other than member %d", not), func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		i, err := cr.c.Leader(ctx)
		if err == nil && i != not {
			l = i
			return true
		}
		return false
	})
	return l
}

func (cr *clusterRun) healthy() {
	cr.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), recover)
	defer cancel()
	cr.do("waiting for every member to answer", cr.c.WaitHealthy(ctx))
}

// registerAll registers ids (ports from 9100) through r.
func registerAll(t *testing.T, r registry.Registry, svc string, ids ...string) []*registry.Registration {
	t.Helper()
	var regs []*registry.Registration
	for i, id := range ids {
		regs = append(regs, register(t, r, inst(svc, id, 9100+i)))
	}
	return regs
}

// superset is a check that every update lists every id of want.
func superset(want ...string) func(record) error {
	return func(rec record) error {
		var missing []string
		for _, id := range want {
			if !slices.Contains(rec.ids, id) {
				missing = append(missing, id)
			}
		}
		if len(missing) > 0 {
			return fmt.Errorf("live instances %v are missing", missing)
		}
		return nil
	}
}

// within is a check that every update lists only ids of known.
func within(known func() []string) func(record) error {
	return func(rec record) error {
		k := known()
		for _, id := range rec.ids {
			if !slices.Contains(k, id) {
				return fmt.Errorf("%s was never registered", id)
			}
		}
		return nil
	}
}

// neverReregistered fails the test if a registration was lost and made
// again: with quorum kept, no registration may be.
func neverReregistered(t *testing.T, what string, regs []*registry.Registration) {
	t.Helper()
	for _, reg := range regs {
		if s := reg.Status(); s.State != registry.Registered || s.Reregistrations != 0 {
			t.Errorf("%s: %s: %+v; want registered and never registered again", what, reg.Instance(), s)
		}
	}
}

// testLeaderLoss: the leader is killed and another elected: no update
// lacks a registered instance, a Register right after the election works
// and reaches the watcher, Lookup is exact, and after the old leader
// rejoins the watcher is fresh and exact.
func testLeaderLoss(t *testing.T, cr *clusterRun) {
	svc := service("leaderloss")
	ra, rb := cr.open(), cr.open()
	stable := []string{"a", "b", "c"}
	regs := registerAll(t, ra, svc, stable...)
	f := follow(t, rb, svc)
	f.waitFresh(settle, stable...)
	mark := f.mark()
	old := cr.leader(-1)
	start := time.Now()
	cr.do("stopping the leader", cr.c.Stop(ctxT(t), old))
	now := cr.leader(old)
	t.Logf("member %d led; member %d elected after %v", old, now, time.Since(start).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), settle)
	d, err := ra.Register(ctx, inst(svc, "d", 9200))
	cancel()
	if err != nil {
		t.Fatalf("Register right after the election: %v", err)
	}
	all := append(slices.Clone(stable), "d")
	f.waitFresh(settle, all...)
	t.Logf("a registration made after the election reached the watcher %v after the leader stopped", time.Since(start).Round(time.Millisecond))
	if got := lookupIDs(t, rb, svc); !slices.Equal(got, all) {
		t.Fatalf("Lookup after the election = %v, want %v", got, all)
	}
	cr.do("starting the old leader again", cr.c.Start(ctxT(t), old))
	cr.healthy()
	f.hold(2*clusterTTL, mark, "through the leader's loss and return", both(superset(stable...), within(func() []string { return all })))
	f.waitFresh(settle, all...)
	neverReregistered(t, "after the leader's loss", append(regs, d))
}

// testFrozenMember: each member in turn is frozen for more than twice the
// TTL while the others keep quorum: no registration is lost (whichever
// member carries its keepalives), no update lacks one.
func testFrozenMember(t *testing.T, cr *clusterRun) {
	svc := service("frozen")
	ra, rb := cr.open(), cr.open()
	stable := []string{"a", "b", "c", "d", "e"}
	regs := registerAll(t, ra, svc, stable...)
	f := follow(t, rb, svc)
	f.waitFresh(settle, stable...)
	mark := f.mark()
	check := both(superset(stable...), exactly(stable...))
	for i := range cr.c.Members() {
		t.Logf("freezing member %d (leader: %d)", i, cr.leader(-1))
		cr.do("freezing", cr.c.Freeze(ctxT(t), i))
		mark = f.hold(5*clusterTTL/2, mark, fmt.Sprintf("while member %d was frozen", i), check)
		cr.do("thawing", cr.c.Thaw(ctxT(t), i))
		cr.healthy()
		neverReregistered(t, fmt.Sprintf("after member %d was frozen", i), regs)
	}
	f.waitFresh(settle, stable...)
	f.hold(clusterTTL, mark, "after the thaws", check)
	if got := lookupIDs(t, rb, svc); !slices.Equal(got, stable) {
		t.Fatalf("Lookup = %v, want %v", got, stable)
	}
}

// changeBound bounds how long a change made through the healthy members may
// take to reach a watcher while one member is frozen: a few seconds.
const changeBound = 10 * time.Second

// testWatchWhileFrozen: each member in turn is frozen while Lookups run
// every 300ms on the watcher's Registry, as application traffic would; a
// registration and a deregistration made during the freeze reach the
// watcher within changeBound, no update lacks a live instance or lists one
// never registered, and every Lookup (but those begun before a new leader
// was elected, when the frozen member led) answers with the live
// instances within 2s.
func testWatchWhileFrozen(t *testing.T, cr *clusterRun) {
	svc := service("frozenwatch")
	ra, rb := cr.open(), cr.open()
	stable := []string{"a", "b", "c"}
	registerAll(t, ra, svc, stable...)
	f := follow(t, rb, svc)
	f.waitFresh(settle, stable...)
	mark := f.mark()
	var knownMu sync.Mutex
	known := slices.Clone(stable)
	knownIDs := func() []string { knownMu.Lock(); defer knownMu.Unlock(); return slices.Clone(known) }
	check := both(superset(stable...), within(knownIDs))
	for i := range cr.c.Members() {
		old := cr.leader(-1)
		cr.do("freezing", cr.c.Freeze(ctxT(t), i))
		start := time.Now()
		var elected atomic.Int64 // when a leader among the others was seen, UnixNano
		if old != i {
			elected.Store(start.UnixNano())
		}
		stop := make(chan struct{})
		lookups := make(chan error, 1)
		go func() { lookups <- lookupTraffic(rb, svc, stable, start, &elected, stop) }()
		if old == i {
			cr.leader(i)
			elected.Store(time.Now().UnixNano())
		}
		extra := fmt.Sprintf("x%d", i)
		knownMu.Lock()
		known = append(known, extra)
		knownMu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), settle)
		reg, err := ra.Register(ctx, inst(svc, extra, 9300+i))
		cancel()
		if err != nil {
			t.Fatalf("member %d frozen: Register: %v", i, err)
		}
		begun := time.Now()
		f.waitUntil(changeBound, fmt.Sprintf("member %d frozen: the registration of %s to reach the watcher", i, extra), func(rec record) bool {
			return slices.Contains(rec.ids, extra)
		})
		added := time.Since(begun)
		ctx, cancel = context.WithTimeout(context.Background(), settle)
		err = reg.Deregister(ctx)
		cancel()
		if err != nil {
			t.Fatalf("member %d frozen: Deregister: %v", i, err)
		}
		begun = time.Now()
		f.waitUntil(changeBound, fmt.Sprintf("member %d frozen: the deregistration of %s to reach the watcher", i, extra), func(rec record) bool {
			return !slices.Contains(rec.ids, extra)
		})
		t.Logf("member %d frozen (leader was %d): registration seen after %v, deregistration after %v",
			i, old, added.Round(time.Millisecond), time.Since(begun).Round(time.Millisecond))
		close(stop)
		if err := <-lookups; err != nil {
			t.Errorf("member %d frozen: %v", i, err)
		}
		mark = f.hold(0, mark, fmt.Sprintf("while member %d was frozen", i), check)
		cr.do("thawing", cr.c.Thaw(ctxT(t), i))
		cr.healthy()
	}
	f.waitFresh(settle, stable...)
	f.hold(clusterTTL, mark, "after the thaws", both(check, exactly(stable...)))
}

// lookupTraffic looks svc up through r every 300ms until stop, each with a
// 2s deadline, and says which Lookups failed or lacked one of want. A
// Lookup begun before elected was set may fail: no member answers a
// linearizable read before a new leader is elected.
func lookupTraffic(r registry.Registry, svc string, want []string, start time.Time, elected *atomic.Int64, stop <-chan struct{}) error {
	var failed []string
	tolerated, n := 0, 0
	tick := time.NewTicker(300 * time.Millisecond) // the traffic's pace
	defer tick.Stop()
	for {
		select {
		case <-stop:
			if len(failed) > 0 {
				return fmt.Errorf("%d of %d Lookups failed or lacked an instance (%d more failed before the election): %s", len(failed), n, tolerated, strings.Join(failed, "; "))
			}
			return nil
		case <-tick.C:
		}
		n++
		begun := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		list, err := r.Lookup(ctx, svc)
		cancel()
		var got []string
		for _, in := range list {
			got = append(got, in.ID)
		}
		at := time.Since(start).Round(time.Millisecond)
		switch {
		case err != nil && (elected.Load() == 0 || begun.UnixNano() < elected.Load()):
			tolerated++
		case err != nil:
			failed = append(failed, fmt.Sprintf("+%v: %v", at, err))
		case superset(want...)(record{ids: got}) != nil:
			failed = append(failed, fmt.Sprintf("+%v: listed %v", at, got))
		}
	}
}

// testQuorumLoss: two members of three are frozen: the watcher keeps its
// list (it may go stale; it never shrinks), and once they thaw it is fresh
// with the exact list and the registrations are registered.
func testQuorumLoss(t *testing.T, cr *clusterRun) {
	if cr.c.Members() < 3 {
		t.Skip("quorum loss needs 3 members or more")
	}
	svc := service("quorum")
	ra, rb := cr.open(), cr.open()
	stable := []string{"a", "b"}
	regs := registerAll(t, ra, svc, stable...)
	f := follow(t, rb, svc)
	f.waitFresh(settle, stable...)
	mark := f.mark()
	frozen := []int{0, 1}
	for _, i := range frozen {
		cr.do("freezing", cr.c.Freeze(ctxT(t), i))
	}
	start := time.Now()
	f.waitStale(recover, true)
	t.Logf("stale after %v without quorum", time.Since(start).Round(time.Millisecond))
	mark = f.hold(time.Until(start.Add(2*clusterTTL)), mark, "without quorum", exactly(stable...))
	for _, i := range frozen {
		cr.do("thawing", cr.c.Thaw(ctxT(t), i))
	}
	thawed := time.Now()
	cr.healthy()
	f.waitFresh(recover, stable...)
	t.Logf("fresh %v after the thaw", time.Since(thawed).Round(time.Millisecond))
	registeredAgain(t, rb, svc, regs, stable...)
	resumed := f.mark()
	f.hold(2*clusterTTL, mark, "after quorum returned", both(exactly(stable...), afterMark(resumed, noStaleAfterFresh())))
	ctx, cancel := context.WithTimeout(context.Background(), settle)
	defer cancel()
	if _, err := ra.Register(ctx, inst(svc, "c", 9200)); err != nil {
		t.Fatalf("Register after quorum returned: %v", err)
	}
	f.waitFresh(settle, "a", "b", "c")
}

// testRollingRestart: every member in turn is stopped and started again
// (its data kept) while another process registers and deregisters
// instances without pause: the stable instances are never missing from an
// update, nothing never registered is listed, and at the end the watcher
// is fresh and exact.
func testRollingRestart(t *testing.T, cr *clusterRun) {
	svc := service("rolling")
	ra, rb, rc := cr.open(), cr.open(), cr.open()
	stable := []string{"s0", "s1", "s2", "s3", "s4"}
	regs := registerAll(t, ra, svc, stable...)
	f := follow(t, rb, svc)
	f.waitFresh(settle, stable...)
	mark := f.mark()
	var knownMu sync.Mutex
	known := slices.Clone(stable)
	knownIDs := func() []string { knownMu.Lock(); defer knownMu.Unlock(); return slices.Clone(known) }
	stop := make(chan struct{})
	churned := make(chan error, 1)
	go func() {
		var live []*registry.Registration
		var errs []error
		n := 0
		for {
			select {
			case <-stop:
				for _, reg := range live {
					ctx, cancel := context.WithTimeout(context.Background(), settle)
					if err := reg.Deregister(ctx); err != nil {
						errs = append(errs, err)
					}
					cancel()
				}
				churned <- errors.Join(errs...)
				return
			default:
			}
			if len(live) >= 3 {
				ctx, cancel := context.WithTimeout(context.Background(), settle)
				if err := live[0].Deregister(ctx); err != nil {
					errs = append(errs, fmt.Errorf("deregistering: %w", err))
				}
				cancel()
				live = live[1:]
				continue
			}
			id := fmt.Sprintf("c%d", n)
			knownMu.Lock()
			known = append(known, id)
			knownMu.Unlock()
			ctx, cancel := context.WithTimeout(context.Background(), settle)
			reg, err := rc.Register(ctx, inst(svc, id, 9400+n%100))
			cancel()
			n++
			if err != nil {
				// A member stopping under the call may fail it: the
				// churner goes on, as an application would.
				continue
			}
			live = append(live, reg)
		}
	}()
	check := both(superset(stable...), within(knownIDs))
	for i := range cr.c.Members() {
		start := time.Now()
		cr.do("stopping", cr.c.Stop(ctxT(t), i))
		cr.leader(i)
		mark = f.hold(clusterTTL, mark, fmt.Sprintf("while member %d was stopped", i), check)
		cr.do("starting", cr.c.Start(ctxT(t), i))
		cr.healthy()
		t.Logf("member %d restarted in %v", i, time.Since(start).Round(time.Millisecond))
	}
	close(stop)
	if err := <-churned; err != nil {
		t.Logf("churn: %v", err)
	}
	f.waitFresh(settle, stable...)
	f.hold(clusterTTL, mark, "after the rolling restart", check)
	for _, reg := range regs {
		if s := reg.Status(); s.State != registry.Registered {
			t.Errorf("%s after the rolling restart: %+v", reg.Instance(), s)
		}
	}
}
