package etcd_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/rollcall-go/rollcall/backends/etcd"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// TestOneLeasePerRegistry: many registrations share one lease, and the lease
// is revoked when the last one is deregistered.
func TestOneLeasePerRegistry(t *testing.T) {
	srv := testserver.StartEtcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin := newClient(t, srv.Endpoint())
	defer admin.Close()
	cli := newClient(t, srv.Endpoint())
	defer cli.Close()
	r, err := etcd.New(cli, &etcd.Options{TTL: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var regs []*registry.Registration
	for i := range 200 {
		reg, err := r.Register(ctx, registry.Instance{Service: fmt.Sprintf("svc-%d", i%7), ID: fmt.Sprintf("i%d", i), Addr: fmt.Sprintf("127.0.0.1:%d", 1000+i)})
		if err != nil {
			t.Fatal(err)
		}
		regs = append(regs, reg)
	}
	leases, err := admin.Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(leases.Leases); n != 1 {
		t.Fatalf("200 registrations hold %d leases, want 1", n)
	}
	for _, reg := range regs {
		if err := reg.Deregister(ctx); err != nil {
			t.Fatal(err)
		}
	}
	leases, err = admin.Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(leases.Leases); n != 0 {
		t.Fatalf("after the last Deregister %d leases remain, want 0", n)
	}
	resp, err := admin.Get(ctx, etcd.DefaultPrefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if resp.Count != 0 {
		t.Fatalf("%d keys remain", resp.Count)
	}
}

// TestUserPassword: a URL with credentials works against an etcd with auth
// enabled, and a wrong password is a clear error that does not show it.
func TestUserPassword(t *testing.T) {
	srv := testserver.StartEtcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin := newClient(t, srv.Endpoint())
	defer admin.Close()
	for _, step := range []func() error{
		func() error { _, err := admin.UserAdd(ctx, "root", "s3cret"); return err },
		func() error { _, err := admin.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := admin.AuthEnable(ctx); return err },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	r, err := registry.Open(ctx, "etcd://root:s3cret@"+srv.Endpoint()+"/?ttl=5s")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := r.Register(ctx, registry.Instance{Service: "auth", Addr: "127.0.0.1:1"}); err != nil {
		t.Fatalf("Register with credentials: %v", err)
	}
	bad, err := registry.Open(ctx, "etcd://root:hunter2@"+srv.Endpoint()+"/?ttl=5s")
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	err = bad.Ping(ctx)
	if err == nil {
		t.Fatal("Ping with a wrong password succeeded")
	}
	if s := err.Error(); strings.Contains(s, "hunter2") {
		t.Fatalf("error shows the password: %v", err)
	}
}

// TestWithdrawDuringAMoveLeavesNoKey: a registration deregistered while a
// leader election moves the registrations to a new lease (its key still
// carries the old lease; the move's transaction is about to be sent) is
// gone from etcd when Withdraw returns, and stays gone once the move is
// done; the registration left keeps its key, on the new lease. (Seen in a
// CI run of the cluster properties: a deregistration that never reached
// the watcher while a member was frozen.)
func TestWithdrawDuringAMoveLeavesNoKey(t *testing.T) {
	ctx, admin, b := backendOnEtcd(t)
	x, err := b.Publish(ctx, driver.Instance{Service: "mv", ID: "x", Addr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Publish(ctx, driver.Instance{Service: "mv", ID: "y", Addr: "127.0.0.1:2"}); err != nil {
		t.Fatal(err)
	}
	keyX, keyY := etcd.DefaultPrefix+"mv/x", etcd.DefaultPrefix+"mv/y"
	first := leaseOf(ctx, t, admin, keyY)
	var once sync.Once
	withdrawn := make(chan error, 1)
	var afterWithdraw *clientv3.GetResponse
	etcd.SetMoveHook(b, func(key string) {
		if key != keyX {
			return
		}
		once.Do(func() {
			err := x.Withdraw(ctx)
			if err == nil {
				afterWithdraw, err = admin.Get(ctx, keyX)
			}
			withdrawn <- err
		})
	})
	etcd.Rotate(b)
	if err := <-withdrawn; err != nil {
		t.Fatal(err)
	}
	if len(afterWithdraw.Kvs) != 0 {
		t.Errorf("Withdraw returned nil with %s still in etcd (lease %x)", keyX, afterWithdraw.Kvs[0].Lease)
	}
	testutil.WaitFor(t, 10*time.Second, "y to carry a lease other than the first", func() bool {
		return leaseOf(ctx, t, admin, keyY) != first
	})
	testutil.WaitFor(t, 10*time.Second, "the first lease to be revoked", func() bool {
		ttl, err := admin.TimeToLive(ctx, clientv3.LeaseID(first))
		return err == nil && ttl.TTL == -1
	})
	resp, err := admin.Get(ctx, keyX)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 0 {
		t.Errorf("after the move %s is in etcd again (lease %x)", keyX, resp.Kvs[0].Lease)
	}
}

// TestPutSentBeforeAWithdrawDoesNotApplyAfter: a try of a Publish that a
// frozen member holds, applied when it thaws after the instance was
// deregistered, must not write the key again (a CI run of
// ClusterWatchFollowsChangesWhileAMemberIsFrozen: x2, deregistered, came
// back at the thaw of the member its first try had gone to). Before the
// fence, the late transaction succeeded and the key was back.
func TestPutSentBeforeAWithdrawDoesNotApplyAfter(t *testing.T) {
	ctx, admin, b := backendOnEtcd(t)
	keep := driver.Instance{Service: "late", ID: "keep", Addr: "127.0.0.1:9000"}
	if _, err := b.Publish(ctx, keep); err != nil { // holds the lease
		t.Fatal(err)
	}
	inst := driver.Instance{Service: "late", ID: "x", Addr: "127.0.0.1:9001"}
	late := etcd.StalePut(b, inst)
	p, err := b.Publish(ctx, inst)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Withdraw(ctx); err != nil {
		t.Fatal(err)
	}
	ok, err := late()
	if err != nil {
		t.Fatal(err)
	}
	resp, err := admin.Get(ctx, etcd.DefaultPrefix+"late/x")
	if err != nil {
		t.Fatal(err)
	}
	if ok || resp.Count != 0 {
		t.Fatalf("a put sent before the Withdraw applied after it: succeeded=%v, key present=%v", ok, resp.Count != 0)
	}
	// A Publish after the withdrawal still writes it.
	if _, err := b.Publish(ctx, inst); err != nil {
		t.Fatalf("Publish after the withdrawal: %v", err)
	}
}

// backendOnEtcd starts an etcd and returns a minute's context, an admin
// client, and a backend (TTL 5s) over a client of its own, all closed at the
// end of the test.
func backendOnEtcd(t *testing.T) (context.Context, *clientv3.Client, driver.Backend) {
	t.Helper()
	srv := testserver.StartEtcd(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	admin := newClient(t, srv.Endpoint())
	t.Cleanup(func() { admin.Close() })
	cli := newClient(t, srv.Endpoint())
	t.Cleanup(func() { cli.Close() })
	b := etcd.NewBackend(cli, &etcd.Options{TTL: 5 * time.Second})
	t.Cleanup(func() { b.Close() })
	return ctx, admin, b
}
