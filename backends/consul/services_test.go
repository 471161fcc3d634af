package consul_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/backends/consul"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// Services lists the catalog's services of the Registry's prefix, without
// the heartbeat service and without a service whose every instance is
// critical (it lingers in the catalog until Consul reaps it); a service
// registered by another tool without checks is listed, and so is Consul's
// own service "consul" (its servers), as `consul catalog services` lists it.
func TestServicesListsPassingServicesOfThePrefix(t *testing.T) {
	srv := testserver.StartConsulServer(t)
	ra, _ := newRegistry(t, srv.Addr(), consul.Options{TTL: 2 * time.Second, Prefix: "team-a"})
	none, _ := newRegistry(t, srv.Addr(), consul.Options{TTL: 2 * time.Second})
	var order *registry.Registration
	for _, c := range []struct {
		r   registry.Registry
		svc string
	}{{ra, "billing"}, {none, "user"}, {none, "order"}} {
		reg, err := c.r.Register(ctxFor(t, 10*time.Second), instance(c.svc, "a", 9001))
		if err != nil {
			t.Fatal(err)
		}
		order = reg
	}
	admin := newClient(t, srv.Addr(), newCutTransport())
	for _, s := range []*api.AgentServiceRegistration{
		{Name: "unchecked", ID: "unchecked-1", Port: 9002},
		// A TTL check starts critical: an instance that never renewed.
		{Name: "dead", ID: "dead-1", Port: 9003, Check: &api.AgentServiceCheck{TTL: "1h"}},
		{Name: "team-ab/user", ID: "ab-1", Port: 9004},
	} {
		if err := admin.Agent().ServiceRegister(s); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		name string
		r    registry.Registry
		want []string
	}{{"no prefix", none, []string{"consul", "order", "unchecked", "user"}}, {"team-a", ra, []string{"billing"}}} {
		waitUntil(t, 10*time.Second, fmt.Sprintf("%s: Services = %q", c.name, c.want), func() bool {
			got, err := c.r.Services(ctxFor(t, 10*time.Second))
			return err == nil && slices.Equal(got, c.want)
		})
	}
	// Its last instance deregistered, a service is no longer listed.
	if err := order.Deregister(ctxFor(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "order to be unlisted", func() bool {
		got, err := none.Services(ctxFor(t, 10*time.Second))
		return err == nil && slices.Equal(got, []string{"consul", "unchecked", "user"})
	})
}
