package consul_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/conformance"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/internal/testserver/provider"
	"github.com/rollcall-go/rollcall/registry"
)

var _ conformance.ClusterMaker = (*harness)(nil)

// MakeCluster starts 3 Consul servers and a client agent joined to them, as
// child processes (see testserver.StartConsulCluster); the registries talk
// to the client agent, as production clients talk to their local agent. The
// container pass declines: the same properties run in the child-process
// pass.
func (h *harness) MakeCluster(ctx context.Context, t *testing.T) (conformance.Cluster, error) {
	if provider.Containers(t) {
		return nil, fmt.Errorf("%w: the cluster properties run in the child-process pass (ROLLCALL_TEST_SERVERS unset)", conformance.ErrUnsupported)
	}
	return &cluster{c: testserver.StartConsulCluster(t, 3)}, nil
}

type cluster struct{ c *testserver.ConsulCluster }

var _ conformance.Limited = (*cluster)(nil)

// Limitation: with one server frozen (SIGSTOP: its connections stay open),
// the client agent keeps sending its RPCs to that server until gossip marks
// it failed (about 6s), a request already sent there waits out
// rpc_client_timeout (60s), and while the agent's anti-entropy sync waits
// for a server it holds the lock on the agent's local state (Consul's
// agent/local/state.go SyncChanges), so local registrations, deregistrations
// and TTL updates wait too. Measured: a Register made during the freeze ran
// out of a 10s context (CallTimeout 10s). A client that talks to one agent
// has nowhere else to go; the other cluster properties hold.
func (c *cluster) Limitation(property string) string {
	if property == "ClusterWatchFollowsChangesWhileAMemberIsFrozen" {
		return "Consul's client agent stalls while the server it uses is frozen: it keeps using that server until gossip marks it failed " +
			"(about 6s), and its anti-entropy sync holds the agent's local-state lock meanwhile, so a Register through the agent " +
			"during the freeze does not return within 10s (measured with CallTimeout 10s)"
	}
	return ""
}

// MakeRegistry opens the client agent as a user's configuration would.
func (c *cluster) MakeRegistry(ctx context.Context, ttl time.Duration) (registry.Registry, error) {
	return registry.Open(ctx, "consul://"+c.c.ClientAddr()+"/?ttl="+ttl.String())
}

func (c *cluster) Members() int                            { return len(c.c.Servers) }
func (c *cluster) Leader(ctx context.Context) (int, error) { return c.c.Leader(ctx) }
func (c *cluster) Freeze(_ context.Context, i int) error {
	c.c.Freeze(i)
	return nil
}
func (c *cluster) Thaw(_ context.Context, i int) error {
	c.c.Thaw(i)
	return nil
}
func (c *cluster) Stop(_ context.Context, i int) error {
	c.c.Stop(i)
	return nil
}
func (c *cluster) Start(_ context.Context, i int) error {
	c.c.Start(i)
	return nil
}
func (c *cluster) WaitHealthy(ctx context.Context) error { return c.c.WaitHealthy(ctx) }
