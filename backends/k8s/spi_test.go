package k8s

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// testWatchOutlivesOpeningCtx: the ctx given to Backend.Watch bounds opening
// the watch only; the stream keeps delivering after it is done.
func testWatchOutlivesOpeningCtx(t *testing.T, env *kubeEnv) {
	ns := env.namespace(t)
	r := env.open(t, testserver.KubeAdmin, ns, 2*time.Second)
	w := env.open(t, testserver.KubeAdmin, ns, 2*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	s, err := r.b.Watch(ctx, "spi")
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	defer s.Close()
	next := ctxFor(t, 30*time.Second)
	ev, err := s.Next(next)
	if err != nil || !ev.Reset {
		cancel()
		t.Fatalf("first event %+v, %v; want a Reset", ev, err)
	}
	cancel() // the opening ctx is done: the stream must live on
	if _, err := w.Register(ctxFor(t, 10*time.Second), registry.Instance{Service: "spi", ID: "a", Addr: "10.8.0.1:80"}); err != nil {
		t.Fatal(err)
	}
	for {
		ev, err := s.Next(next)
		if err != nil {
			t.Fatalf("the stream ended once its opening ctx was done: %v", err)
		}
		var got []string
		for _, c := range ev.Changes {
			if c.Instance != nil {
				got = append(got, c.ID)
			}
		}
		if ev.Reset {
			for _, in := range ev.Instances {
				got = append(got, in.ID)
			}
		}
		if slices.Contains(got, "a") {
			return
		}
	}
}

// testDuplicateIDIsAConflict: a (service, ID) held by another live
// registrar at another address is refused with registry.ErrConflict, and
// the holder's registration stands; the same address is the same endpoint
// and is accepted; once the holder is gone the ID is free.
func testDuplicateIDIsAConflict(t *testing.T, env *kubeEnv) {
	ns := env.namespace(t)
	a := env.open(t, testserver.KubeAdmin, ns, 3*time.Second)
	b := env.open(t, testserver.KubeAdmin, ns, 3*time.Second)
	watcher := env.open(t, testserver.KubeAdmin, ns, 3*time.Second)
	f := follow(t, watcher, "dup")
	regA, err := a.Register(ctxFor(t, 10*time.Second), registry.Instance{Service: "dup", ID: "same", Addr: "10.8.0.1:7001"})
	if err != nil {
		t.Fatal(err)
	}
	f.waitIDs(t, "same")
	_, err = b.Register(ctxFor(t, 10*time.Second), registry.Instance{Service: "dup", ID: "same", Addr: "10.8.0.2:7002"})
	if !errors.Is(err, registry.ErrConflict) {
		t.Fatalf("Register of an ID another live registrar holds at another address: %v, want registry.ErrConflict", err)
	}
	t.Logf("refused: %v", err)
	// The refused registrar wrote nothing that lasts: no Lease, no slice.
	leases, err := env.admin.CoordinationV1().Leases(ns).List(ctxFor(t, 10*time.Second), listOptions(leaseSelector, nil))
	if err != nil {
		t.Fatal(err)
	}
	if len(leases.Items) != 1 {
		t.Fatalf("%d Leases after the refusal, want the holder's only", len(leases.Items))
	}
	list, err := watcher.Lookup(ctxFor(t, 10*time.Second), "dup")
	if err != nil || len(list) != 1 || list[0].Addr != "10.8.0.1:7001" {
		t.Fatalf("Lookup = %v, %v; want the holder's 10.8.0.1:7001", list, err)
	}
	// Same address: the same endpoint (a restarted process), accepted.
	c := env.open(t, testserver.KubeAdmin, ns, 3*time.Second)
	regC, err := c.Register(ctxFor(t, 10*time.Second), registry.Instance{Service: "dup", ID: "same", Addr: "10.8.0.1:7001"})
	if err != nil {
		t.Fatalf("Register of the same ID at the same address: %v", err)
	}
	// Once the holders are gone, the ID is free for another address.
	if err := regA.Deregister(ctxFor(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := regC.Deregister(ctxFor(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Register(ctxFor(t, 10*time.Second), registry.Instance{Service: "dup", ID: "same", Addr: "10.8.0.2:7002"}); err != nil {
		t.Fatalf("Register after the holders left: %v", err)
	}
	f.wait(t, "the new address", func(l []registry.Instance) bool { return len(l) == 1 && l[0].Addr == "10.8.0.2:7002" })
}

// testRacingDuplicatesLeaveOne: registrations of one ID at two addresses
// racing (each past the other's check) end with one of them standing.
func testRacingDuplicatesLeaveOne(t *testing.T, env *kubeEnv) {
	ns := env.namespace(t)
	a := env.open(t, testserver.KubeAdmin, ns, 3*time.Second)
	b := env.open(t, testserver.KubeAdmin, ns, 3*time.Second)
	// Publish directly on the backends, so that both run at once.
	errs := make(chan error, 2)
	for i, r := range []*kubeRegistry{a, b} {
		go func() {
			_, err := r.b.Publish(ctxFor(t, 10*time.Second), driver.Instance{Service: "race", ID: "x", Addr: []string{"10.8.1.1:80", "10.8.1.2:80"}[i]})
			errs <- err
		}()
	}
	var ok, conflict int
	for range 2 {
		switch err := <-errs; {
		case err == nil:
			ok++
		case errors.Is(err, registry.ErrConflict):
			conflict++
		default:
			t.Fatal(err)
		}
	}
	list, err := env.admin.DiscoveryV1().EndpointSlices(ns).List(ctxFor(t, 10*time.Second), listOptions(LabelInstance+"="+instanceLabel("race", "x"), nil))
	if err != nil {
		t.Fatal(err)
	}
	if ok != 1 || conflict != 1 || len(list.Items) != 1 {
		t.Fatalf("%d published, %d refused, %d slices; want 1, 1, 1", ok, conflict, len(list.Items))
	}
}

// testWithdrawDeletesTheLeaseOrFails: when the last withdrawal of a
// Registry cannot delete its Lease, Withdraw fails, and keeps failing when
// repeated, until the Lease is deleted; then it returns nil and nothing of
// the registration is left. Close deletes such a Lease too. The Lease's
// deletion is refused by RBAC (frank may do everything but delete Leases)
// until the test grants it.
func testWithdrawDeletesTheLeaseOrFails(t *testing.T, env *kubeEnv) {
	ns := env.namespace(t)
	rules := func(leaseVerbs ...string) []rbacv1.PolicyRule {
		return []rbacv1.PolicyRule{
			{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"get", "list", "watch", "create", "update", "patch", "delete"}},
			{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, Verbs: leaseVerbs},
		}
	}
	grant(t, env, ns, "frank", rules("get", "list", "watch", "create", "update", "patch")...)
	a := env.open(t, "frank", ns, 3*time.Second)
	b := env.open(t, "frank", ns, 3*time.Second)
	ctx := ctxFor(t, time.Minute)
	var pubs []driver.Publication
	for i, r := range []*kubeRegistry{a, b} {
		var pub driver.Publication
		var err error
		waitFor(t, 10*time.Second, "frank's Role to take effect", func() bool {
			pub, err = r.b.Publish(ctx, driver.Instance{Service: "wd", ID: fmt.Sprintf("i%d", i), Addr: fmt.Sprintf("10.8.2.%d:80", i+1)})
			return err == nil
		})
		pubs = append(pubs, pub)
	}
	count := func(what string) (leases, slices int) {
		t.Helper()
		ll, err := env.admin.CoordinationV1().Leases(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		sl, err := env.admin.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: LabelManagedBy + "=" + ManagedBy})
		if err != nil {
			t.Fatal(err)
		}
		return len(ll.Items), len(sl.Items)
	}
	for i, pub := range pubs {
		for attempt := range 2 {
			err := pub.Withdraw(ctx)
			if attempt == 0 {
				wantForbidden(t, "Withdraw of the last registration", err, "delete", resLeases)
			} else if err == nil {
				t.Fatalf("Withdraw %d of publication %d returned nil, but its Lease could not be deleted", attempt+1, i)
			}
		}
	}
	if l, s := count("after the refused withdrawals"); l != 2 || s != 0 {
		t.Fatalf("after the refused withdrawals: %d Leases and %d slices, want 2 and 0", l, s)
	}
	// Allowed at last: a's Withdraw succeeds, b's Close deletes its Lease.
	role, err := env.admin.RbacV1().Roles(ns).Get(ctx, "frank", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	role.Rules = rules("get", "list", "watch", "create", "update", "patch", "delete")
	if _, err := env.admin.RbacV1().Roles(ns).Update(ctx, role, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "a repeated Withdraw to succeed once Leases may be deleted", func() bool {
		return pubs[0].Withdraw(ctx) == nil
	})
	if l, _ := count("after a's withdrawal"); l != 1 {
		t.Fatalf("after a successful Withdraw %d Leases remain, want b's only", l)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if l, s := count("after b's Close"); l != 0 || s != 0 {
		t.Fatalf("after the withdrawal and the Close: %d Leases and %d slices, want none", l, s)
	}
}
