package consul_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/backends/consul"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// Registries with different prefixes never see each other's instances, also
// when one prefix is a prefix of the other, and a Registry without a prefix
// sees none of theirs. The URL's path is the prefix.
func TestPrefixesIsolate(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	ra, _ := newRegistry(t, srv.Addr(), consul.Options{TTL: 2 * time.Second, Prefix: "team-a"})
	rab, _ := newRegistry(t, srv.Addr(), consul.Options{TTL: 2 * time.Second, Prefix: "team-ab"})
	none, _ := newRegistry(t, srv.Addr(), consul.Options{TTL: 2 * time.Second})
	fromURL, err := registry.Open(context.Background(), "consul://"+srv.Addr()+"/team-a?ttl=2s")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fromURL.Close() })
	for _, c := range []struct {
		r  registry.Registry
		id string
	}{{ra, "a"}, {rab, "ab"}, {none, "none"}} {
		if _, err := c.r.Register(ctxFor(t, 10*time.Second), instance("user", c.id, 9001)); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		name string
		r    registry.Registry
		want []string
	}{{"team-a", ra, []string{"a"}}, {"team-ab", rab, []string{"ab"}}, {"none", none, []string{"none"}}, {"URL /team-a", fromURL, []string{"a"}}} {
		list, err := c.r.Lookup(ctxFor(t, 10*time.Second), "user")
		if err != nil || !slices.Equal(ids(list), c.want) {
			t.Errorf("%s: Lookup = %v, %v; want %v", c.name, ids(list), err, c.want)
		}
		ch := watchUpdates(t, c.r, "user")
		nextUpdate(t, ch, 10*time.Second, c.name+" sees only its own", func(u registry.Update) bool {
			return !u.Stale && slices.Equal(ids(u.Instances()), c.want)
		})
	}
	admin := newClient(t, srv.Addr(), newCutTransport())
	names, _, err := admin.Catalog().Services(qopts(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"user", "team-a/user", "team-ab/user", "team-a/rollcall-session", "team-ab/rollcall-session", "rollcall-session"} {
		waitUntil(t, 10*time.Second, "service "+n+" in the catalog", func() bool {
			names, _, err = admin.Catalog().Services(qopts(t))
			_, ok := names[n]
			return err == nil && ok
		})
	}
}
