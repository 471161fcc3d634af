package consul_test

import (
	"slices"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/backends/consul"
	"github.com/rollcall-go/rollcall/internal/testserver/containers"
	"github.com/rollcall-go/rollcall/registry"
)

// TestPartitionedRegistrarComesBackRegistered cuts the registrar, and only
// the registrar, off from the agent for longer than its TTL: its session
// check goes critical on the agent, every other client sees the instance
// go, and once the partition heals the instance is back, registered, with
// no help.
//
// The registrar reaches the agent through a proxy container on a
// user-defined network; the partition is `docker network disconnect` of the
// agent's container from that network, while the observer keeps talking to
// the agent through its published port. Only the container provider can do
// this.
func TestPartitionedRegistrarComesBackRegistered(t *testing.T) {
	if !containers.Selected() {
		t.Skipf("needs %s=%s: the partition is a Docker network disconnect between a proxy container and the Consul container, which child processes on loopback cannot do",
			containers.EnvServers, containers.Provider)
	}
	const ttl = 2 * time.Second
	nw := containers.NewNetwork(t)
	srv := containers.StartConsul(t)
	srv.Connect(nw, "consul")
	px := containers.StartProxy(t, nw, "consul:8500")

	r, _ := newRegistry(t, px.Endpoint(), consul.Options{TTL: ttl})
	// The observer's own requests to the published port fail for a moment
	// when the agent's container leaves the proxy's network (seen here:
	// connection refused), and its watch then backs off: with the default
	// backoff (up to 10s) and the resync grace after it, a CI run saw no
	// removal within 20s. A short backoff keeps the observer's recovery out
	// of the measure.
	observer, _ := newRegistry(t, srv.Addr(), consul.Options{TTL: ttl, Registry: registry.Options{Backoff: registry.Backoff{Min: 50 * time.Millisecond, Max: 500 * time.Millisecond}}})
	const svc, id = "partition.rpc", "p1"
	updates := watchUpdates(t, observer, svc)
	reg, err := r.Register(ctxFor(t, 30*time.Second), instance(svc, id, 9001))
	if err != nil {
		t.Fatal(err)
	}
	present := func(u registry.Update) bool { return !u.Stale && slices.Contains(ids(u.Instances()), id) }
	nextUpdate(t, updates, 10*time.Second, "the instance", present)

	srv.Disconnect(nw)
	cut := time.Now()
	nextUpdate(t, updates, 5*ttl+20*time.Second, "the instance gone (its check critical)", func(u registry.Update) bool {
		return !u.Stale && !present(u)
	})
	t.Logf("the instance went %v after the partition began", time.Since(cut).Round(10*time.Millisecond))

	srv.Connect(nw, "consul")
	healed := time.Now()
	nextUpdate(t, updates, 60*time.Second, "the instance registered again", present)
	t.Logf("registered again %v after the partition healed", time.Since(healed).Round(10*time.Millisecond))
	// Either the registrar found its session check critical and registered
	// again, or a renewal that got through first made the check pass again
	// (the renewal round's state read can fail while the proxy reconnects):
	// both bring the same instance back, and the registration says so.
	waitUntil(t, 10*time.Second, "the registration to be registered", func() bool {
		return reg.Status().State == registry.Registered
	})
	t.Logf("registration status after the partition: %+v", reg.Status())
}
