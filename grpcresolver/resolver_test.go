package grpcresolver_test

import (
	"context"
	"errors"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/serviceconfig"

	"github.com/rollcall-go/rollcall/grpcresolver"
	"github.com/rollcall-go/rollcall/registry"
)

// recordingCC is the ClientConn side of a resolver as gRPC presents it:
// it records what the resolver pushes.
type recordingCC struct {
	mu     sync.Mutex
	states []resolver.State
	errs   []error
	sc     []string
}

func (c *recordingCC) UpdateState(s resolver.State) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.states = append(c.states, s)
	return nil
}

func (c *recordingCC) ReportError(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.errs = append(c.errs, err)
}

func (c *recordingCC) NewAddress([]resolver.Address) { panic("deprecated NewAddress called") }

func (c *recordingCC) ParseServiceConfig(js string) *serviceconfig.ParseResult {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sc = append(c.sc, js)
	return &serviceconfig.ParseResult{}
}

func (c *recordingCC) count() (states, errs int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.states), len(c.errs)
}

func (c *recordingCC) last() (resolver.State, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.states) == 0 {
		return resolver.State{}, false
	}
	return c.states[len(c.states)-1], true
}

// ids returns the instance IDs of the last pushed state, in order.
func (c *recordingCC) ids() []string {
	s, ok := c.last()
	if !ok {
		return nil
	}
	return endpointIDs(s)
}

func endpointIDs(s resolver.State) []string {
	out := make([]string, 0, len(s.Endpoints))
	for _, ep := range s.Endpoints {
		in, ok := grpcresolver.InstanceFromEndpoint(ep)
		if !ok {
			out = append(out, "?"+ep.Addresses[0].Addr)
			continue
		}
		out = append(out, in.ID)
	}
	return out
}

func build(t testing.TB, b resolver.Builder, target string, cc resolver.ClientConn, bo resolver.BuildOptions) resolver.Resolver {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	r, err := b.Build(resolver.Target{URL: *u}, cc, bo)
	if err != nil {
		t.Fatalf("Build(%q): %v", target, err)
	}
	t.Cleanup(r.Close)
	return r
}

func register(t testing.TB, r registry.Registry, in registry.Instance) *registry.Registration {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rr, err := r.Register(ctx, in)
	if err != nil {
		t.Fatalf("register %v: %v", in, err)
	}
	return rr
}

func equalStrings(a, b []string) bool { return strings.Join(a, ",") == strings.Join(b, ",") }

func TestResolverPushesSortedEndpointsWithInstances(t *testing.T) {
	e := newMemEnv(t)
	reg := e.NewRegistry(t, time.Second)
	for _, id := range []string{"c", "a", "b"} {
		register(t, reg, registry.Instance{Service: "svc", ID: id, Addr: "127.0.0.1:" + map[string]string{"a": "1001", "b": "1002", "c": "1003"}[id],
			Metadata: map[string]string{registry.MetaZone: "zone-" + id}})
	}
	cc := &recordingCC{}
	build(t, grpcresolver.NewBuilder("mem"), e.URL()+"/svc", cc, resolver.BuildOptions{})
	waitFor(t, 5*time.Second, "three endpoints", func() bool { return len(cc.ids()) == 3 })
	if got := cc.ids(); !equalStrings(got, []string{"a", "b", "c"}) {
		t.Fatalf("endpoints in order %v, want a, b, c", got)
	}
	s, _ := cc.last()
	for i, ep := range s.Endpoints {
		in, _ := grpcresolver.InstanceFromEndpoint(ep)
		if in.Zone() != "zone-"+in.ID || in.Service != "svc" || ep.Addresses[0].Addr != in.Addr {
			t.Errorf("endpoint %d: %+v carries %+v", i, ep, in)
		}
		if s.Addresses[i].Addr != in.Addr {
			t.Errorf("State.Addresses[%d] = %q, want %q", i, s.Addresses[i].Addr, in.Addr)
		}
	}
	cc.mu.Lock()
	sc := cc.sc
	cc.mu.Unlock()
	if len(sc) != 1 || sc[0] != grpcresolver.DefaultServiceConfig {
		t.Errorf("service configs parsed: %q, want the default once", sc)
	}
	if s.ServiceConfig == nil {
		t.Error("state carries no service config")
	}
	if _, errs := cc.count(); errs != 0 {
		t.Errorf("%d errors reported", errs)
	}
}

func TestResolverDoesNotPushUnchangedLists(t *testing.T) {
	e := newMemEnv(t)
	reg := e.NewRegistry(t, time.Second)
	md := map[string]string{"k": "v"}
	rrs := map[string]*registry.Registration{}
	for i, id := range []string{"a", "b", "c"} {
		rrs[id] = register(t, reg, registry.Instance{Service: "svc", ID: id, Addr: "127.0.0.1:" + string(rune('1'+i)) + "000", Metadata: md})
	}
	cc := &recordingCC{}
	r := build(t, grpcresolver.NewBuilder("mem"), e.URL()+"/svc", cc, resolver.BuildOptions{})
	waitFor(t, 5*time.Second, "three endpoints", func() bool { return len(cc.ids()) == 3 })
	first, _ := cc.last()

	// A rewrite with the same content, and a pause of the registry (stale,
	// then resynced with no change), push nothing.
	ctx := context.Background()
	if err := rrs["a"].Update(ctx, registry.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:1000", Metadata: map[string]string{"k": "v"}}); err != nil {
		t.Fatal(err)
	}
	e.Pause(t)
	waitFor(t, 5*time.Second, "the resolver's watch to go stale", func() bool { return grpcresolver.WatchStale(r) })
	e.Resume(t)
	// A real change to b: exactly one more state, in which a and c keep their
	// attributes (same pointer: no work for the balancer).
	if err := rrs["b"].Update(ctx, registry.Instance{Service: "svc", ID: "b", Addr: "127.0.0.1:2000", Metadata: map[string]string{"k": "w"}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the change of b", func() bool {
		s, _ := cc.last()
		in, _ := grpcresolver.InstanceFromEndpoint(s.Endpoints[1])
		return in.Metadata["k"] == "w"
	})
	if n, _ := cc.count(); n != 2 {
		t.Fatalf("%d states pushed, want 2 (the first list and the change of b)", n)
	}
	second, _ := cc.last()
	for _, i := range []int{0, 2} {
		if first.Endpoints[i].Attributes != second.Endpoints[i].Attributes {
			t.Errorf("endpoint %d: attributes rebuilt although the instance did not change", i)
		}
	}
	if first.Endpoints[1].Attributes.Equal(second.Endpoints[1].Attributes) {
		t.Error("attributes of the changed instance compare equal")
	}
}

func TestResolverKeepsLastListWhileRegistryDown(t *testing.T) {
	for _, fault := range []string{"stopped", "paused"} {
		t.Run(fault, func(t *testing.T) {
			e := newMemEnv(t)
			reg := e.NewRegistry(t, 500*time.Millisecond)
			for i, id := range []string{"a", "b", "c"} {
				register(t, reg, registry.Instance{Service: "svc", ID: id, Addr: "127.0.0.1:" + string(rune('1'+i)) + "000"})
			}
			cc := &recordingCC{}
			build(t, grpcresolver.NewBuilder("mem"), e.URL()+"/svc", cc, resolver.BuildOptions{})
			waitFor(t, 5*time.Second, "three endpoints", func() bool { return len(cc.ids()) == 3 })
			if fault == "stopped" {
				e.Stop(t)
			} else {
				e.Pause(t)
			}
			time.Sleep(2 * time.Second) // four TTLs of the registrar: the outage itself
			if n, errs := cc.count(); n != 1 || errs != 0 {
				t.Fatalf("while the registry was %s: %d states and %d errors pushed, want none", fault, n-1, errs)
			}
			if fault == "stopped" {
				e.Start(t)
			} else {
				e.Resume(t)
			}
			// Back: a new instance arrives, the old ones stayed.
			register(t, reg, registry.Instance{Service: "svc", ID: "d", Addr: "127.0.0.1:4000"})
			waitFor(t, 10*time.Second, "four endpoints", func() bool { return len(cc.ids()) == 4 })
			cc.mu.Lock()
			defer cc.mu.Unlock()
			for i, s := range cc.states {
				if len(s.Endpoints) < 3 {
					t.Errorf("state %d has %d endpoints: the list shrank", i, len(s.Endpoints))
				}
			}
		})
	}
}

func TestResolverReportsErrorOnlyWhileNothingIsKnown(t *testing.T) {
	e := newMemEnv(t)
	reg := e.NewRegistry(t, time.Second)
	register(t, reg, registry.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:1000"})
	e.Stop(t)
	cc := &recordingCC{}
	build(t, grpcresolver.NewBuilder("mem"), e.URL()+"/svc", cc, resolver.BuildOptions{})
	waitFor(t, 5*time.Second, "an error", func() bool { _, errs := cc.count(); return errs > 0 })
	cc.mu.Lock()
	err := cc.errs[0]
	cc.mu.Unlock()
	if !errors.Is(err, registry.ErrUnavailable) || !strings.Contains(err.Error(), "no instances known yet") {
		t.Errorf("reported %v; want one that wraps registry.ErrUnavailable and says nothing is known", err)
	}
	if n, _ := cc.count(); n != 0 {
		t.Fatalf("%d states pushed while nothing was known", n)
	}
	e.Start(t)
	waitFor(t, 10*time.Second, "the list", func() bool { return len(cc.ids()) == 1 })
	_, errsBefore := cc.count()
	e.Stop(t)
	time.Sleep(500 * time.Millisecond) // the outage
	e.Start(t)
	if n, errs := cc.count(); n != 1 || errs != errsBefore {
		t.Errorf("after a list was known, an outage pushed %d states and %d errors, want none", n-1, errs-errsBefore)
	}
}

func TestResolverPushesAuthoritativeEmpty(t *testing.T) {
	e := newMemEnv(t)
	reg := e.NewRegistry(t, time.Second)
	rr := register(t, reg, registry.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:1000"})
	cc := &recordingCC{}
	build(t, grpcresolver.NewBuilder("mem"), e.URL()+"/svc", cc, resolver.BuildOptions{})
	waitFor(t, 5*time.Second, "one endpoint", func() bool { return len(cc.ids()) == 1 })
	if err := rr.Deregister(context.Background()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "an empty list", func() bool { n, _ := cc.count(); return n == 2 })
	if s, _ := cc.last(); len(s.Endpoints) != 0 || len(s.Addresses) != 0 {
		t.Fatalf("last state %+v, want empty", s)
	}

	// A service that never had instances gets an empty list, not an error.
	cc2 := &recordingCC{}
	build(t, grpcresolver.NewBuilder("mem"), e.URL()+"/nobody", cc2, resolver.BuildOptions{})
	waitFor(t, 5*time.Second, "an empty list", func() bool { n, _ := cc2.count(); return n == 1 })
	if _, errs := cc2.count(); errs != 0 {
		t.Fatalf("%d errors for a service with no instances", errs)
	}
}

func TestResolverMergesInstancesSharingAnAddress(t *testing.T) {
	e := newMemEnv(t)
	reg := e.NewRegistry(t, time.Second)
	register(t, reg, registry.Instance{Service: "svc", ID: "b", Addr: "127.0.0.1:1000"})
	register(t, reg, registry.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:1000"})
	register(t, reg, registry.Instance{Service: "svc", ID: "c", Addr: "127.0.0.1:2000"})
	cc := &recordingCC{}
	build(t, grpcresolver.NewBuilder("mem"), e.URL()+"/svc", cc, resolver.BuildOptions{})
	waitFor(t, 5*time.Second, "two endpoints", func() bool { return equalStrings(cc.ids(), []string{"a", "c"}) })
}

// countingRegistry counts Lookups (the relists).
type countingRegistry struct {
	registry.Registry
	lookups atomic.Int64
}

func (c *countingRegistry) Lookup(ctx context.Context, service string) ([]registry.Instance, error) {
	c.lookups.Add(1)
	return c.Registry.Lookup(ctx, service)
}

// ResolveNow hints relist only while the watch is stale (issue 13 item 4:
// a live watch's relists were thrown away), and then at most once per
// interval.
func TestResolveNowIsARateLimitedRelist(t *testing.T) {
	e := newMemEnv(t)
	reg := &countingRegistry{Registry: e.NewRegistry(t, time.Second)}
	register(t, reg, registry.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:1000"})
	cc := &recordingCC{}
	const interval = 400 * time.Millisecond
	r := build(t, grpcresolver.NewBuilder("rollcall", grpcresolver.WithRegistry(reg), grpcresolver.WithResolveNowInterval(interval)),
		"rollcall:///svc", cc, resolver.BuildOptions{})
	waitFor(t, 5*time.Second, "one endpoint", func() bool { return len(cc.ids()) == 1 })
	storm := func() {
		start := time.Now()
		for time.Since(start) < 2*time.Second {
			r.ResolveNow(resolver.ResolveNowOptions{})
			time.Sleep(5 * time.Millisecond) // a storm of hints, as failing connections send
		}
	}
	storm()
	if n := reg.lookups.Load(); n != 0 {
		t.Fatalf("%d relists in 2s of hints while the watch was live, want 0", n)
	}
	if s, _ := cc.count(); s != 1 {
		t.Errorf("hints to a live watch pushed %d states", s-1)
	}
	e.Stop(t)
	waitFor(t, 5*time.Second, "the resolver's watch to go stale", func() bool { return grpcresolver.WatchStale(r) })
	storm()
	n := reg.lookups.Load()
	if max := int64(2*time.Second/interval) + 1; n < 2 || n > max {
		t.Fatalf("%d relists in 2s of hints while the watch was stale, want 2..%d", n, max)
	}
}

// splitRegistry watches one registry and looks up in another: a watch that
// is stale while lookups work.
type splitRegistry struct {
	registry.Registry
	lookup registry.Registry
}

func (s splitRegistry) Lookup(ctx context.Context, service string) ([]registry.Instance, error) {
	return s.lookup.Lookup(ctx, service)
}

func TestRelistIsUsedWhileTheWatchIsStale(t *testing.T) {
	watched, looked := newMemEnv(t), newMemEnv(t)
	wreg, lreg := watched.NewRegistry(t, time.Second), looked.NewRegistry(t, time.Second)
	register(t, wreg, registry.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:1000"})
	register(t, wreg, registry.Instance{Service: "svc", ID: "b", Addr: "127.0.0.1:2000"})
	register(t, lreg, registry.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:1000"})
	cc := &recordingCC{}
	r := build(t, grpcresolver.NewBuilder("rollcall", grpcresolver.WithRegistry(splitRegistry{wreg, lreg}), grpcresolver.WithResolveNowInterval(10*time.Millisecond)),
		"rollcall:///svc", cc, resolver.BuildOptions{})
	waitFor(t, 5*time.Second, "a, b", func() bool { return equalStrings(cc.ids(), []string{"a", "b"}) })
	r.ResolveNow(resolver.ResolveNowOptions{})
	waitFor(t, 5*time.Second, "the hint to be served", func() bool { return grpcresolver.HintsServed(r) >= 1 })
	if n := grpcresolver.Relists(r); n != 0 {
		t.Fatalf("a hint to a live watch made %d relists, want none", n)
	}
	if got := cc.ids(); !equalStrings(got, []string{"a", "b"}) {
		t.Fatalf("a relist overrode a live watch: %v", got)
	}
	watched.Stop(t)
	waitFor(t, 5*time.Second, "the resolver's watch to go stale", func() bool { return grpcresolver.WatchStale(r) })
	if got := cc.ids(); !equalStrings(got, []string{"a", "b"}) {
		t.Fatalf("stale watch changed the list: %v", got)
	}
	r.ResolveNow(resolver.ResolveNowOptions{})
	waitFor(t, 5*time.Second, "the relisted a", func() bool { return equalStrings(cc.ids(), []string{"a"}) })
	watched.Start(t)
	waitFor(t, 10*time.Second, "the watch's a, b again", func() bool { return equalStrings(cc.ids(), []string{"a", "b"}) })
}

func TestResolversShareOneRegistryPerURL(t *testing.T) {
	e := newMemEnv(t)
	reg := e.NewRegistry(t, time.Second)
	register(t, reg, registry.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:1000"})
	b := grpcresolver.NewBuilder("mem")
	cc1, cc2, cc3 := &recordingCC{}, &recordingCC{}, &recordingCC{}
	r1 := build(t, b, e.URL()+"/svc", cc1, resolver.BuildOptions{})
	r2 := build(t, b, e.URL()+"/svc", cc2, resolver.BuildOptions{})
	r3 := build(t, b, e.URL()+"/svc?ttl=3s", cc3, resolver.BuildOptions{})
	for _, cc := range []*recordingCC{cc1, cc2, cc3} {
		waitFor(t, 5*time.Second, "one endpoint", func() bool { return len(cc.ids()) == 1 })
	}
	if n := grpcresolver.OpenRegistries(b); n != 2 {
		t.Fatalf("%d registries open for two registry URLs", n)
	}
	r1.Close()
	r1.Close() // idempotent
	if n := grpcresolver.OpenRegistries(b); n != 2 {
		t.Fatalf("%d registries open after one of two sharers closed", n)
	}
	r2.Close()
	r3.Close()
	if n := grpcresolver.OpenRegistries(b); n != 0 {
		t.Fatalf("%d registries open after every resolver closed", n)
	}
	if n := e.srv.Watches(); n != 0 {
		t.Fatalf("%d watches left open on the server", n)
	}
}

func TestServiceConfigOptions(t *testing.T) {
	e := newMemEnv(t)
	for _, tc := range []struct {
		name    string
		b       resolver.Builder
		bo      resolver.BuildOptions
		want    []string
		wantNil bool
	}{
		{"custom", grpcresolver.NewBuilder("mem", grpcresolver.WithServiceConfig(`{"loadBalancingConfig":[{"pick_first":{}}]}`)), resolver.BuildOptions{},
			[]string{`{"loadBalancingConfig":[{"pick_first":{}}]}`}, false},
		{"none", grpcresolver.NewBuilder("mem", grpcresolver.WithServiceConfig("")), resolver.BuildOptions{}, nil, true},
		{"disabled by the channel", grpcresolver.NewBuilder("mem"), resolver.BuildOptions{DisableServiceConfig: true}, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cc := &recordingCC{}
			build(t, tc.b, e.URL()+"/svc", cc, tc.bo)
			waitFor(t, 5*time.Second, "a state", func() bool { n, _ := cc.count(); return n == 1 })
			s, _ := cc.last()
			if (s.ServiceConfig == nil) != tc.wantNil || !equalStrings(cc.sc, tc.want) {
				t.Fatalf("service config %v, parsed %q; want nil=%v, %q", s.ServiceConfig, cc.sc, tc.wantNil, tc.want)
			}
		})
	}
}

func TestBuildErrors(t *testing.T) {
	e := newMemEnv(t)
	empty := new(registry.URLMux)
	for _, tc := range []struct {
		target string
		b      resolver.Builder
		want   string
		is     error
	}{
		{e.URL(), grpcresolver.NewBuilder("mem"), "service name as the last path segment", grpcresolver.ErrInvalidTarget},
		{e.URL() + "/", grpcresolver.NewBuilder("mem"), "service name as the last path segment", grpcresolver.ErrInvalidTarget},
		{e.URL() + "/svc/", grpcresolver.NewBuilder("mem"), "service name as the last path segment", grpcresolver.ErrInvalidTarget},
		{"mem:svc", grpcresolver.NewBuilder("mem"), "service name as the last path segment", grpcresolver.ErrInvalidTarget},
		{e.URL() + "/s%20vc", grpcresolver.NewBuilder("mem"), "contains", registry.ErrInvalidInstance},
		{e.URL() + "/svc?ttl=banana", grpcresolver.NewBuilder("mem"), "ttl", registry.ErrInvalidURL},
		{"mem://x/prefix/svc", grpcresolver.NewBuilder("mem"), "mem://NAME", registry.ErrInvalidURL},
		{"etcd://127.0.0.1:2379/svc", grpcresolver.NewBuilder("etcd", grpcresolver.WithURLMux(empty)),
			`forgotten import?); link the backend with import _ "github.com/rollcall-go/rollcall/backends/etcd"`, registry.ErrUnknownScheme},
		{"etcd://u:s3cret@127.0.0.1:2379/svc", grpcresolver.NewBuilder("etcd", grpcresolver.WithURLMux(empty)), "xxxxx", registry.ErrUnknownScheme},
		{"rollcall://host/svc", grpcresolver.NewBuilder("rollcall", grpcresolver.WithRegistry(e.NewRegistry(t, time.Second))), "want rollcall:///SERVICE", grpcresolver.ErrInvalidTarget},
		{e.URL() + "/svc", grpcresolver.NewBuilder("mem", grpcresolver.WithServiceConfig("{")), "service config", nil},
	} {
		u, err := url.Parse(tc.target)
		if err != nil {
			t.Fatal(err)
		}
		r, err := tc.b.Build(resolver.Target{URL: *u}, &badConfigCC{}, resolver.BuildOptions{})
		if err == nil {
			r.Close()
			t.Errorf("Build(%q) succeeded", tc.target)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) || tc.is != nil && !errors.Is(err, tc.is) || strings.Contains(err.Error(), "s3cret") {
			t.Errorf("Build(%q) = %v; want an error containing %q and wrapping %v", tc.target, err, tc.want, tc.is)
		}
	}
}

// badConfigCC rejects "{" as a service config.
type badConfigCC struct{ recordingCC }

func (*badConfigCC) ParseServiceConfig(js string) *serviceconfig.ParseResult {
	if js == "{" {
		return &serviceconfig.ParseResult{Err: errors.New("unexpected end of JSON input")}
	}
	return &serviceconfig.ParseResult{}
}

func TestSplitTarget(t *testing.T) {
	for _, tc := range []struct{ target, reg, service string }{
		{"etcd://127.0.0.1:2379/user.rpc", "etcd://127.0.0.1:2379", "user.rpc"},
		{"etcd://h1:2379,h2:2379/user.rpc", "etcd://h1:2379,h2:2379", "user.rpc"},
		{"etcd://h:2379/team-a/user.rpc", "etcd://h:2379/team-a", "user.rpc"},
		{"etcd://h:2379/a/b/user.rpc?ttl=5s", "etcd://h:2379/a/b?ttl=5s", "user.rpc"},
		{"etcd:///user.rpc", "etcd:///", "user.rpc"},
		{"k8s:///user:8080", "k8s:///", "user:8080"},
		{"mem://demo/user.rpc", "mem://demo", "user.rpc"},
		{"k8s://default/user:8080", "k8s://default", "user:8080"},
		{"consul://u:p@h:8500/user.rpc?token=t", "consul://u:p@h:8500?token=t", "user.rpc"},
		{"etcd://h:2379/user.rpc?ttl=5s&meta.version=v2", "etcd://h:2379?ttl=5s", "user.rpc"},
		{"etcd://h:2379/user.rpc?meta.version=v2&meta.canary=true", "etcd://h:2379", "user.rpc"},
		{"etcd://h:2379/user.rpc?ttl=5s&x=meta.y", "etcd://h:2379?ttl=5s&x=meta.y", "user.rpc"},
		{"etcd://h:2379/user.rpc?ttl=5s&meta.version=v2&dial-timeout=1s", "etcd://h:2379?ttl=5s&dial-timeout=1s", "user.rpc"},
		{"rollcall+etcd://h:2379/team-a/user.rpc?layout=gozero", "etcd://h:2379/team-a?layout=gozero", "user.rpc"},
		{"rollcall+k8s://default/user:8080", "k8s://default", "user:8080"},
	} {
		reg, svc, err := grpcresolver.SplitTarget(tc.target)
		if err != nil || reg != tc.reg || svc != tc.service {
			t.Errorf("SplitTarget(%q) = %q, %q, %v; want %q, %q", tc.target, reg, svc, err, tc.reg, tc.service)
		}
	}
	for _, bad := range []string{"etcd://h:2379", "etcd://h:2379/", "user.rpc", "etcd:user.rpc", "etcd://h/a b", "%zz"} {
		if _, _, err := grpcresolver.SplitTarget(bad); !errors.Is(err, grpcresolver.ErrInvalidTarget) {
			t.Errorf("SplitTarget(%q) = %v, want ErrInvalidTarget", bad, err)
		}
	}
}

func TestKnownSchemesAreRegisteredWithGRPC(t *testing.T) {
	for _, s := range grpcresolver.KnownSchemes {
		for _, name := range []string{s, grpcresolver.SchemePrefix + s} {
			if b := resolver.Get(name); b == nil || b.Scheme() != name {
				t.Errorf("scheme %q: gRPC has builder %v", name, b)
			}
		}
	}
}

// TestPrefixedSchemeResolvesAsThePlainOne: a rollcall+mem:// target reaches
// the instances that the same mem:// registry holds.
func TestPrefixedSchemeResolvesAsThePlainOne(t *testing.T) {
	e := newMemEnv(t)
	reg := e.NewRegistry(t, 15*time.Second)
	register(t, reg, registry.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:1000"})
	u := e.URL()
	b := resolver.Get(grpcresolver.SchemePrefix + schemeOf(u))
	cc := &recordingCC{}
	build(t, b, grpcresolver.SchemePrefix+u+"/svc", cc, resolver.BuildOptions{})
	waitFor(t, 10*time.Second, "instance a", func() bool { return slices.Equal(cc.ids(), []string{"a"}) })
}

func TestNewBuilderPanicsOnBadScheme(t *testing.T) {
	for _, s := range []string{"", "Etcd", "1x", "a b"} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("NewBuilder(%q) did not panic", s)
				}
			}()
			grpcresolver.NewBuilder(s)
		}()
	}
}

// testCloseWhileRegistryFrozen: Close returns promptly, with every goroutine
// gone (goleak checks at the end), while the registry answers nothing.
func testCloseWhileRegistryFrozen(t *testing.T, e env) {
	reg := e.NewRegistry(t, 15*time.Second)
	register(t, reg, registry.Instance{Service: "svc", ID: "a", Addr: "127.0.0.1:1000"})
	b := grpcresolver.NewBuilder(schemeOf(e.URL()))
	cc := &recordingCC{}
	r := build(t, b, e.URL()+"/svc", cc, resolver.BuildOptions{})
	waitFor(t, 10*time.Second, "one endpoint", func() bool { return len(cc.ids()) == 1 })
	e.Pause(t)
	defer e.Resume(t)
	// A relist runs only while the watch is stale; once it has begun it
	// waits on the frozen registry.
	waitFor(t, 20*time.Second, "the watch to say stale", func() bool { return grpcresolver.WatchStale(r) })
	r.ResolveNow(resolver.ResolveNowOptions{})
	waitFor(t, 10*time.Second, "a relist to begin", func() bool { return grpcresolver.Relists(r) > 0 })
	start := time.Now()
	r.Close()
	if took := time.Since(start); took > 3*time.Second {
		t.Fatalf("Close took %v while the registry was frozen", took)
	}
	if n := grpcresolver.OpenRegistries(b); n != 0 {
		t.Fatalf("%d registries left open", n)
	}
}

func TestCloseWhileRegistryFrozen(t *testing.T) {
	t.Run("mem", func(t *testing.T) { testCloseWhileRegistryFrozen(t, newMemEnv(t)) })
	t.Run("etcd", func(t *testing.T) { testCloseWhileRegistryFrozen(t, newEtcdEnv(t)) })
}
