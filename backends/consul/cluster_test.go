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
