package grpcresolver_test

import (
	"context"
	"errors"
	"net/url"
	"testing"
	"time"

	"google.golang.org/grpc/resolver"

	"github.com/rollcall-go/rollcall/grpcresolver"
	"github.com/rollcall-go/rollcall/registry"
)

func testTargetFilterFollowsAMetadataChange(t *testing.T, e env) {
	version := func(v string) map[string]string { return map[string]string{registry.MetaVersion: v} }
	v1 := startServer(t, e, "echo", "a", time.Second, version("v1"))
	v2 := startServer(t, e, "echo", "b", time.Second, version("v2"))
	conn := dial(t, e.URL()+"/echo?"+grpcresolver.FilterParamPrefix+"version=v2")
	waitAllServing(t, conn, []*server{v2})
	if counts := callN(t, conn, 200); counts[v2.addr] != 200 {
		t.Fatalf("calls to version v2 went to %v; want all on %s", counts, v2.addr)
	}

	// a is upgraded to v2 in place: it receives calls.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := v1.rr.Update(ctx, registry.Instance{Service: "echo", ID: "a", Addr: v1.addr, Metadata: version("v2")}); err != nil {
		t.Fatal(err)
	}
	waitAllServing(t, conn, []*server{v1, v2})
	// b is downgraded to v1: it receives none.
	if err := v2.rr.Update(ctx, registry.Instance{Service: "echo", ID: "b", Addr: v2.addr, Metadata: version("v1")}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "50 calls in a row served by a", func() bool {
		for range 50 {
			if addr, err := call(context.Background(), conn); err != nil || addr != v1.addr {
				return false
			}
		}
		return true
	})
	if counts := callN(t, conn, 200); counts[v1.addr] != 200 {
		t.Fatalf("after the downgrade of b: %v; want all on %s", counts, v1.addr)
	}
}

func TestFiltersFromTargetAndCodeCombine(t *testing.T) {
	e := newMemEnv(t)
	reg := e.NewRegistry(t, time.Second)
	for _, in := range []registry.Instance{
		{ID: "a", Addr: "127.0.0.1:1001", Metadata: map[string]string{"version": "v1", "canary": "true"}},
		{ID: "b", Addr: "127.0.0.1:1002", Metadata: map[string]string{"version": "v2", "canary": "true"}},
		{ID: "c", Addr: "127.0.0.1:1003", Metadata: map[string]string{"version": "v2"}},
		{ID: "d", Addr: "127.0.0.1:1004", Metadata: map[string]string{"version": "v3", "canary": "true"}},
	} {
		in.Service = "svc"
		register(t, reg, in)
	}
	notA := func(in registry.Instance) bool { return in.ID != "a" }
	for _, tc := range []struct {
		name   string
		query  string
		filter func(registry.Instance) bool
		want   []string
	}{
		{"none", "", nil, []string{"a", "b", "c", "d"}},
		{"one key", "?meta.version=v2", nil, []string{"b", "c"}},
		{"two values of a key: either", "?meta.version=v2&meta.version=v3", nil, []string{"b", "c", "d"}},
		{"two keys: both", "?meta.version=v2&meta.canary=true", nil, []string{"b"}},
		{"an empty value matches a missing key", "?meta.canary=", nil, []string{"c"}},
		{"from code", "", notA, []string{"b", "c", "d"}},
		{"from code and target", "?meta.canary=true", notA, []string{"b", "d"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var opts []grpcresolver.Option
			if tc.filter != nil {
				opts = append(opts, grpcresolver.WithFilter(tc.filter))
			}
			cc := &recordingCC{}
			build(t, grpcresolver.NewBuilder("mem", opts...), e.URL()+"/svc"+tc.query, cc, resolver.BuildOptions{})
			waitFor(t, 5*time.Second, "a state", func() bool { n, _ := cc.count(); return n > 0 })
			if got := cc.ids(); !equalStrings(got, tc.want) {
				t.Fatalf("endpoints %v, want %v", got, tc.want)
			}
			// With a registry given to the builder, the same parameters work.
			cc = &recordingCC{}
			build(t, grpcresolver.NewBuilder("rollcall", append(opts, grpcresolver.WithRegistry(reg))...), "rollcall:///svc"+tc.query, cc, resolver.BuildOptions{})
			waitFor(t, 5*time.Second, "a state", func() bool { n, _ := cc.count(); return n > 0 })
			if got := cc.ids(); !equalStrings(got, tc.want) {
				t.Fatalf("with WithRegistry: endpoints %v, want %v", got, tc.want)
			}
		})
	}
}

func TestBadTargetFilters(t *testing.T) {
	e := newMemEnv(t)
	reg := e.NewRegistry(t, time.Second)
	for _, tc := range []struct {
		b      resolver.Builder
		target string
	}{
		{grpcresolver.NewBuilder("mem"), e.URL() + "/svc?meta.=v2"},
		{grpcresolver.NewBuilder("rollcall", grpcresolver.WithRegistry(reg)), "rollcall:///svc?meta.version=v2&ttl=5s"},
	} {
		u, err := url.Parse(tc.target)
		if err != nil {
			t.Fatal(err)
		}
		r, err := tc.b.Build(resolver.Target{URL: *u}, &recordingCC{}, resolver.BuildOptions{})
		if !errors.Is(err, grpcresolver.ErrInvalidTarget) {
			if r != nil {
				r.Close()
			}
			t.Errorf("Build(%q) = %v, want ErrInvalidTarget", tc.target, err)
		}
	}
}

func TestTargetsThatDifferInFiltersShareARegistry(t *testing.T) {
	e := newMemEnv(t)
	b := grpcresolver.NewBuilder("mem")
	build(t, b, e.URL()+"/svc?ttl=5s&meta.version=v2", &recordingCC{}, resolver.BuildOptions{})
	build(t, b, e.URL()+"/svc?ttl=5s", &recordingCC{}, resolver.BuildOptions{})
	build(t, b, e.URL()+"/other?meta.zone=a&ttl=5s", &recordingCC{}, resolver.BuildOptions{})
	if n := grpcresolver.OpenRegistries(b); n != 1 {
		t.Fatalf("%d registries open for one registry URL", n)
	}
}
