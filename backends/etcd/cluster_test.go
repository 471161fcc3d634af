package etcd_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/rollcall-go/rollcall/conformance"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/internal/testserver/provider"
	"github.com/rollcall-go/rollcall/registry"
)

var _ conformance.ClusterMaker = (*harness)(nil)

// MakeCluster starts a 3-member etcd (100/1000 ms heartbeat and election,
// as on a LAN) as child processes. The container pass declines: the same
// properties run in the child-process pass, and a container per member
// would add minutes for nothing new.
func (h *harness) MakeCluster(ctx context.Context, t *testing.T) (conformance.Cluster, error) {
	if provider.Containers(t) {
		return nil, fmt.Errorf("%w: the cluster properties run in the child-process pass (ROLLCALL_TEST_SERVERS unset)", conformance.ErrUnsupported)
	}
	return &cluster{c: testserver.StartEtcdCluster(t, 3)}, nil
}

type cluster struct{ c *testserver.EtcdCluster }

// MakeRegistry opens the cluster as a user's configuration would: every
// member's endpoint in the URL.
func (c *cluster) MakeRegistry(ctx context.Context, ttl time.Duration) (registry.Registry, error) {
	return registry.Open(ctx, "etcd://"+strings.Join(c.c.Endpoints(), ",")+"/?ttl="+ttl.String())
}

func (c *cluster) Members() int                        { return len(c.c.Members) }
func (c *cluster) Leader(context.Context) (int, error) { return c.c.Leader() }
func (c *cluster) Freeze(_ context.Context, i int) error {
	c.c.Members[i].Pause()
	return nil
}
func (c *cluster) Thaw(_ context.Context, i int) error {
	c.c.Members[i].Resume()
	return nil
}
func (c *cluster) Stop(_ context.Context, i int) error {
	c.c.Members[i].Stop()
	return nil
}
func (c *cluster) Start(_ context.Context, i int) error {
	c.c.Members[i].Start()
	return nil
}
func (c *cluster) WaitHealthy(context.Context) error {
	c.c.WaitHealthy()
	return nil
}
