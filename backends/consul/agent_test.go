package consul_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/backends/consul"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

// Tests of the Consul backend against a real agent, beyond the conformance
// suite: costs (requests per renewal, per idle watch), the index and rate
// rules, ACLs and TLS, registrations written by other tools.

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func qopts(t *testing.T) *api.QueryOptions {
	return (&api.QueryOptions{}).WithContext(ctxFor(t, 30*time.Second))
}

var waitUntil = testutil.WaitFor

// newRegistry returns a Registry over a client of addr whose requests tr
// counts; it is closed at the end of the test.
func newRegistry(t *testing.T, addr string, o consul.Options) (registry.Registry, *cutTransport) {
	t.Helper()
	tr := newCutTransport()
	if o.Logger == nil {
		o.Logger = testLogger()
	}
	r := consul.New(newClient(t, addr, tr), &o)
	t.Cleanup(func() { _ = r.Close() })
	return r, tr
}

// watchUpdates follows service and sends every update on the returned
// channel (buffered; the test reads what it needs).
func watchUpdates(t *testing.T, r registry.Registry, service string) <-chan registry.Update {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w, err := r.Watch(ctx, service)
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan registry.Update, 1000)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			u, err := w.Next(ctx)
			if err != nil {
				return
			}
			select {
			case ch <- u:
			default:
			}
		}
	}()
	t.Cleanup(func() { cancel(); w.Close(); <-done })
	return ch
}

// nextUpdate waits for an update that satisfies ok.
func nextUpdate(t *testing.T, ch <-chan registry.Update, timeout time.Duration, what string, ok func(registry.Update) bool) registry.Update {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case u := <-ch:
			if ok(u) {
				return u
			}
		case <-deadline:
			t.Fatalf("no update with %s within %v", what, timeout)
		}
	}
}

func ids(list []registry.Instance) []string {
	out := make([]string, len(list))
	for i, in := range list {
		out[i] = in.ID
	}
	return out
}

func instance(svc, id string, port int) registry.Instance {
	return registry.Instance{Service: svc, ID: id, Addr: "127.0.0.1:" + strconv.Itoa(port)}
}

// A Registry holding many instances renews them with a constant number of
// requests: one session, two requests per TTL/3.
func TestRenewalCostDoesNotGrowWithInstances(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	const ttl = 3 * time.Second
	r, tr := newRegistry(t, srv.Addr(), consul.Options{TTL: ttl})
	const n = 40
	for i := range n {
		if _, err := r.Register(ctxFor(t, 30*time.Second), instance("many", fmt.Sprintf("i%02d", i), 10000+i)); err != nil {
			t.Fatal(err)
		}
	}
	before := tr.count.Load()
	const window = 4 * ttl / 3 * 3 // four rounds
	time.Sleep(window)             // the span whose requests are counted
	got := tr.count.Load() - before
	rounds := int64(window / (ttl / 3))
	t.Logf("%d instances: %d requests in %v (%d renewal rounds)", n, got, window, rounds)
	if got > 2*rounds+2 {
		t.Errorf("%d requests for %d rounds: want at most 2 per round whatever the number of instances", got, rounds)
	}
	admin := newClient(t, srv.Addr(), newCutTransport())
	sessions, _, err := admin.Catalog().Service(consul.SessionService, "", qopts(t))
	if err != nil || len(sessions) != 1 {
		t.Fatalf("sessions in the catalog: %d, %v; want 1", len(sessions), err)
	}
	list, err := r.Lookup(ctxFor(t, 10*time.Second), "many")
	if err != nil || len(list) != n {
		t.Fatalf("Lookup: %d instances, %v", len(list), err)
	}
	// Close removes the session with the instances.
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	sessions, _, err = admin.Catalog().Service(consul.SessionService, "", qopts(t))
	if err != nil || len(sessions) != 0 {
		t.Fatalf("sessions after Close: %d, %v; want none", len(sessions), err)
	}
}

// A session check found critical loses the registrations, which come back.
//
// The registrar's writes are held while the test fails its session check:
// otherwise its next renewal can make the check pass again before the
// watcher or the registrar has seen it critical (a race the test would lose
// under load). Its reads go through, so it finds the check critical.
func TestCriticalSessionIsLostAndRegisteredAgain(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	r, tr := newRegistry(t, srv.Addr(), consul.Options{TTL: 6 * time.Second})
	reg, err := r.Register(ctxFor(t, 10*time.Second), instance("crit", "a", 9001))
	if err != nil {
		t.Fatal(err)
	}
	ch := watchUpdates(t, r, "crit")
	nextUpdate(t, ch, 10*time.Second, "a", func(u registry.Update) bool { return slices.Equal(ids(u.Instances()), []string{"a"}) })
	admin := newClient(t, srv.Addr(), newCutTransport())
	checks, err := admin.Agent().ChecksWithFilterOpts(`ServiceName == "rollcall-session"`, qopts(t))
	if err != nil || len(checks) != 1 {
		t.Fatalf("session checks: %v, %v", checks, err)
	}
	release := tr.holdWrites(t)
	for id := range checks {
		if err := admin.Agent().UpdateTTLOpts(id, "failed by the test", api.HealthCritical, qopts(t)); err != nil {
			t.Fatal(err)
		}
	}
	nextUpdate(t, ch, 10*time.Second, "a removed (its alias check follows the session)", func(u registry.Update) bool {
		return len(u.Removed) == 1 && !u.Stale
	})
	waitUntil(t, 20*time.Second, "the registrar to find its session critical", func() bool {
		return reg.Status().State == registry.Retrying
	})
	release()
	waitUntil(t, 20*time.Second, "re-registration", func() bool {
		s := reg.Status()
		return s.State == registry.Registered && s.Reregistrations >= 1
	})
	if err := reg.Status().Err; err != nil {
		t.Errorf("status error after re-registration: %v", err)
	}
	nextUpdate(t, ch, 10*time.Second, "a back", func(u registry.Update) bool { return slices.Equal(ids(u.Instances()), []string{"a"}) })
}

// A paused agent fails the watch within the wait time plus a margin: the
// watcher says stale and keeps its list.
func TestWatchFailsSoonWhenAgentPaused(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	const wait = 2 * time.Second
	r, _ := newRegistry(t, srv.Addr(), consul.Options{TTL: 2 * time.Second, WaitTime: wait})
	if _, err := r.Register(ctxFor(t, 10*time.Second), instance("pause", "a", 9001)); err != nil {
		t.Fatal(err)
	}
	ch := watchUpdates(t, r, "pause")
	nextUpdate(t, ch, 10*time.Second, "a", func(u registry.Update) bool { return len(u.Instances()) == 1 })
	srv.Pause()
	start := time.Now()
	u := nextUpdate(t, ch, 30*time.Second, "stale", func(u registry.Update) bool { return u.Stale })
	took := time.Since(start)
	srv.Resume()
	t.Logf("stale %v after the pause: %v", took.Round(time.Millisecond), u.Err)
	if limit := wait + wait/16 + time.Second + 2*time.Second; took > limit {
		t.Errorf("stale after %v, want within about %v", took, limit)
	}
	if len(u.Instances()) != 1 || !errors.Is(u.Err, registry.ErrUnavailable) {
		t.Errorf("stale update: %d instances, err %v; want the last list and ErrUnavailable", len(u.Instances()), u.Err)
	}
	nextUpdate(t, ch, 30*time.Second, "not stale", func(u registry.Update) bool { return !u.Stale })
}

// A quiet watch makes about one request per wait time.
func TestIdleWatchRequestRate(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	const wait = 2 * time.Second
	r, tr := newRegistry(t, srv.Addr(), consul.Options{WaitTime: wait})
	ch := watchUpdates(t, r, "idle")
	nextUpdate(t, ch, 10*time.Second, "first snapshot", func(registry.Update) bool { return true })
	before := tr.count.Load()
	const window = 10 * time.Second
	time.Sleep(window) // the span whose requests are counted
	got := tr.count.Load() - before
	t.Logf("idle watch, wait=%v: %d requests in %v", wait, got, window)
	if min, max := int64(window/wait)-2, int64(window/wait)+2; got < min || got > max {
		t.Errorf("%d requests in %v, want about %d", got, window, window/wait)
	}
}

// indexProxy forwards to the agent at target and rewrites the X-Consul-Index
// of health answers with fix, as a misbehaving agent or load balancer
// would. It counts the health requests.
func indexProxy(t *testing.T, target string, fix func(uint64) uint64) (string, *atomic.Int64) {
	t.Helper()
	u, _ := url.Parse("http://" + target)
	rp := httputil.NewSingleHostReverseProxy(u)
	tr := newCutTransport()
	t.Cleanup(tr.base.CloseIdleConnections)
	rp.Transport = tr
	var count atomic.Int64
	rp.ModifyResponse = func(resp *http.Response) error {
		if strings.HasPrefix(resp.Request.URL.Path, "/v1/health/") {
			count.Add(1)
			n, _ := strconv.ParseUint(resp.Header.Get("X-Consul-Index"), 10, 64)
			resp.Header.Set("X-Consul-Index", strconv.FormatUint(fix(n), 10))
		}
		return nil
	}
	srv := httptest.NewServer(rp)
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String(), &count
}

// No request storm when the index does not move, goes backwards or is 0:
// the watch pauses, growing, and still notices changes.
func TestNoRequestStormWhenIndexMisbehaves(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	admin := newClient(t, srv.Addr(), newCutTransport())
	var back atomic.Uint64
	back.Store(1_000_000)
	for _, tc := range []struct {
		name string
		fix  func(uint64) uint64
	}{
		{"stuck", func(uint64) uint64 { return 7 }},
		{"backwards", func(uint64) uint64 { return back.Add(^uint64(0)) }},
		{"zero", func(uint64) uint64 { return 0 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, count := indexProxy(t, srv.Addr(), tc.fix)
			r, _ := newRegistry(t, addr, consul.Options{})
			svc := "idx-" + tc.name
			ch := watchUpdates(t, r, svc)
			nextUpdate(t, ch, 10*time.Second, "first snapshot", func(registry.Update) bool { return true })
			before := count.Load()
			const window = 6 * time.Second
			time.Sleep(window) // the span whose requests are counted
			got := count.Load() - before
			t.Logf("index %s: %d health requests in %v", tc.name, got, window)
			if got > 15 {
				t.Errorf("%d requests in %v: a request storm", got, window)
			}
			reg := &api.AgentServiceRegistration{ID: svc + "~a", Name: svc, Address: "127.0.0.1", Port: 9001}
			if err := admin.Agent().ServiceRegisterOpts(reg, api.ServiceRegisterOpts{}.WithContext(ctxFor(t, 10*time.Second))); err != nil {
				t.Fatal(err)
			}
			nextUpdate(t, ch, 15*time.Second, "the new instance", func(u registry.Update) bool { return len(u.Added) == 1 })
		})
	}
}

// No request storm while the agent is down: the shared layer backs off.
func TestNoRequestStormWhenAgentDown(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there any more
	r, tr := newRegistry(t, addr, consul.Options{})
	ch := watchUpdates(t, r, "down")
	u := nextUpdate(t, ch, 10*time.Second, "stale", func(u registry.Update) bool { return u.Stale })
	if !errors.Is(u.Err, registry.ErrUnavailable) {
		t.Errorf("stale error %v, want ErrUnavailable", u.Err)
	}
	before := tr.count.Load()
	const window = 6 * time.Second
	time.Sleep(window) // the span whose requests are counted
	got := tr.count.Load() - before
	t.Logf("agent down: %d requests in %v", got, window)
	if got > 10 {
		t.Errorf("%d requests in %v while the agent is down: want backoff", got, window)
	}
	if _, err := r.Lookup(ctxFor(t, 5*time.Second), "down"); !errors.Is(err, registry.ErrUnavailable) {
		t.Errorf("Lookup with the agent down: %v, want ErrUnavailable", err)
	}
}

// Registrations written by other tools, with their own IDs and tags, are
// discovered.
func TestRegistrationsOfOtherToolsAreDiscovered(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	admin := newClient(t, srv.Addr(), newCutTransport())
	reg := &api.AgentServiceRegistration{ID: "web-1", Name: "web", Port: 8080, Address: "10.1.2.3",
		Tags: []string{"version=v7", "primary"}, Meta: map[string]string{"zone": "z9"},
		Weights: &api.AgentWeights{Passing: 20000, Warning: 1}}
	if err := admin.Agent().ServiceRegisterOpts(reg, api.ServiceRegisterOpts{}.WithContext(ctxFor(t, 10*time.Second))); err != nil {
		t.Fatal(err)
	}
	r, _ := newRegistry(t, srv.Addr(), consul.Options{})
	list, err := r.Lookup(ctxFor(t, 10*time.Second), "web")
	if err != nil {
		t.Fatal(err)
	}
	want := registry.Instance{Service: "web", ID: "web-1", Addr: "10.1.2.3:8080",
		Metadata: map[string]string{"version": "v7", "zone": "z9", "weight": "10000"}}
	if len(list) != 1 || !list[0].Equal(want) {
		t.Fatalf("Lookup = %v, want [%v]", list, want)
	}
}

// An instance whose check stays critical while its session passes (what a
// Consul alias check that missed the session's edge looks like, for up to a
// minute, after an agent restart: most likely why, in a CI run,
// TestConformance/NoGoroutineLeaksAfterFaults never got its instances back
// after the agent's restart) is registered again, which restores its alias
// check. Here the instance's check is replaced by a critical TTL check of the
// same ID.
func TestInstanceCheckStuckCriticalIsRegisteredAgain(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	r, _ := newRegistry(t, srv.Addr(), consul.Options{TTL: 3 * time.Second})
	reg, err := r.Register(ctxFor(t, 10*time.Second), instance("stuck", "a", 9001))
	if err != nil {
		t.Fatal(err)
	}
	ch := watchUpdates(t, r, "stuck")
	nextUpdate(t, ch, 10*time.Second, "a", func(u registry.Update) bool { return slices.Equal(ids(u.Instances()), []string{"a"}) })
	admin := newClient(t, srv.Addr(), newCutTransport())
	checks, err := admin.Agent().ChecksWithFilterOpts(`ServiceName == "stuck"`, qopts(t))
	if err != nil || len(checks) != 1 {
		t.Fatalf("instance checks: %v, %v", checks, err)
	}
	for id, ck := range checks {
		err := admin.Agent().CheckRegisterOpts(&api.AgentCheckRegistration{
			ID: id, Name: "stuck by the test", ServiceID: ck.ServiceID,
			AgentServiceCheck: api.AgentServiceCheck{TTL: "1h", Status: api.HealthCritical},
		}, qopts(t))
		if err != nil {
			t.Fatal(err)
		}
	}
	for id := range checks { // a TTL check keeps the status of the check it replaced
		if err := admin.Agent().UpdateTTLOpts(id, "stuck by the test", api.HealthCritical, qopts(t)); err != nil {
			t.Fatal(err)
		}
	}
	nextUpdate(t, ch, 10*time.Second, "a removed (its check is critical)", func(u registry.Update) bool {
		return len(u.Removed) == 1 && !u.Stale
	})
	waitUntil(t, 20*time.Second, "re-registration", func() bool {
		s := reg.Status()
		return s.State == registry.Registered && s.Reregistrations >= 1
	})
	nextUpdate(t, ch, 10*time.Second, "a back", func(u registry.Update) bool { return slices.Equal(ids(u.Instances()), []string{"a"}) })
}

// A burst of Registers and Deregisters through one Registry keeps at most
// consul.MaxWrites service writes in flight to the agent, which applies them
// one at a time under the lock its TTL renewals wait for: sent all at once
// they only queue there, and a renewal queued behind them arrived after the
// TTL in a CI run (BurstOfAddsUpdatesAndRemovesLosesNothing: instances
// removed that were never deregistered). Before the bound, 24 concurrent
// Registers had 24 writes in flight.
func TestServiceWritesInFlightAreBounded(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	r, tr := newRegistry(t, srv.Addr(), consul.Options{TTL: 2 * time.Second})
	ctx := ctxFor(t, time.Minute)
	const n = 24
	regs := make([]*registry.Registration, n)
	errs := make(chan error, n)
	for i := range n {
		go func() {
			var err error
			regs[i], err = r.Register(ctx, registry.Instance{Service: "bounded", ID: fmt.Sprintf("b%02d", i), Addr: fmt.Sprintf("127.0.0.1:%d", 20000+i)})
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	list, err := r.Lookup(ctx, "bounded")
	if err != nil || len(list) != n {
		t.Fatalf("Lookup: %d instances, %v; want %d", len(list), err, n)
	}
	for _, reg := range regs {
		go func() { errs <- reg.Deregister(ctx) }()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if got := tr.svcMax.Load(); got > consul.MaxWrites || got < 1 {
		t.Fatalf("%d service writes were in flight at once, want 1 to %d", got, consul.MaxWrites)
	}
	t.Logf("at most %d of %d service writes in flight", tr.svcMax.Load(), 2*n+1)
}

// Deregister returns once the instance is gone from what Lookup and Watch
// read (the catalog): another client's Lookup right after Deregister
// returned never lists it, with eight registrars at once keeping the agent
// busy. (The CI failure this guards against, in
// DeregisterDuringOutageCompletesWhenServerReturns, came from a
// deregistration the agent applied after its request had timed out: the
// retry found the agent's own state without the service while the catalog
// still listed it. This test passes without the fix too; the conformance
// property is the one that failed.)
func TestLookupAfterDeregisterDoesNotListIt(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	other, _ := newRegistry(t, srv.Addr(), consul.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const workers, rounds = 8, 10
	var listed, total atomic.Int64
	var wg sync.WaitGroup
	for w := range workers {
		r, _ := newRegistry(t, srv.Addr(), consul.Options{})
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range rounds {
				id := fmt.Sprintf("w%d-%02d", w, i)
				reg, err := r.Register(ctx, registry.Instance{Service: "gone", ID: id, Addr: fmt.Sprintf("127.0.0.1:%d", 20000+w*100+i)})
				if err != nil {
					t.Error(err)
					return
				}
				if err := reg.Deregister(ctx); err != nil {
					t.Error(err)
					return
				}
				got, err := other.Lookup(ctx, "gone")
				if err != nil {
					t.Error(err)
					return
				}
				total.Add(1)
				if slices.ContainsFunc(got, func(in registry.Instance) bool { return in.ID == id }) {
					listed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if n := listed.Load(); n > 0 {
		t.Fatalf("in %d of %d rounds another client's Lookup right after Deregister returned still listed the instance", n, total.Load())
	}
}
