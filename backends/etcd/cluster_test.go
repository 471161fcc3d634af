package etcd_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/rollcall-go/rollcall/backends/etcd"
	"github.com/rollcall-go/rollcall/conformance"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/internal/testserver/provider"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

var _ conformance.ClusterMaker = (*harness)(nil)

// MakeCluster starts a 3-member etcd (100/1000 ms heartbeat and election,
// as on a LAN) as child processes. The container pass declines: the same
// properties run in the child-process pass, and a container per member
// would add minutes for nothing new.
func (h *harness) MakeCluster(ctx context.Context, t *testing.T) (conformance.Cluster, error) {
	if h.layout != "" {
		return nil, fmt.Errorf("%w: the cluster properties run with the default layout (a layout is only the codec of keys and values; the machinery they test is the same)", conformance.ErrUnsupported)
	}
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

// TestLeaderElectionMovesRegistrationsToANewLease: etcd renews leases on
// the leader only, so a leader frozen past the TTL finds the registrar's
// lease expired when it resumes and can revoke it through the new leader
// before it learns it lost the lead (etcd-io/etcd#15247; seen here as all
// instances of a live registrar deleted right after the thaw). Once a
// response shows a later term, the registrations move to a lease granted in
// it and the old lease is revoked; no key of theirs is ever deleted.
func TestLeaderElectionMovesRegistrationsToANewLease(t *testing.T) {
	c := testserver.StartEtcdCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	r, err := registry.Open(ctx, "etcd://"+strings.Join(c.Endpoints(), ",")+"/?ttl=5s")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	const n = 5
	var keys []string
	for i := range n {
		in := registry.Instance{Service: "moved", ID: fmt.Sprintf("i%d", i), Addr: fmt.Sprintf("127.0.0.1:%d", 7000+i)}
		reg, err := r.Register(ctx, in)
		if err != nil {
			t.Fatal(err)
		}
		defer reg.Deregister(context.Background())
		keys = append(keys, etcd.DefaultPrefix+"moved/"+in.ID)
	}
	leader, err := c.Leader()
	if err != nil {
		t.Fatal(err)
	}
	// An admin client of the members that stay up.
	var healthy []string
	for i, m := range c.Members {
		if i != leader {
			healthy = append(healthy, m.Endpoint())
		}
	}
	admin, err := clientv3.New(clientv3.Config{Endpoints: healthy, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	start, err := admin.Get(ctx, etcd.DefaultPrefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(start.Kvs) != n {
		t.Fatalf("%d keys registered, want %d", len(start.Kvs), n)
	}
	first := clientv3.LeaseID(start.Kvs[0].Lease)
	c.Members[leader].Pause()
	thawed := false
	thaw := func() {
		if !thawed {
			thawed = true
			c.Members[leader].Resume()
		}
	}
	defer thaw()
	testutil.WaitFor(t, 15*time.Second, "a leader among the members left", func() bool {
		l, err := c.Leader()
		return err == nil && l != leader
	})
	// The registrar hears of the new term in its next keepalive answer.
	var moved clientv3.LeaseID
	testutil.WaitFor(t, 10*time.Second, "every key to carry one lease other than the first", func() bool {
		cctx, ccancel := context.WithTimeout(ctx, time.Second)
		defer ccancel()
		resp, err := admin.Get(cctx, etcd.DefaultPrefix, clientv3.WithPrefix())
		if err != nil || len(resp.Kvs) != n {
			return false
		}
		moved = clientv3.LeaseID(resp.Kvs[0].Lease)
		for _, kv := range resp.Kvs {
			if clientv3.LeaseID(kv.Lease) != moved || moved == first {
				return false
			}
		}
		return true
	})
	testutil.WaitFor(t, 10*time.Second, "the first lease to be revoked", func() bool {
		cctx, ccancel := context.WithTimeout(ctx, time.Second)
		defer ccancel()
		ttl, err := admin.TimeToLive(cctx, first)
		return err == nil && ttl.TTL == -1
	})
	thaw()
	c.WaitHealthy()
	// Every event since the registrations, up to a marker written after the
	// thaw: none deletes one of them.
	mark, err := admin.Put(ctx, "/marker", "x")
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	seen := false
	for resp := range admin.Watch(wctx, "/", clientv3.WithPrefix(), clientv3.WithRev(start.Header.Revision+1)) {
		for _, ev := range resp.Events {
			if ev.Type == mvccpb.DELETE && slices.Contains(keys, string(ev.Kv.Key)) {
				t.Errorf("%s deleted at revision %d", ev.Kv.Key, ev.Kv.ModRevision)
			}
			if ev.Kv.ModRevision >= mark.Header.Revision {
				seen = true
			}
		}
		if seen || resp.Err() != nil {
			break
		}
	}
	if !seen {
		t.Fatalf("the watch did not reach the marker's revision %d", mark.Header.Revision)
	}
	resp, err := admin.Get(ctx, etcd.DefaultPrefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != n {
		t.Fatalf("after the thaw %d keys, want %d", len(resp.Kvs), n)
	}
	t.Logf("keys moved from lease %x to %x", int64(first), int64(moved))
}
