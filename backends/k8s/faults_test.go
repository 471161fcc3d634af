package k8s

import (
	"fmt"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// A process that starts after an API-server outage finds Leases whose
// renewTime predates it. It has not watched them go unrenewed, so it must
// neither hide their instances nor delete them: their registrars renew them
// as soon as they can (issue 11 item 2).
func TestReaderThatMissedAnOutageKeepsLiveRegistrations(t *testing.T) {
	env := startKube(t)
	ns := env.namespace(t)
	ctx := ctxFor(t, 2*time.Minute)
	const svc, n = "outage", 5
	a := env.open(t, testserver.KubeAdmin, ns, 3*time.Second)
	for i := range n {
		in := registry.Instance{Service: svc, ID: fmt.Sprintf("i%d", i), Addr: fmt.Sprintf("10.7.0.%d:80", i+1)}
		if _, err := a.Register(ctx, in); err != nil {
			t.Fatal(err)
		}
	}
	leases, err := env.admin.CoordinationV1().Leases(ns).List(ctx, metav1.ListOptions{LabelSelector: leaseSelector})
	if err != nil || len(leases.Items) != 1 {
		t.Fatalf("leases of the registrar: %v, %v", leases, err)
	}
	leaseName, leaseUID := leases.Items[0].Name, leases.Items[0].UID
	slices, err := env.admin.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: LabelLease + "=" + leaseName})
	if err != nil || len(slices.Items) != n {
		t.Fatalf("slices of the registrar: %d, %v", len(slices.Items), err)
	}

	// The outage: longer than the Lease's duration plus the clock-skew
	// allowance. The one sleep of the test is the fault it simulates.
	env.srv.Pause()
	time.Sleep(8 * time.Second)
	env.srv.Resume()

	// A process started right then: a Lookup, a watch, and a registration
	// of its own (whose Lease creation sweeps the namespace).
	b := env.open(t, testserver.KubeAdmin, ns, 0)
	if got := lookupIDs(t, b, svc); len(got) != n {
		t.Fatalf("first Lookup of a process started after the outage = %v, want %d instances", got, n)
	}
	f := follow(t, b, svc)
	if _, err := b.Register(ctx, registry.Instance{Service: "bystander", ID: "b", Addr: "10.7.1.1:80"}); err != nil {
		t.Fatal(err)
	}
	end := time.Now().Add(8 * time.Second)
	for time.Now().Before(end) {
		if got := lookupIDs(t, b, svc); len(got) != n {
			t.Fatalf("Lookup %v after the outage = %v, want %d instances", time.Since(end.Add(-8*time.Second)), got, n)
		}
		l, err := env.admin.CoordinationV1().Leases(ns).Get(ctx, leaseName, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("the live registrar's lease: %v", err)
		}
		if l.UID != leaseUID {
			t.Fatalf("the live registrar's lease was replaced: uid %v, want %v", l.UID, leaseUID)
		}
		es, err := env.admin.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: LabelLease + "=" + leaseName})
		if err != nil || len(es.Items) != n {
			t.Fatalf("slices of the live registrar: %d, %v", len(es.Items), err)
		}
		select {
		case s := <-f.snap:
			if len(s) != n {
				t.Fatalf("watcher of a process started after the outage: %v, want %d instances", ids(s), n)
			}
			f.snap <- s
		default:
		}
		time.Sleep(200 * time.Millisecond) // sampling interval
	}
	f.wait(t, fmt.Sprintf("%d instances", n), func(s []registry.Instance) bool { return len(s) == n })
	for len(f.log) > 0 {
		if u := <-f.log; len(u.Removed) > 0 {
			t.Fatalf("watcher saw %v removed", u.Removed)
		}
	}
}
