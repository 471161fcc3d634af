package etcd_test

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/rollcall-go/rollcall/backends/etcd"
	"github.com/rollcall-go/rollcall/internal/testserver/containers"
	"github.com/rollcall-go/rollcall/registry"
)

// TestPartitionedRegistrarComesBackRegistered cuts the registrar, and only
// the registrar, off from etcd for longer than its lease's TTL: the lease
// expires on the server, every other client sees the instance go, and once
// the partition heals the registrar registers it again by itself.
//
// The registrar reaches etcd through a proxy container on a user-defined
// network; the partition is `docker network disconnect` of the etcd
// container from that network, while the observer keeps talking to etcd
// through its published port. Only the container provider can do this.
func TestPartitionedRegistrarComesBackRegistered(t *testing.T) {
	if !containers.Selected() {
		t.Skipf("needs %s=%s: the partition is a Docker network disconnect between a proxy container and the etcd container, which child processes on loopback cannot do",
			containers.EnvServers, containers.Provider)
	}
	const ttl = 2 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	nw := containers.NewNetwork(t)
	srv := containers.StartEtcd(t)
	srv.Connect(nw, "etcd")
	px := containers.StartProxy(t, nw, "etcd:2379")

	// The registrar is what a user's server would open: a URL client
	// (keepalive pings on, fast reconnects), through the proxy.
	r, err := registry.Open(ctx, "etcd://"+px.Endpoint()+"/?ttl="+ttl.String())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	admin := newClient(t, srv.Endpoint())
	defer admin.Close()
	observer, err := etcd.New(admin, &etcd.Options{TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	defer observer.Close()

	const svc, id = "partition.rpc", "p1"
	w, err := observer.Watch(ctx, svc)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	reg, err := r.Register(ctx, registry.Instance{Service: svc, ID: id, Addr: "127.0.0.1:9001"})
	if err != nil {
		t.Fatal(err)
	}
	waitWatch(t, w, 10*time.Second, "the instance to be visible", func(u registry.Update) bool {
		return !u.Stale && has(u, id)
	})
	key := etcd.DefaultPrefix + svc + "/" + id
	lease := leaseOf(ctx, t, admin, key)

	srv.Disconnect(nw)
	cut := time.Now()
	waitWatch(t, w, 5*ttl+10*time.Second, "the lease to expire on the server", func(u registry.Update) bool {
		return !u.Stale && !has(u, id)
	})
	t.Logf("lease expired on the server %v after the partition began", time.Since(cut).Round(10*time.Millisecond))
	waitStatus(t, reg, 10*time.Second, "the registrar to notice the loss", func(st registry.Status) bool {
		return st.State == registry.Retrying
	})

	srv.Connect(nw, "etcd")
	healed := time.Now()
	waitWatch(t, w, 60*time.Second, "the registrar to register the instance again", func(u registry.Update) bool {
		return !u.Stale && has(u, id)
	})
	t.Logf("registered again %v after the partition healed", time.Since(healed).Round(10*time.Millisecond))
	if got := leaseOf(ctx, t, admin, key); got == lease {
		t.Fatalf("the key still carries lease %x: want a new lease", lease)
	}
	waitStatus(t, reg, 10*time.Second, "the registration to be registered again", func(st registry.Status) bool {
		return st.State == registry.Registered && st.Reregistrations >= 1
	})
}

// waitStatus polls reg's status until ok, failing after d.
func waitStatus(t *testing.T, reg *registry.Registration, d time.Duration, what string, ok func(registry.Status) bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for st := reg.Status(); !ok(st); st = reg.Status() {
		if time.Now().After(deadline) {
			t.Fatalf("waiting %v for %s: status %+v", d, what, st)
		}
		time.Sleep(20 * time.Millisecond) // polling a status, with a deadline
	}
}

func has(u registry.Update, id string) bool {
	for _, in := range u.Instances() {
		if in.ID == id {
			return true
		}
	}
	return false
}

// waitWatch reads updates until one satisfies ok, failing after d.
func waitWatch(t *testing.T, w *registry.Watcher, d time.Duration, what string, ok func(registry.Update) bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	for {
		u, err := w.Next(ctx)
		if err != nil {
			t.Fatalf("waiting %v for %s: %v", d, what, err)
		}
		if ok(u) {
			return
		}
	}
}

func leaseOf(ctx context.Context, t *testing.T, cli *clientv3.Client, key string) int64 {
	t.Helper()
	resp, err := cli.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 {
		t.Fatalf("%s: %d keys", key, len(resp.Kvs))
	}
	return resp.Kvs[0].Lease
}
