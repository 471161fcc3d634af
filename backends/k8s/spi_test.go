package k8s

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

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
