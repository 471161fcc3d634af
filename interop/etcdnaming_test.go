package interop

import (
	"testing"
	"time"

	etcdresolver "go.etcd.io/etcd/client/v3/naming/resolver"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

// TestEtcdResolverReadsRollcallKeys: etcd's own gRPC resolver
// (go.etcd.io/etcd/client/v3/naming/resolver) reads the default layout,
// whose values are naming/endpoints' {"Addr":...,"Metadata":...}. Its target
// is etcd:/// followed by the service directory without its trailing '/':
// the resolver drops one leading '/' of the URL path, and the directory
// starts with one, hence four slashes: etcd:////rollcall/user.rpc for
// registry URL etcd://h:2379 and service user.rpc, and
// etcd:////rollcall/team-a/user.rpc for prefix team-a.
func TestEtcdResolverReadsRollcallKeys(t *testing.T) {
	ep := startEtcd(t)
	b, err := etcdresolver.NewBuilder(adminClient(t, ep))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ registryURL, target string }{
		{"etcd://" + ep, "etcd:////rollcall/user.rpc"},
		{"etcd://" + ep + "/team-a", "etcd:////rollcall/team-a/user.rpc"},
	} {
		srv := serveHealth(t)
		r := open(t, tc.registryURL)
		if _, err := r.Register(ctxT(t), registry.Instance{Service: "user.rpc", ID: "a", Addr: srv, Metadata: map[string]string{"zone": "z1"}}); err != nil {
			t.Fatal(err)
		}
		conn, err := grpc.NewClient(tc.target, grpc.WithResolvers(b), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		testutil.WaitFor(t, 10*time.Second, "a call through etcd's resolver, target "+tc.target, func() bool {
			return checkHealth(ctxT(t), conn) == nil
		})
		conn.Close()
	}
}
