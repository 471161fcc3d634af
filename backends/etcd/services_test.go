package etcd_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/internal/testserver/provider"
	"github.com/rollcall-go/rollcall/registry"
)

// Services lists the service directories of the URL's prefix that hold an
// instance key: not the keys of a deeper prefix, nor keys that are not
// ROOT SERVICE/ID, nor those of another prefix.
func TestServicesListsThePrefixOnly(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	srv := provider.StartEtcd(t)
	admin := newClient(t, srv.Endpoint())
	defer admin.Close()
	open := func(path string) registry.Registry {
		r, err := registry.Open(ctx, "etcd://"+srv.Endpoint()+path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = r.Close() })
		return r
	}
	root, team := open("/"), open("/team-a")
	for _, in := range []struct {
		r         registry.Registry
		svc, addr string
	}{{root, "user", "127.0.0.1:1001"}, {root, "user", "127.0.0.1:1002"}, {root, "order", "127.0.0.1:1003"}, {team, "billing", "127.0.0.1:1004"}} {
		if _, err := in.r.Register(ctx, registry.Instance{Service: in.svc, Addr: in.addr}); err != nil {
			t.Fatal(err)
		}
	}
	for k, v := range map[string]string{
		"/rollcall/lonely":         "{}", // no ID
		"/rollcall/deep/a/b":       "{}", // nested
		"/rollcall/team-ab/x/y":    "{}", // another prefix, seen from root as nested too
		"/rollcallx/other/id":      "{}", // outside the prefix
		"/rollcall/team-a/lonely/": "{}", // empty ID
	} {
		if _, err := admin.Put(ctx, k, v); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		r    registry.Registry
		want []string
	}{{root, []string{"order", "user"}}, {team, []string{"billing"}}, {open("/nobody"), []string{}}} {
		got, err := tc.r.Services(ctx)
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("Services = %q, %v; want %q", got, err, tc.want)
		}
	}
}
